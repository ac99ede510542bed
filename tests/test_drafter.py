"""The drafter on the real 0.5B GGUF: KV rollback, gating, sampled drafts."""
import asyncio
import contextlib

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


@contextlib.contextmanager
def drafter(runner, gating, threshold=0.5, max_k=6):
    d = Drafter(runner, DraftConfig(max_k=max_k, top_n=8), ConfidenceConfig(threshold=threshold),
                Switches(confidence_gating=gating))
    try:
        yield d
    finally:
        d.close()


def test_gating_stops_early_and_off_means_max_k(runner):
    ctx = runner.tokenize(chat("Tell me a story about a dragon."))
    rng = np.random.default_rng(0)
    with drafter(runner, True, threshold=0.99) as d:
        gated = asyncio.run(d.draft(0, ctx, 6, SamplingParams(), rng))
    assert 1 <= len(gated.tokens) < 6                                  # min_k=1 always drafted
    assert all(c >= 0.99 for c in gated.confidences[1:])              # past min_k, only confident tokens
    with drafter(runner, False, threshold=0.99) as d:
        full = asyncio.run(d.draft(0, ctx, 6, SamplingParams(), rng))
    assert len(full.tokens) == 6 and full.tokens[:len(gated.tokens)] == gated.tokens


def test_sampled_draft_carries_its_distribution(runner):
    ctx = runner.tokenize(chat("Name a colour."))
    with drafter(runner, False, max_k=3) as d:
        dr = asyncio.run(d.draft(0, ctx, 3, SamplingParams(temperature=1.0), np.random.default_rng(1)))
    assert len(dr.dists) == 3
    for tok, dist in zip(dr.tokens, dr.dists):
        assert tok in dist.ids and len(dist.ids) == 8 and abs(sum(dist.probs) - 1) < 1e-9


@pytest.fixture(scope="module")
def multi():
    return LlamaRunner(model_path("qwen2.5-coder-0.5b-instruct-q4_k_m"), n_ctx=512, n_seq=4)


def test_one_sessions_rollback_never_changes_anothers_logits(multi):
    """Sequences have KV streams of their own: what sequence 1 decodes and rolls back, in batches
    shared with sequence 0 or alone, leaves sequence 0's next logits bit for bit unchanged."""
    a = multi.tokenize(chat("Write a function that reverses a string."))
    b = multi.tokenize(chat("Tell me about the moon."))
    for seq in range(4):
        multi.reset(seq)
    multi.decode(a, 1, seq=0)
    alone = multi.decode([785], 1, seq=0)
    multi.rollback(len(a), seq=0)
    multi.decode_batch([(1, b, 1), (2, a[:5], 1)])                  # other sessions arrive
    multi.decode_batch([(1, [1234, 5678, 91011], 1)])               # sequence 1 drafts junk ...
    multi.rollback(len(b), seq=1)                                   # ... and rolls it back
    again = multi.decode([785], 1, seq=0)
    assert multi.seq_tokens[0] == a + [785] and multi.seq_tokens[1] == b
    assert np.array_equal(alone, again)


def test_sessions_draft_together_in_one_batch_per_step(multi):
    """Four sessions drafting at once share llama_decode steps (continuous batching), and each gets
    a real draft of its own context."""
    prompts = [multi.tokenize(chat(q)) for q in ("Count to ten.", "Name three colours.", "Write hello world in C.",
                                                  "What is 2 + 2?")]

    async def together(d):
        rng = np.random.default_rng(0)
        return await asyncio.gather(*(d.draft(i, p, 5, SamplingParams(), rng) for i, p in enumerate(prompts)))

    for seq in range(4):
        multi.reset(seq)
    with drafter(multi, False, max_k=5) as d:
        drafts = asyncio.run(together(d))
        steps = d.steps
    assert all(len(x.tokens) == 5 for x in drafts)
    assert steps <= 6          # 1 prefill step + 4 draft steps for all four, not 4 x 5 = 20
    for seq, (p, x) in enumerate(zip(prompts, drafts)):
        assert multi.seq_tokens[seq] == p + x.tokens[:-1]           # each sequence holds its own context
    with drafter(multi, False, max_k=5) as d:                       # one at a time: each drafts its own text
        alone = [asyncio.run(d.draft(i, p, 5, SamplingParams(), np.random.default_rng(0))) for i, p in enumerate(prompts)]
    same = sum(x.tokens == y.tokens for x, y in zip(drafts, alone))
    assert same >= 3, (drafts, alone)   # batch shape may flip a near-tie; a mix-up of sessions would flip all
