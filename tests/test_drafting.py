"""Drafting that adapts to the link (issue 15, item 3): the draft-length choice, prompt lookup, one-hot
proposals, and the generator's draft-ahead / parallel-prefill rounds against a real cloud over loopback
HTTP. The target here is the fake table (argmax = last + 1) and the drafter a rule with known mistakes:
protocol tests only; losslessness with real models is in tests/test_lossless.py."""
import asyncio
import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from cloud.acceptance import accept_draft, target_probs
from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import load_config
from common.protocol import DraftDist, SamplingParams
from conftest import TableBackend
from edge.draft_length import (Acceptance, Calibration, RateGate, VerifyCost, best_draft_length, expected_tokens,
                               round_rate)
from edge.drafter import Draft
from edge.generator import GenStats, Generator
from edge.link import CloudLink
from edge.ngram import lookup, one_hot

V = 32                                   # the table's vocabulary


# --- the draft length -------------------------------------------------------------------------------
def flat(ms):
    return lambda k: ms


def test_expected_tokens_is_the_geometric_sum():
    for alpha in (0.0, 0.3, 0.9):
        for k in (0, 1, 5):
            assert expected_tokens(alpha, k) == pytest.approx(sum(alpha ** i for i in range(k + 1)))


def test_longer_drafts_on_far_links_shorter_at_low_acceptance():
    k_at = {rtt: best_draft_length(0.8, 30.0, rtt, flat(50.0), 1, 12) for rtt in (5, 20, 50, 100, 200, 500)}
    assert list(k_at.values()) == sorted(k_at.values()) and k_at[500] > k_at[5]
    k_alpha = [best_draft_length(a, 30.0, 200.0, flat(50.0), 1, 12) for a in (0.95, 0.8, 0.6, 0.3)]
    assert k_alpha == sorted(k_alpha, reverse=True) and k_alpha[0] > k_alpha[-1]
    # the choice really is the argmax of the formula
    rate = lambda k: expected_tokens(0.8, k) / (k * 30.0 + 200.0 + 50.0)      # noqa: E731
    assert k_at[200] == max(range(1, 13), key=rate)


def test_bounds_are_respected_and_free_tokens_lengthen_the_draft():
    assert best_draft_length(0.99, 1.0, 1000.0, flat(0.0), 2, 7) == 7
    assert best_draft_length(0.0, 100.0, 1.0, flat(0.0), 3, 9) == 3
    assert best_draft_length(1.0, 10.0, 100.0, flat(0.0), 1, 12) == 12        # alpha clamped: no division by 0
    assert best_draft_length(0.7, 60.0, 50.0, flat(40.0), 1, 12, free=8) > best_draft_length(0.7, 60.0, 50.0, flat(40.0), 1, 12)


def test_a_free_lookup_wins_near_even_when_often_wrong_and_far_only_when_it_is_right():
    verify = flat(40.0)

    def lookup_wins(alpha_lookup, rtt):
        k = best_draft_length(0.8, 35.0, rtt, verify, 1, 12)
        m = best_draft_length(alpha_lookup, 0.0, rtt, verify, 1, 8)
        return round_rate(alpha_lookup, m, 0.0, rtt, verify) >= round_rate(0.8, k, k * 35.0, rtt, verify)
    assert lookup_wins(0.9, 5) and lookup_wins(0.9, 500)
    assert lookup_wins(0.5, 5) and not lookup_wins(0.5, 500)     # near: drafting is most of a round; far: tau counts


def test_acceptance_and_verify_cost_estimates():
    a = Acceptance()
    for _ in range(30):
        a.observe(4, 4)
    assert a.alpha > 0.95
    for _ in range(30):
        a.observe(4, 0)                   # one trial each: the tokens after a rejection were never tried
    assert a.alpha < 0.3                  # 30 failures against 20 tokens of memory (0.95 per trial)
    v = VerifyCost()
    assert v(5) == 0.0
    for k in (2, 2, 2):
        v.observe(k, 30.0)
    assert v(10) == pytest.approx(30.0)   # k never varied: flat
    for k in (1, 4, 8, 12, 3):
        v.observe(k, 20.0 + 10.0 * (k + 1))
    assert v(12) > v(1) and v(6) == pytest.approx(90.0, rel=0.2)


def test_verify_cost_follows_each_length_not_one_line():
    """A CPU cloud's cost by draft length as round_profile measured it (llama.cpp: slower from 8 positions
    on): many rounds of k=1, one of k=4, a few of k=7 and 12. Each length seen is priced as it was, the ones
    between on the line between their neighbours, the ones beyond on the slope across all of them."""
    v = VerifyCost()
    for k, ms in [(1, 128.0)] * 30 + [(4, 229.0)] + [(7, 613.0)] * 3 + [(12, 650.0)] * 2:
        v.observe(k, ms)
    assert v(1) == pytest.approx(128.0) and v(4) == pytest.approx(229.0) and v(7) == pytest.approx(613.0)
    assert v(2) == pytest.approx(128.0 + 101.0 / 3) and v(3) == pytest.approx(128.0 + 202.0 / 3)
    assert v(10) == pytest.approx(613.0 + 37.0 * 3 / 5)
    slope = (650.0 - 128.0) / 11
    assert v(13) == pytest.approx(650.0 + slope) and v(0) == pytest.approx(128.0 - slope)
    v.observe(1, 228.0)                       # the cloud got slower: the newest rounds of a length weigh most
    assert 128.0 + 9 < v(1) < 228.0
    w = VerifyCost()
    for k in (1, 2, 1, 2):
        w.observe(k, 100.0 * k)               # lengths 1 and 2 only: no slope beyond them
    assert w(5) == pytest.approx(200.0) and w(1) == pytest.approx(100.0)


# --- prompt lookup --------------------------------------------------------------------------------
def test_lookup_prefers_the_longest_suffix_then_the_latest_occurrence():
    assert lookup([1, 2, 3, 9, 1, 2, 3], 4) == [9, 1, 2, 3]            # 3-gram "1 2 3" at 0: what followed
    assert lookup([5, 2, 3, 7, 1, 2, 3, 8, 0, 2, 3], 2) == [8, 0]      # 2-gram "2 3", latest earlier occurrence
    assert lookup([4, 6, 7, 4, 8, 3, 9, 3], 3) == [9, 3]               # 1-gram "3": the tokens after it, up to the end
    assert lookup([1, 2, 3, 4], 3) == []                               # nothing repeats
    assert lookup([1, 2, 1, 2], 3, max_n=3, min_n=2) == [1, 2]
    assert lookup([3, 1, 2, 1], 3, max_n=3, min_n=2) == []             # only a 1-gram matches
    assert lookup([7], 3) == [] and lookup([7, 7], 0) == []


def test_one_hot_proposal_keeps_the_target_law():
    """A lookup token x goes with q = one-hot(x): accept with p(x), else draw from p without x."""
    rng = np.random.default_rng(5)
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.2] * 5]))
    sampling = SamplingParams(temperature=1.0)
    p = target_probs(logits, sampling)[0]
    n = 10_000
    for x in (0, 3):
        counts = np.zeros(5)
        for _ in range(n):
            acc, tok = accept_draft([x], logits, sampling, one_hot([x]), rng)
            counts[x if acc else tok] += 1
        assert chisquare(counts, p * n).pvalue > 1e-4
        assert chisquare(counts, np.roll(p, 1) * n).pvalue < 1e-4      # power: a wrong law is rejected


def _gated_length(confs, alpha, t_draft, rtt, verify, p_ahead=0.0, calibration=None):
    """How many of `confs` (one per drafted token) a RateGate lets into the draft."""
    gate, n = RateGate(calibration or Calibration(), alpha, t_draft, rtt, verify, len(confs), p_ahead), 0
    for c in confs:
        take, more = gate(c)
        n += take
        if not take or not more:
            break
    return n


def test_the_rate_gate_drafts_longer_on_far_links_and_through_doubt_only_there():
    sure, doubt = [0.97] * 12, [0.97, 0.97, 0.6] + [0.97] * 9
    cpu = lambda k: 100.0 + 70.0 * (k + 1)                          # noqa: E731 - a CPU cloud: each token costs
    for confs, verify in ((sure, flat(10.0)), (doubt, flat(10.0)), (sure, cpu)):
        n_at = [_gated_length(confs, 0.9, 25.0, rtt, verify) for rtt in (5, 20, 50, 100, 200, 500)]
        assert n_at == sorted(n_at) and n_at[-1] > n_at[0]
    assert _gated_length(sure, 0.9, 25.0, 500.0, flat(10.0)) == 12              # far and sure: all of it
    assert _gated_length(doubt, 0.9, 25.0, 50.0, flat(10.0)) == 3               # nearer: sends the doubtful one
    # (made already; a flat verify takes it for free) and stops there
    assert _gated_length(doubt, 0.9, 25.0, 500.0, flat(10.0)) == 12             # far: worth going through it
    assert _gated_length(sure, 0.9, 40.0, 200.0, cpu) < _gated_length(sure, 0.9, 40.0, 200.0, flat(10.0))
    assert _gated_length([0.5] * 12, 0.6, 25.0, 200.0, flat(10.0)) < _gated_length(sure, 0.9, 25.0, 200.0, flat(10.0))


def test_a_forced_token_counts_and_the_gate_matches_its_formula():
    gate = RateGate(Calibration(), 0.9, 25.0, 5.0, flat(10.0), 12)
    assert gate(0.05, forced=True) == (True, False)        # min_k not reached: taken; near, unsure: no more
    assert gate.j == 1 and gate.e == pytest.approx(1 + Calibration().q(0.05))
    # stopping at j where one more token at alpha does not pay: E(j)/cost(j) >= E(j+1)/cost(j+1)
    cal = Calibration()
    n = _gated_length([0.95] * 12, 0.9, 25.0, 200.0, flat(10.0), calibration=cal)
    q = cal.q(0.95)
    e = lambda j: 1 + sum(q ** i for i in range(1, j + 1))             # noqa: E731
    rate = lambda j: e(j) / (25.0 * j + 200.0 + 10.0)                   # noqa: E731
    assert n == max(range(1, 13), key=rate)


def test_calibration_learns_acceptance_by_confidence():
    cal = Calibration()
    assert cal.q(0.95) > cal.q(0.55) > cal.q(0.05)          # prior: the confidence itself
    for _ in range(200):
        cal.observe([0.95, 0.55, 0.55], 1)                  # sure tokens accepted, the middling one rejected
    assert cal.q(0.95) > 0.95 and cal.q(0.55) < 0.1
    before = cal.q(0.25)
    cal.observe([0.95, 0.95, 0.25], 0)                       # after the first rejection nothing was tried
    assert cal.q(0.25) == before


# --- the generator against a cloud ------------------------------------------------------------------
class RuleDrafter:
    """A fake drafter: proposes last + 1 (the table's argmax), except after a multiple of 7 (last + 2);
    sampled: q = 0.6 on last + 1, 0.4 on last + 2. Each step 'takes' step_ms."""
    step_ms = first_ms = 2.0
    gated = True            # adaptive drafts come with the rate gate: it is asked about every token (confidence 0.9)

    def __init__(self):
        self.calls = 0

    async def draft(self, seq, context, k, sampling, rng, reuse_kv=True, min_k=None, gate=None):
        self.calls += 1
        if gate is not None:
            n = 0
            while n < k:
                take, more = gate(0.9, n < (min_k or 1))
                n += take
                if not take or not more and n >= (min_k or 1):
                    break
            k = n
        await asyncio.sleep(self.step_ms * k / 1e3)
        toks, dists, last = [], [], context[-1]
        for _ in range(k):
            ids = [(last + 1) % V, (last + 2) % V]
            if sampling.greedy:
                tok = ids[1] if last % 7 == 0 else ids[0]
            else:
                dists.append(DraftDist.model_construct(ids=ids, probs=[0.6, 0.4]))
                tok = ids[0] if rng.random() < 0.6 else ids[1]
            toks.append(tok)
            last = tok
        return Draft(toks, None if sampling.greedy else dists, [1.0] * k, self.step_ms * k)

    async def next_token(self, seq, context, sampling, rng, reuse_kv=True):
        return (context[-1] + 1) % V


def _cfg(**switches):
    return load_config(overrides={"edge.rtt_probe_interval_s": 60, "draft.max_k": 6,
                                  **{f"switches.{k}": v for k, v in switches.items()}})


class SlowTable(TableBackend):
    """The table, taking `delay_s` per call: a round stays in flight long enough to draft the next."""

    def __init__(self, delay_s):
        super().__init__(n_vocab=V, n_ctx=512)
        self.delay_s = delay_s

    async def alogits(self, *args, **kw):
        await asyncio.sleep(self.delay_s)
        return await super().alogits(*args, **kw)


def generate(cfg, prompts, max_tokens, sampling_for, delay_ms=0.0):
    """Each prompt's tokens and GenStats, generated one after another; and the cloud's /stats."""
    async def main():
        backend = SlowTable(delay_ms / 1e3)
        verifier = Verifier(backend, cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        out = []
        try:
            async with CloudLink(url, cfg.edge) as link:
                gen = Generator(RuleDrafter(), link, cfg, stop_tokens=set())
                for i, prompt in enumerate(prompts):
                    stats = GenStats(mode="edge_cloud")
                    toks = []
                    async for t, _ in gen.stream(0, prompt, max_tokens, sampling_for(i), stats):
                        toks += t
                    assert stats.error is None, stats.error
                    out.append((toks, stats))
        finally:
            await runner.cleanup()
        return out, verifier.stats.snapshot()
    return asyncio.run(main())


def table_answer(prompt, n):
    out, last = [], prompt[-1]
    for _ in range(n):
        last = (last + 1) % V
        out.append(last)
    return out


SWITCHES = ("adaptive_draft", "draft_ahead", "ngram_draft", "parallel_prefill")


@pytest.mark.parametrize("on", list(itertools.product((False, True), repeat=4)))
def test_greedy_answer_is_the_targets_with_any_switches(on):
    prompts = [[1, 2, 3], [5, 9, 5, 9, 5]]
    got, _ = generate(_cfg(**dict(zip(SWITCHES, on))), prompts, 40, lambda i: SamplingParams())
    for prompt, (toks, stats) in zip(prompts, got):
        assert toks == table_answer(prompt, 40)
        assert stats.rounds > 0 and stats.accepted > 0
        assert (stats.trace[0][1] == []) == on[3]          # parallel prefill: round 0 carries no draft


def test_draft_ahead_rounds_are_kept_when_they_hold_and_dropped_on_412():
    # a slow cloud: every draft is made while the round before is in flight (the drafter is faster)
    got, cloud = generate(_cfg(adaptive_draft=False, ngram_draft=False), [[1, 2, 3]], 60,
                          lambda i: SamplingParams(), delay_ms=30.0)
    toks, stats = got[0]
    assert toks == table_answer([1, 2, 3], 60)
    assert stats.ahead_kept > 0 and stats.ahead_dropped > 0         # the drafter errs after each multiple of 7
    assert cloud["draft_ahead"]["stale"] == stats.ahead_dropped     # every dropped round was answered 412
    assert cloud["rounds"] == stats.rounds                          # ... and none was verified


def test_sampled_answers_keep_the_targets_law_with_rounds_dropped():
    """The table's law as a chain: each step is last + 1 with p1 = e^5 / (e^5 + 31), else one of the other
    31 uniformly. With every switch on (draft-ahead rounds kept and dropped), the pairs of consecutive
    steps of 100 sampled answers match that law (chi-squared)."""
    cfg = _cfg(adaptive_draft=True, draft_ahead=True, ngram_draft=True, parallel_prefill=True)
    got, cloud = generate(cfg, [[1, 2, 3]] * 100, 6, lambda i: SamplingParams(temperature=1.0, seed=i), delay_ms=12.0)
    p1 = np.exp(5) / (np.exp(5) + V - 1)
    counts = np.zeros(4)
    for toks, stats in got:
        steps = [(b - a) % V == 1 for a, b in zip([3] + toks, toks)]
        for a, b in zip(steps, steps[1:]):
            counts[2 * a + b] += 1
    q = np.array([(1 - p1) ** 2, (1 - p1) * p1, p1 * (1 - p1), p1 * p1])
    assert chisquare(counts, q * counts.sum()).pvalue > 1e-4
    assert sum(s.ahead_dropped for _, s in got) > 0 and sum(s.ahead_kept for _, s in got) > 0
    assert cloud["draft_ahead"]["stale"] == sum(s.ahead_dropped for _, s in got)


def test_speedup_vs_fixed_is_over_the_fixed_k4_row_at_the_same_link_and_dataset():
    from ablations.experiment import load_experiment
    from ablations.runner import speedup_rows
    exp = load_experiment("ablations/experiments/drafting.yaml")
    rows = [{"row": r, "link": link, "dataset": "humaneval", "per_user_tok_s": v}
            for r, link, v in [("fixed_k4", "rtt=5", 4.0), ("shipped", "rtt=5", 5.0), ("fixed_k4", "rtt=200", 2.0),
                               ("shipped", "rtt=200", 3.0), ("cloud_only", "rtt=200", None)]]
    speedup_rows(exp, rows)
    assert [r["speedup_vs_fixed"] for r in rows] == [1.0, 1.25, 1.0, 1.5, None]


def test_a_seeded_sampled_answer_does_not_depend_on_the_rounds_timing():
    """Draft randomness is keyed by the context a draft is for, not by call order: the same seed gives the
    same answer whether the cloud answers at once (ahead drafts cut short) or slowly (ahead drafts sent)."""
    cfg = _cfg(adaptive_draft=False, draft_ahead=True, ngram_draft=False, parallel_prefill=True)
    sampled = lambda i: SamplingParams(temperature=1.0, seed=7 + (i == 2))     # noqa: E731
    runs = [generate(cfg, [[1, 2, 3]] * 3, 24, sampled, delay_ms=ms)[0] for ms in (0.0, 15.0)]
    fast, slow = ([toks for toks, _ in run] for run in runs)
    assert fast[0] == fast[1] == slow[0] == slow[1] and fast[2] == slow[2] != fast[0]
