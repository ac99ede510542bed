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
