"""switches.batched_verify on the real llama.cpp target: rounds of two sessions in one llama_decode
(LlamaCppBackend.logits_many) give each the target's own next tokens, as the rounds alone do, and
reuse each session's cached prefix. Slow: loads the target (a few tokens, two sessions)."""
import numpy as np
import pytest

from cloud.backends.llamacpp_backend import LlamaCppBackend
from common.assets import model_file
from common.config import load_config

pytestmark = pytest.mark.slow


def test_logits_many_matches_each_round_alone():
    cfg = load_config()
    gguf = model_file(cfg.models, "target")
    a = LlamaCppBackend(gguf, n_ctx=512, n_threads=1, n_seq=2)
    b = LlamaCppBackend(gguf, n_ctx=512, n_threads=1, n_seq=2)
    try:
        p1 = a.runner.tokenize("def add(a, b):\n    return")
        p2 = a.runner.tokenize("The capital of France is")
        alone = [a.logits("s1", p1, 3, True), a.logits("s2", p2, 3, True)]
        together = b.logits_many([("s1", p1, 3, True), ("s2", p2, 3, True)])
        for (la, ca), (lb, cb) in zip(alone, together):
            assert ca == cb == 0 and la.shape == lb.shape == (3, a.n_vocab)
            assert (la.argmax(-1) == lb.argmax(-1)).all()
            assert np.abs(la - lb).max() < 1.5          # Q4 kernels quantise a batch's activations differently
        nxt = int(together[0][0][-1].argmax())
        again = b.logits_many([("s1", p1 + [nxt], 1, True), ("s2", p2, 1, True)])
        assert again[0][1] == len(p1) and again[1][1] == len(p2) - 1     # each session's cache reused
        assert int(again[0][0][-1].argmax()) == int(a.logits("s1", p1 + [nxt], 1, True)[0][-1].argmax())
    finally:
        a.close()
        b.close()
