"""The drafter on the real 0.5B GGUF: KV rollback, gating, sampled drafts."""
import numpy as np
import pytest

from common.assets import model_path
from common.config import ConfidenceConfig, DraftConfig, Switches
from common.llama_runtime import LlamaRunner
from common.prompts import chat
from common.protocol import SamplingParams
from edge.drafter import Drafter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner():
    return LlamaRunner(model_path("qwen2.5-coder-0.5b-instruct-q4_k_m"), n_ctx=1024)


@pytest.fixture(scope="module")
def fresh():
    return LlamaRunner(model_path("qwen2.5-coder-0.5b-instruct-q4_k_m"), n_ctx=1024)


def test_rollback_leaves_logits_identical_to_fresh_evaluation(runner, fresh):
    prompt = runner.tokenize(chat("Write a function that reverses a string."))
    runner.reset()
    runner.decode(prompt, 1)
    wrong = runner.decode([1234, 5678, 91011], 1)             # a draft that will be rejected
    runner.rollback(len(prompt))
    assert runner.tokens == prompt and runner.llm.n_tokens == len(prompt)
    after = runner.decode([785], 1)                            # the correction
    fresh.reset()
    fresh.decode(prompt, 1)                                    # same batch shapes, never saw the draft
    expect = fresh.decode([785], 1)
    assert np.array_equal(after, expect)                       # bit for bit
    assert not np.array_equal(wrong, expect)


def test_rollback_really_removes_kv(runner):
    """Control: forgetting the tokens without llama_memory_seq_rm leaves stale KV entries, and
    llama.cpp refuses the next decode at those positions (so the test above can fail)."""
    prompt = runner.tokenize(chat("Say hello."))
    runner.reset()
    runner.decode(prompt, 1)
    runner.decode([1234, 5678], 1)
    runner.tokens = runner.tokens[:len(prompt)]               # forget the tokens but leave the KV
    runner.llm.n_tokens = len(prompt)
    with pytest.raises(RuntimeError, match="llama_decode"):
        runner.decode([785], 1)
    runner.tokens = prompt + [1234, 5678]                     # tell the truth again, then clean up
    runner.reset()
    assert runner.decode(prompt, 1).shape == (1, runner.n_vocab)


def test_extend_to_reuses_prefix(runner):
    prompt = runner.tokenize(chat("Count to five."))
    runner.reset()
    _, cached = runner.extend_to(prompt + [16, 17], 1)
    assert cached == 0
    _, cached = runner.extend_to(prompt + [16, 18, 19], 1)
    assert cached == len(prompt) + 1 and runner.tokens == prompt + [16, 18, 19]


def drafter(runner, gating, threshold=0.5, max_k=6):
    return Drafter(runner, DraftConfig(max_k=max_k, top_n=8), ConfidenceConfig(threshold=threshold),
                   Switches(confidence_gating=gating))


def test_gating_stops_early_and_off_means_max_k(runner):
    ctx = runner.tokenize(chat("Tell me a story about a dragon."))
    rng = np.random.default_rng(0)
    gated = drafter(runner, True, threshold=0.99).draft(ctx, 6, SamplingParams(), rng, True)
    assert 1 <= len(gated.tokens) < 6                                  # min_k=1 always drafted
    assert all(c >= 0.99 for c in gated.confidences[1:])              # past min_k, only confident tokens
    full = drafter(runner, False, threshold=0.99).draft(ctx, 6, SamplingParams(), rng, True)
    assert len(full.tokens) == 6 and full.tokens[:len(gated.tokens)] == gated.tokens


def test_sampled_draft_carries_its_distribution(runner):
    ctx = runner.tokenize(chat("Name a colour."))
    d = drafter(runner, False, max_k=3).draft(ctx, 3, SamplingParams(temperature=1.0), np.random.default_rng(1), True)
    assert len(d.dists) == 3
    for tok, dist in zip(d.tokens, d.dists):
        assert tok in dist.ids and len(dist.ids) == 8 and abs(sum(dist.probs) - 1) < 1e-9
