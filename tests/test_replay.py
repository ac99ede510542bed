"""The population's light clients (ablations/replay.py): the RTT mixture sampler, and a replayed user's
metrics against a scripted fake cloud (TableBackend: argmax = last token + 1) behind the link emulator,
over real sockets. Fast: no models."""
import asyncio
import time

import numpy as np
import pytest

from ablations import bench, replay
from ablations.bench import RequestOutput, compute_metrics
from ablations.linkemu import LinkEmulator, LinkProfile
from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import load_config
from tests.conftest import TableBackend


def test_rtt_mixture_is_seeded_clipped_and_shared_as_its_components():
    a, b = replay.sample_rtts(20000, seed=3), replay.sample_rtts(20000, seed=3)
    assert a == b and a != replay.sample_rtts(20000, seed=4)
    assert min(a) >= replay.RTT_FLOOR_MS and min(a) == replay.RTT_FLOOR_MS      # N(20, 10) reaches below 1 ms
    classes = [bench.rtt_class_of(x) for x in a]
    shares = {c: classes.count(c) / len(a) for c in bench.RTT_CLASSES}
    # each class is one component of the mixture: 50 / 40 / 9 / 1 % (binomial sd at most 0.35 %)
    assert shares["very_good"] == pytest.approx(0.50, abs=0.015)
    assert shares["good"] == pytest.approx(0.40, abs=0.015)
    assert shares["bad"] == pytest.approx(0.09, abs=0.008)
    assert shares["very_bad"] == pytest.approx(0.01, abs=0.004)
    assert np.median([x for x in a if x >= 1100]) == pytest.approx(2000, abs=120)


def test_draft_plan_recorded_and_pattern():
    s = {"prompt": [1], "fallback": [4, 5, 6, 7, 8, 9], "trace": {"0": [[4, 5, 9], 30.0], "3": [[7, 8], 50.0]},
         "accepted": {"0": [3, 2], "3": [2, 2]}}
    rec = replay.draft_plan(s, "recorded")
    assert rec(0, []) == ([4, 5, 9], 30.0)
    assert rec(3, [4, 5, 6]) == ([7, 8], 50.0)
    assert rec(3, [4, 5, 1]) == ([7, 8, 9], 50.0)            # off the recorded answer: the reference's tokens
    pat = replay.draft_plan(s, "pattern")
    assert pat(0, []) == ([4, 5, 6 ^ 1], 30.0)                # 3 drafted, 2 accepted: the 3rd is wrong
    assert pat(1, [4])[1] == 50.0                             # no round recorded there: the typical round's ms


TRACE = {"id": "t/0", "set": "humaneval", "prompt": [1, 2, 3], "fallback": [4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
         # three rounds: 2 of 3 accepted, 4 of 4, 1 of 2 (the fake target answers last + 1)
         "trace": {"0": [[4, 5, 9], 30.0], "3": [[7, 8, 9, 10], 40.0], "8": [[12, 0], 20.0]},
         "accepted": {"0": [3, 2], "3": [4, 4], "8": [2, 1]}}
RTT_MS = 100.0


def with_cloud(table_backend, body):
    cfg = load_config()

    async def main():
        verifier = Verifier(table_backend, cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        host, port = url.removeprefix("http://").split(":")
        try:
            async with LinkEmulator(host, int(port), LinkProfile(rtt_ms=RTT_MS)) as link:
                return await body(link.url, verifier)
        finally:
            await runner.cleanup()
    return asyncio.run(main())


def user(url, system, **kw):
    return {**TRACE, "uid": f"u-{system}", "sid": f"s-{system}", "url": url, "system": system, "arrival_s": 0.6,
            "rtt_ms": RTT_MS, "rtt_class": "good", "max_tokens": 10, "timing": "cpu2", "drafts": "recorded",
            "transport": "ws", **kw}


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_replayed_user_gets_the_metrics_of_a_real_one(table_backend, transport):
    async def body(url, verifier):
        return await replay.run_users_here([user(url, "tandem", transport=transport), user(url, "plain")],
                                           time.perf_counter())
    tandem, plain = with_cloud(table_backend, body)
    assert tandem["tokens"] == plain["tokens"] == TRACE["fallback"]
    o = RequestOutput(**tandem["output"])
    assert o.success and o.chunk_tokens == [3, 5, 2] and o.output_tokens == 10
    assert o.figures["rounds"] == 3 and (o.figures["drafted"], o.figures["accepted"]) == (9, 7)
    rtt_s = RTT_MS / 1e3                                  # each round: its draft ms, then one RTT at least
    assert o.ttft >= 0.030 + rtt_s and o.itl[0] >= 0.040 + rtt_s and o.itl[1] >= 0.020 + rtt_s
    assert o.ttft < 0.030 + rtt_s + 0.25                  # a busy 2-core machine: generous, not unbounded
    assert o.start_time == pytest.approx(0.6, abs=0.05) and o.client_queue_time == 0
    assert tandem["cloud_times"] == pytest.approx([t - rtt_s / 2 for t in o.chunk_times])
    assert o.figures["rtt_ms"] == pytest.approx(RTT_MS, abs=60)   # measured over the link, as the edge does
    p = RequestOutput(**plain["output"])
    assert p.success and p.chunk_tokens == [1] * 10 and p.figures["mode"] == "cloud_only" and p.ttft >= rtt_s
    m = compute_metrics([o, p], 2.0)                      # bench's own metric code: the same tables as real users
    g = m["tandem"]["per_rtt_class"]["good"]
    assert g["completed"] == 2 and m["tandem"]["tau"] == pytest.approx(10 / 3)
    assert m["median_ttft_ms"] == pytest.approx(1e3 * np.median([o.ttft, p.ttft]))


def test_replayed_user_resyncs_after_409(table_backend):
    async def body(url, verifier):
        u = user(url, "tandem", trace={k: [d, 150.0] for k, (d, _) in TRACE["trace"].items()})
        task = asyncio.ensure_future(replay.run_users_here([u], time.perf_counter()))
        while not verifier.sessions.get(u["sid"]) or verifier.sessions[u["sid"]].last_seq < 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)                         # round 0 answered; round 1 is being drafted
        assert verifier.drop(u["sid"])                    # the cloud forgets it: the next round gets 409
        return (await task)[0]
    r = with_cloud(table_backend, body)
    assert r["tokens"] == TRACE["fallback"] and r["output"]["success"]
    assert r["output"]["figures"]["resyncs"] == 1 and r["output"]["figures"]["rounds"] == 3


def test_a_user_cut_at_its_deadline_counts_what_it_got_and_frees_its_session(table_backend):
    async def body(url, verifier):
        u = user(url, "tandem", deadline_s=0.5, trace={k: [d, 200.0] for k, (d, _) in TRACE["trace"].items()})
        got = (await replay.run_users_here([u], time.perf_counter()))[0]
        await asyncio.sleep(0.3)                          # the DELETE crosses the link
        return got, u["sid"] in verifier.sessions
    r, still_there = with_cloud(table_backend, body)
    o = RequestOutput(**r["output"])
    assert o.finish_reason == "deadline" and o.success and 0 < o.output_tokens < 10
    assert o.latency == 0.5 and o.chunk_times[-1] < 0.5 and not still_there


def test_draft_plan_guess_is_the_recorded_one_else_the_reference_token_after_the_draft():
    s = {"prompt": [1], "fallback": [4, 5, 6, 7, 8, 9], "trace": {"0": [[4, 5, 9], 30.0], "3": [[7, 8], 50.0]},
         "accepted": {"0": [3, 2], "3": [2, 2]}, "guess": {"3": 30}}
    rec = replay.draft_plan(s, "recorded")
    assert rec.guess(3, [7, 8], [4, 5, 6]) == 30              # the drafter's recorded guess (trace_guesses.py)
    assert rec.guess(0, [4, 5, 9], []) == 7                  # none recorded: the reference's token after the draft
    assert rec.guess(4, [8, 9], [4, 5, 6, 7]) is None          # the answer ends within the draft
    pat = replay.draft_plan(s, "pattern")                      # right exactly when the round accepts all (a == L)
    assert pat.guess(3, pat(3, [])[0], []) == 9 and pat.guess(0, pat(0, [])[0], []) == 7
    # ... and, where the trace has guesses, the recorded guess after that round held (at 3 it was 30, not 9)
    assert replay.guess_hits(s) == {"0": False, "3": False}
    assert replay.guess_hits({**s, "guess": {"3": 9}}) == {"0": False, "3": True}
    pat = replay.draft_plan({**s, "guess_hit": replay.guess_hits(s)}, "pattern")
    assert pat.guess(3, pat(3, [])[0], []) == 9 ^ 1 and pat.guess(0, pat(0, [])[0], []) == 7 ^ 1


class SlowTable(TableBackend):
    """The table target, 0.2 s per call: a round sent ahead reaches the cloud while the one before verifies."""

    def logits(self, *a, **kw):
        time.sleep(0.2)
        return super().logits(*a, **kw)


def logged(verifier):
    """Record each verify request at the cloud: (arrival, done, seq, draft, guess, status)."""
    log, verify = [], verifier.verify

    async def wrapped(req, **kw):
        t, status = time.perf_counter(), 200
        try:
            return await verify(req, **kw)
        except Exception as e:
            status = getattr(e, "status", 500)
            raise
        finally:
            log.append((t, time.perf_counter(), req.seq, list(req.draft), req.guess, status))
    verifier.verify = wrapped
    return log


def test_parallel_prefill_and_draft_ahead_replay_as_the_edge_makes_them():
    # round 0 recorded with 0.5 s of drafting (the edge's prefill in it); the others 40 and 20 ms
    trace = {"0": [[4, 5, 9], 500.0], "3": [[7, 8, 9, 10], 40.0], "8": [[12, 0], 20.0]}

    async def body(url, verifier):
        log = logged(verifier)
        epoch = time.perf_counter()
        u = user(url, "tandem", trace=trace, parallel_prefill=True, draft_ahead=True)
        got = (await replay.run_users_here([u], epoch))[0]
        return got, log, epoch + u["arrival_s"], verifier.stats.stale_rounds
    r, log, start, stale = with_cloud(SlowTable(), body)
    o = RequestOutput(**r["output"])
    assert r["tokens"] == TRACE["fallback"] and o.success
    log.sort()
    t0, _, seq0, draft0, guess0, _ = log[0]
    # round 0: the prompt alone, sent at once (one way is RTT/2), not after round 0's 0.5 s of drafting
    assert (seq0, draft0, guess0) == (0, [], None) and t0 - start < 0.25
    assert o.ttft < 0.5                                     # the target's first token before the edge's draft is done
    # the first drafted round: the recorded round 0 after its first token (the drafter's guess of token 0, right
    # here, so it is sent as drafted), its 0.5 s counted from round 0's send
    first = next(x for x in log if x[2] == 1)
    assert first[3:5] == ([5, 9], None) and first[0] - start >= 0.5
    # rounds sent ahead (with a guess) reach the cloud while the round before is verifying: sent before its answer
    ahead = [x for x in log if x[4] is not None]
    assert [(x[2], x[4], x[5]) for x in ahead] == [(2, 7, 412), (3, 11, 200)]
    for x in ahead:
        before = next(y for y in log if y[2] == x[2] - 1 and y[5] == 200)
        assert x[0] < before[1]
    # the 412'd one (round 1 accepted 1 of 2) is drafted afresh: round 2 again, as a plain round, after the 412
    again = next(x for x in log if x[2] == 2 and x[4] is None)
    assert again[3] == [7, 8, 9, 10] and again[0] > ahead[0][1]
    assert stale == 1
    f = o.figures
    assert (f["rounds"], f["drafted"], f["accepted"], f["ahead_kept"], f["ahead_dropped"]) == (4, 8, 6, 1, 1)
    assert o.chunk_tokens == [1, 2, 5, 2]


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_pattern_drafts_with_draft_ahead_keep_the_round_after_a_fully_accepted_one(transport):
    async def body(url, verifier):
        log = logged(verifier)
        u = user(url, "tandem", drafts="pattern", draft_ahead=True, transport=transport)
        return (await replay.run_users_here([u], time.perf_counter()))[0], log
    r, log = with_cloud(SlowTable(), body)
    assert r["tokens"] == TRACE["fallback"] and r["output"]["success"]
    # round 0 accepts 2 of 3: the round drafted after it is refused; round 1 accepts 4 of 4: the next is kept
    assert sorted((x[2], x[4], x[5]) for x in log if x[4] is not None) == [(1, 7, 412), (2, 11, 200)]
    f = r["output"]["figures"]
    assert (f["rounds"], f["ahead_kept"], f["ahead_dropped"]) == (3, 1, 1) and not f["parallel_prefill"]
