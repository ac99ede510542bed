"""The vLLM logprob -> acceptance conversion on CPU (no vLLM needed). The hand-made fixtures mirror
vLLM 0.26.0's documented shape (prompt logprobs for the uncached tail, aligned to the end of the prompt, first entry None; dicts of token id -> Logprob with .logprob);
the last test uses output recorded from a real vLLM run."""
from types import SimpleNamespace as LP

import numpy as np
import pytest

from cloud.acceptance import accept_draft
from cloud.backends.vllm_backend import logprob_rows
from common.protocol import SamplingParams

V = 10
CONTEXT = [1, 2, 3, 4, 5, 6]
DRAFT = [7, 8, 9]


def entry(best, actual=None, lp_best=-0.1):
    d = {best: LP(logprob=lp_best, rank=1), (best + 1) % V: LP(logprob=-2.5, rank=2)}
    if actual is not None and actual not in d:
        d[actual] = LP(logprob=-4.0, rank=7)
    return d


def fixture(target_after):
    """prompt = CONTEXT + DRAFT with 4 positions cached; target argmax after each position given."""
    prompt = CONTEXT + DRAFT
    n_cached = 4
    pl = [None] + [entry(target_after[p - 1], prompt[p]) for p in range(n_cached + 1, len(prompt))]
    return prompt, pl, entry(target_after[len(prompt) - 1])


def test_rows_align_to_the_end_and_greedy_accepts():
    # target wants 7 after 6, 8 after 7, 0 after 8 (draft said 9), 4 after 9
    prompt, pl, last = fixture({**{i: 0 for i in range(9)}, 5: 7, 6: 8, 7: 0, 8: 4})
    rows = logprob_rows(pl, last, len(prompt), len(DRAFT) + 1, V)
    assert rows.shape == (4, V)
    assert rows.argmax(axis=1).tolist() == [7, 8, 0, 4]
    assert accept_draft(DRAFT, rows, SamplingParams(), None, None) == (2, 0)


def test_position_served_from_cache_is_an_error():
    prompt, pl, last = fixture({i: 0 for i in range(9)})
    with pytest.raises(LookupError):
        logprob_rows(pl[3:], last, len(prompt), len(DRAFT) + 1, V)   # tail too short: draft[0] cached


def test_sampling_uses_the_renormalised_top_k():
    prompt, pl, last = fixture({i: 0 for i in range(9)})
    rows = logprob_rows(pl, last, len(prompt), 2, V)
    finite = np.isfinite(rows[1])
    assert finite.sum() == 2          # top-2 only: exact up to the mass outside the top-K


def test_recorded_vllm_output_converts_and_verifies():
    """Fixture recorded on an H100 by `python -m ablations.gpu_vllm run` (vLLM 0.26.0, the 1.5B target
    in bf16): prompt = chat prompt + the target's own first 6 greedy tokens, prompt_logprobs=5,
    logprobs=5, max_tokens=1. Verifying the last 4 prompt tokens as a draft must accept all 4 (they are
    the target's greedy output) and return the generated token as the bonus."""
    import json
    from pathlib import Path
    fx = json.loads((Path(__file__).parent / "fixtures" / "vllm_fixture.json").read_text())
    pl = [None if e is None else {int(t): lp for t, lp in e.items()} for e in fx["prompt_logprobs"]]
    last = {int(t): lp for t, lp in fx["sample_logprobs"].items()}
    prompt = fx["prompt"]
    rows = logprob_rows(pl, last, len(prompt), fx["n_logits"], 151936)
    assert rows.shape == (5, 151936)
    assert all(5 <= np.isfinite(r).sum() <= 6 for r in rows)          # top-5 (+ the prompt token)
    assert accept_draft(prompt[-4:], rows, SamplingParams(), None, None) == (4, fx["generated"])
