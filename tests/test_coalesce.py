"""switches.rtt_batching (issue 15, items 1-2): the coalescing policy as pure functions, the batch
envelope, the cloud's WebSocket answers coalesced per link (fewer frames on a far link, none held on a
near one), the edge link's rounds of several sessions in one frame, the user stream's pacing, the
user's RTT from TCP_INFO, and the links' RTT distribution on /stats and /metrics. Real HTTP and
WebSockets on loopback; the target is the fake table (protocol tests, no models)."""
import asyncio
import json
import socket
import struct
import time

import aiohttp
import pytest

from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.coalesce import Policy, from_config
from common.config import load_config
from common.protocol import Batch, VerifyRequest, VerifyResponse, batch_frame, unbatch
from conftest import TableBackend
from edge.link import CloudLink
from edge.sse_pacer import SsePacer
from edge.user_rtt import socket_rtt_ms

P = Policy(min_rtt_ms=100, rtt_fraction=0.5, max_wait_ms=250, sse_min_rtt_ms=300, sse_chunks=8,
           sse_far_rtt_ms=1000, sse_far_chunks=20)


# --- the policy -------------------------------------------------------------------------------------
def test_window_grows_with_rtt_up_to_the_cap():
    assert P.window_ms(None) == 0 and P.window_ms(20) == 0 and P.window_ms(99.9) == 0     # near: at once
    assert P.window_ms(100) == 50 and P.window_ms(300) == 150                              # a fraction of RTT
    assert P.window_ms(1000) == 250 and P.window_ms(5000) == 250                           # the cap
    assert P.window_ms(float("nan")) == 0


def test_wait_is_bounded_and_flushes_early_when_the_step_is_complete():
    assert P.wait_ms(20, held=3, missing=5, oldest_age_ms=0) == 0          # near link: never held
    assert P.wait_ms(300, held=1, missing=2, oldest_age_ms=0) == 150       # far: wait for the rest of the step
    assert P.wait_ms(300, held=1, missing=2, oldest_age_ms=100) == 50      # ... counted from the oldest
    assert P.wait_ms(300, held=1, missing=2, oldest_age_ms=400) == 0       # ... never past the window
    assert P.wait_ms(300, held=4, missing=0, oldest_age_ms=0) == 0         # everything is in: flush early
    assert P.wait_ms(300, held=0, missing=3, oldest_age_ms=0) == 0


def test_sse_rule_first_and_last_never_held():
    assert [P.sse_chunks_per_event(r) for r in (None, 20, 299, 300, 999, 1000, 3000)] == [1, 1, 1, 8, 8, 20, 20]
    assert P.sse_wait_ms(20, held=1, oldest_age_ms=0) == 0                 # near user: every chunk at once
    assert P.sse_wait_ms(500, held=1, oldest_age_ms=0) == 250              # far: held up to the window
    assert P.sse_wait_ms(500, held=8, oldest_age_ms=0) == 0                # a full event goes at once
    assert P.sse_wait_ms(1500, held=8, oldest_age_ms=0) == 250             # ... 20 of them above 1 s
    assert P.sse_wait_ms(500, held=3, oldest_age_ms=0, first=True) == 0
    assert P.sse_wait_ms(500, held=3, oldest_age_ms=0, last=True) == 0
    assert P.sse_wait_ms(500, held=3, oldest_age_ms=300) == 0


def test_the_switch_is_read_in_one_place():
    assert from_config(load_config()) is not None
    assert from_config(load_config(overrides={"switches.rtt_batching": False})) is None
    cfg = load_config(overrides={"coalesce.max_wait_ms": 40})
    assert from_config(cfg).window_ms(1000) == 40


# --- the batch envelope -----------------------------------------------------------------------------
def test_batch_envelope_round_trip():
    answers = [VerifyResponse(session_id=f"s{i}", seq=i, accepted=i, next_token=7, committed_len=9 + i)
               for i in range(3)]
    frame = batch_frame([a.model_dump_json() for a in answers])
    items = unbatch(json.loads(frame))
    assert [VerifyResponse.model_validate(x) for x in items] == answers
    assert Batch.model_validate(json.loads(frame)).batch == items
    one = {"session_id": "s", "seq": 0}
    assert unbatch(one) == [one] and unbatch({"batch": [one], "x": 1}) == [{"batch": [one], "x": 1}]
    with pytest.raises(ValueError):
        Batch.model_validate({"batch": []})


# --- the cloud's answers, coalesced per link ------------------------------------------------------------
def rnd(i, rtt_ms, seq=0):
    return json.dumps({"session_id": f"s{i}", "seq": seq, "base_len": 0, "append": [1, 2, 3], "draft": [4, 5],
                       "rtt_ms": rtt_ms, "rttvar_ms": rtt_ms / 10})


def with_cloud(body, **overrides):
    cfg = load_config(overrides=overrides)

    async def main():
        verifier = Verifier(TableBackend(), cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                return await body(http, url, verifier)
        finally:
            await runner.cleanup()
    return asyncio.run(main())


async def answers_of(ws, n, timeout=10.0):
    """(frames, answers) until n answers came."""
    frames, got = 0, []
    while len(got) < n:
        msg = await ws.receive(timeout=timeout)
        frames += 1
        got += unbatch(json.loads(msg.data))
    return frames, got


def ws_path(asks: bool) -> str:
    """The WebSocket of an edge with switches.rtt_batching on (it asks the cloud to coalesce) or off."""
    return "/v1/ws?coalesce=1" if asks else "/v1/ws"


@pytest.mark.parametrize("rtt_ms, batching", [(500.0, True), (20.0, True), (500.0, False)])
def test_cloud_coalesces_a_far_links_answers_and_holds_none_on_a_near_one(rtt_ms, batching):
    n = 6

    async def body(http, url, v):
        async with http.ws_connect(url + ws_path(batching)) as ws:
            t0 = time.perf_counter()
            await ws.send_str(batch_frame([rnd(i, rtt_ms) for i in range(n)]))     # one frame up, 6 rounds
            frames, got = await answers_of(ws, n)
            took_ms = (time.perf_counter() - t0) * 1e3
        assert sorted(a["session_id"] for a in got) == [f"s{i}" for i in range(n)]
        assert all(a["accepted"] == 2 for a in got)
        s = v.stats.snapshot()
        assert s["ws_frames_in"] == 1 and s["ws_messages_in"] == n and s["ws_messages_out"] == n
        assert s["ws_frames_out"] == frames
        return frames, took_ms, s["ws_held_ms"]

    frames, took_ms, held_ms = with_cloud(body)        # the cloud's own switch plays no part: the edge asks
    if not batching:
        assert frames == n                     # off: one frame per answer, as before
    elif rtt_ms >= 100:
        assert frames == 1                     # far: every round of the step in one frame, sent when all were in
        assert took_ms < 250                   # early, not at the end of the window (min(0.5 x 500, 250) ms)
    else:
        assert held_ms / frames < 20           # near: nothing waits for company (beyond the loop's own pass)


def test_a_far_answer_waits_at_most_its_window():
    """One round of the link stays in the cloud (its target call is slow): the other answers go when the
    window ends, not when it does."""
    class Slow(TableBackend):
        max_inflight = 8

        async def alogits(self, session_id, tokens, n_logits, reuse, priority, **kw):
            if session_id == "s0":
                await asyncio.sleep(1.0)
            return self.logits(session_id, tokens, n_logits, reuse)

    cfg = load_config(overrides={"coalesce.max_wait_ms": 100})

    async def main():
        verifier = Verifier(Slow(), cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http, http.ws_connect(url + ws_path(True)) as ws:
                t0 = time.perf_counter()
                await ws.send_str(batch_frame([rnd(i, 400.0) for i in range(3)]))
                first = unbatch(json.loads((await ws.receive(timeout=5)).data))
                t_first = (time.perf_counter() - t0) * 1e3
                last = unbatch(json.loads((await ws.receive(timeout=5)).data))
                return first, t_first, last
        finally:
            await runner.cleanup()
    first, t_first, last = asyncio.run(main())
    assert sorted(a["session_id"] for a in first) == ["s1", "s2"] and [a["session_id"] for a in last] == ["s0"]
    assert 90 <= t_first < 800                 # held for its window (100 ms), not for the slow round (1 s)


def test_links_rtt_distribution_on_stats_and_metrics():
    async def body(http, url, v):
        async with http.ws_connect(url + "/v1/ws") as near, http.ws_connect(url + "/v1/ws") as far:
            await near.send_str(rnd(0, 20.0))
            await far.send_str(rnd(1, 700.0))
            await answers_of(near, 1)
            await answers_of(far, 1)
            async with http.get(url + "/stats") as r:
                stats = await r.json()
            async with http.get(url + "/metrics") as r:
                metrics = await r.text()
        return stats, metrics

    stats, metrics = with_cloud(body)
    links = stats["links"]
    assert links["count"] == 2 and sorted(x["rtt_ms"] for x in links["links"]) == [20.0, 700.0]
    assert links["rtt_ms"]["p50"] == pytest.approx(360.0)
    assert {x["rttvar_ms"] for x in links["links"]} == {2.0, 70.0}
    assert stats["frontend_cpu_s"] > 0 and stats["process_cpu_s"] >= stats["frontend_cpu_s"]
    assert "tandem_links 2.0" in metrics
    assert 'tandem_link_rtt_ms_bucket{le="20.0"} 1.0' in metrics
    assert 'tandem_link_rtt_ms_bucket{le="500.0"} 1.0' in metrics and 'tandem_link_rtt_ms_bucket{le="1000.0"} 2.0' in metrics
    assert 'tandem_link_health_factor_bucket{le="0.3"} 1.0' in metrics    # exp(-700/500) = 0.25


# --- the edge link: rounds of several sessions in one frame ---------------------------------------------
@pytest.mark.parametrize("batching", [True, False])
def test_edge_link_sends_rounds_ready_together_in_one_frame(batching):
    cfg = load_config(overrides={"switches.rtt_batching": batching, "edge.request_timeout_s": 5.0})

    async def body(http, url, v):
        async with CloudLink(url, cfg.edge, from_config(cfg)) as link:
            # as reported by a far edge: the cloud holds the answers until all four are in (if the edge asked)
            reqs = [VerifyRequest.model_validate_json(rnd(i, 500.0)) for i in range(4)]
            out = await asyncio.gather(*(link.verify(r) for r in reqs))
            assert [r.accepted for r, _ in out] == [2] * 4
            f = link.snapshot()
            assert f["rounds_out"] == 4 and f["answers_in"] == 4
            assert v.stats.links and all(x.rttvar_ms is not None for x in v.stats.links.values())
            return f["frames_out"], f["frames_in"]

    frames_out, frames_in = with_cloud(body)
    assert frames_out == (1 if batching else 4)
    assert frames_in == (1 if batching else 4)       # the edge asked for coalesced answers (?coalesce=1), or not


def test_edge_link_measures_rtt_by_websocket_ping_when_idle():
    cfg = load_config(overrides={"edge.rtt_probe_interval_s": 0.05})

    async def body(http, url, v):
        async with CloudLink(url, cfg.edge, from_config(cfg)) as link:
            assert link.transport == "ws"
            n0 = link.rtt.samples
            await asyncio.sleep(0.5)
            assert link.rtt.samples > n0 and link.rtt_ms < 100
    with_cloud(body)


# --- the user's stream ---------------------------------------------------------------------------------
def pace(policy, rtt, n, gap_s=0.0):
    events = []

    async def write(spans):
        events.append(list(spans))

    async def main():
        pacer = SsePacer(policy, rtt, write)
        for i in range(n):
            await pacer.add([i])
            if gap_s:
                await asyncio.sleep(gap_s)
        await pacer.close()
        return pacer
    pacer = asyncio.run(main())
    return events, pacer


def test_sse_pacing_by_the_users_rtt():
    events, _ = pace(P, 20.0, 10)
    assert events == [[i] for i in range(10)]                              # near: every chunk at once
    events, pacer = pace(P, 500.0, 10)
    assert events == [list(range(8)), [8, 9]]                              # 8 a time; the last never held
    assert pacer.figures()["events"] == 3                                  # + the first chunk, sent by the caller
    events, _ = pace(P, 1500.0, 25)
    assert [len(e) for e in events] == [20, 5]
    events, _ = pace(None, 1500.0, 5)
    assert events == [[i] for i in range(5)]                               # switch off


def test_sse_no_chunk_waits_past_its_window():
    quick = Policy(sse_min_rtt_ms=300, sse_chunks=8, rtt_fraction=0.5, max_wait_ms=30)
    events, _ = pace(quick, 500.0, 3, gap_s=0.1)                           # chunks 100 ms apart, window 30 ms
    assert events == [[0], [1], [2]]


# --- the user's RTT from the kernel --------------------------------------------------------------------
def test_tcp_info_rtt_offset():
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    try:
        for _ in range(5):
            c.sendall(b"x" * 100)
            a.recv(1000)
            a.sendall(b"y")
            c.recv(10)
        raw = a.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        state, rto_us = raw[0], struct.unpack_from("I", raw, 8)[0]
        assert state == 1 and rto_us >= 200_000           # ESTABLISHED; Linux's RTO floor: the layout is right
        rtt = socket_rtt_ms(a)
        assert rtt == pytest.approx(struct.unpack_from("I", raw, 68)[0] / 1e3, abs=1.0)
        assert 0 < rtt < 50                                 # loopback: microseconds
        assert socket_rtt_ms(None) is None
    finally:
        for s in (a, c, srv):
            s.close()


def test_hold_quantiles_from_counts():
    from common.coalesce import HOLD_BUCKETS_MS, hold_bucket, hold_quantile_ms
    counts = [0] * len(HOLD_BUCKETS_MS)
    assert hold_quantile_ms(counts, 0.5) is None
    for ms in (0.01, 0.02, 0.03, 150.0):
        counts[hold_bucket(ms)] += 1
    assert hold_quantile_ms(counts, 0.5) <= 0.05           # most waited nothing
    assert 100 <= hold_quantile_ms(counts, 0.99) <= 200


def test_runner_link_figures():
    from ablations.runner import link_figures
    from common.coalesce import HOLD_BUCKETS_MS, hold_bucket
    holds = [0] * len(HOLD_BUCKETS_MS)
    holds[hold_bucket(0.01)] = 10
    cloud = {"ws_frames_out": 5, "ws_messages_out": 20, "ws_frames_in": 10, "ws_messages_in": 20,
             "ws_bytes_in": 3000, "ws_bytes_out": 1000, "frontend_cpu_s": 0.004, "ws_hold_counts": holds}
    f = link_figures(cloud, {"tokens": 80, "hold_counts": []})
    assert f["frames_per_round"] == 0.25 and f["frames_per_round_up"] == 0.5
    assert f["bytes_per_token"] == 50 and f["frames_per_token"] == 15 / 80 and f["cpu_us_per_round"] == 200
    assert f["hold_ms_p50"] <= 0.05 and f["hold_ms_p50_up"] is None and f["added_ms_p50"] == f["hold_ms_p50"]
    assert link_figures(None, None)["frames_per_round"] is None


def test_a_frame_does_not_wait_in_vain():
    assert P.wait_ms(300, held=1, missing=3, oldest_age_ms=0, next_in_ms=None) == 150
    assert P.wait_ms(300, held=1, missing=3, oldest_age_ms=0, next_in_ms=40) == 150     # company is due: wait
    assert P.wait_ms(300, held=1, missing=3, oldest_age_ms=100, next_in_ms=80) == 0     # due after the window
    assert P.wait_ms(300, held=1, missing=3, oldest_age_ms=0, next_in_ms=400) == 0      # a serial cloud's gap


def test_a_frame_waits_for_the_rest_of_a_computed_step():
    """Answers whose target work is done (due) come within ms: a frame waits for them, within the window,
    however far off the next step is; never on a near link."""
    assert P.wait_ms(1000, held=1, missing=3, oldest_age_ms=0, next_in_ms=3000, due=2) == 250
    assert P.wait_ms(1000, held=1, missing=3, oldest_age_ms=240, next_in_ms=3000, due=2) == 10
    assert P.wait_ms(1000, held=1, missing=3, oldest_age_ms=300, next_in_ms=3000, due=2) == 0
    assert P.wait_ms(1000, held=1, missing=3, oldest_age_ms=0, next_in_ms=3000, due=0) == 0
    assert P.wait_ms(20, held=1, missing=3, oldest_age_ms=0, next_in_ms=None, due=2) == 0


@pytest.mark.parametrize("due", [True, False])
def test_coalescer_holds_a_steps_answers_that_are_due(due):
    """A step's answers finished 5 ms apart while the link's next step is seconds off: one frame when the
    cloud knows they are due, three without (the first goes alone: the rule before `due`)."""
    from common.coalesce import Coalescer
    frames = []

    async def send(text, messages, held_ms):
        frames.append(messages)

    async def main():
        state = {"missing": 5, "due": 3 if due else 0}
        c = Coalescer(P, send, lambda: 1000.0, lambda: state["missing"], batch_frame, "t",
                      lambda: 3000.0, lambda: state["due"])
        for i in range(3):
            state["missing"] -= 1
            state["due"] = max(0, state["due"] - 1)
            c.put(json.dumps({"i": i}))
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        while c.pending:
            await asyncio.sleep(0.001)
        await c.close()
        return (time.perf_counter() - t0) * 1e3
    took_ms = asyncio.run(main())
    assert frames == ([3] if due else [1, 1, 1])
    assert took_ms < 50                        # flushed when the step was in, not at the window's end


def test_batched_cloud_sends_a_batchs_answers_in_one_frame_however_slowly_they_are_finished():
    """switches.batched_verify with the link's next batch far off: the answers of one batch, finished a few
    ms apart (as acceptance over a real vocabulary takes on a busy CPU), still share one frame."""
    from test_verify_batcher import BatchTable
    cfg = load_config(overrides={"switches.batched_verify": True})

    class Slow(BatchTable):
        def logits_many(self, calls):
            time.sleep(0.4)
            return super().logits_many(calls)

    class SlowFinish(Verifier):
        async def verify(self, req, client=None):
            resp = await super().verify(req, client)
            await asyncio.sleep(0.004 * int(req.session_id[1:]))
            return resp

    async def main():
        verifier = SlowFinish(Slow(), cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http, http.ws_connect(url + ws_path(True)) as ws:
                await ws.send_str(rnd(0, 1000.0))
                await asyncio.sleep(0.05)
                await ws.send_str(batch_frame([rnd(i, 1000.0) for i in range(1, 6)]))   # batches [s0], [s1..s5]
                frames = []
                while sum(len(f) for f in frames) < 6:
                    frames.append(sorted(a["session_id"] for a in unbatch(json.loads((await ws.receive(timeout=5)).data))))
                return frames, verifier.batcher.batches
        finally:
            await runner.cleanup()
    frames, batches = asyncio.run(main())
    assert batches == 2
    assert frames == [["s0"], ["s1", "s2", "s3", "s4", "s5"]]


def test_cadence_counts_a_step_as_one_burst():
    from common.coalesce import Cadence
    c = Cadence()
    c.item(True, step=1)
    time.sleep(0.05)
    c.item(True, step=2)
    gap = c.gap_ms
    assert 20 < gap < 200
    time.sleep(0.01)
    c.item(True, step=2)               # 10 ms later, the same step: no gap
    assert c.gap_ms == gap


def test_cadence():
    from common.coalesce import Cadence
    c = Cadence()
    assert c.next_in_ms() is None
    c.item(True)
    time.sleep(0.05)
    c.item(True)
    assert 20 < c.gap_ms < 200 and c.next_in_ms() <= c.gap_ms
    gap = c.gap_ms
    c.item(True)
    c.item(True)                       # the same step's answers: one burst, no gap of 0
    assert c.gap_ms == gap
    c.item(False)                      # nothing more outstanding: the silence that follows is no gap
    assert c.next_in_ms() is None


@pytest.mark.parametrize("batching", [True, False])
def test_in_engine_step_answers_share_a_frame(batching):
    """An in-engine cloud (the real DraftBoard, a simulated engine) answers a step's rounds together: with
    the switch on, the 8 sessions of one far link get their step's answers in one frame."""
    from cloud.backends.simulated_engine import SimulatedEngine, target_token
    cfg = load_config(overrides={"switches.rtt_batching": batching})
    n = 8

    def nxt(last):
        return target_token(None, last, 1000)

    async def main():
        backend = SimulatedEngine(step_s=0.02)
        verifier = Verifier(backend, cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http, http.ws_connect(url + ws_path(batching)) as ws:
                first = [{"session_id": f"s{i}", "seq": 0, "base_len": 0, "append": [10 * i + 1, 10 * i + 2],
                          "draft": [nxt(10 * i + 2)], "rtt_ms": 500.0} for i in range(n)]
                await ws.send_str(batch_frame([json.dumps(r) for r in first]))
                _, got = await answers_of(ws, n)
                held = {a["session_id"]: a for a in got}
                second = []
                for i, r in enumerate(first):
                    a = held[f"s{i}"]
                    ctx = r["append"] + r["draft"][:a["accepted"]] + [a["next_token"]]
                    second.append({"session_id": f"s{i}", "seq": 1, "base_len": len(ctx),
                                   "draft": [nxt(ctx[-1])], "rtt_ms": 500.0})
                await ws.send_str(batch_frame([json.dumps(r) for r in second]))
                frames, got = await answers_of(ws, n)
                assert all(a["accepted"] == 1 for a in got), got
                return frames
        finally:
            await runner.cleanup()
            backend.close()
    frames = asyncio.run(main())
    assert frames == 1 if batching else frames == n


def test_batching_experiments_start_one_cloud_for_on_and_off():
    """The switch is the edge's (it asks the cloud on /v1/ws?coalesce=1), so rtt_batching on and off share one
    cloud: the GPU experiment starts vLLM once, its cells one at a time on one 2-core edge lane."""
    from pathlib import Path
    from ablations import runner
    from ablations.experiment import cells, cloud_side, load_experiment, parse_cpus
    assert not cloud_side("switches.rtt_batching") and cloud_side("coalesce.max_wait_ms")
    for name in ("rtt_batching", "gpu_rtt_batching"):
        exp = load_experiment(Path(f"ablations/experiments/{name}.yaml"))
        todo = cells(exp)
        assert len(todo) == 6 and len(runner.waves(todo)) == 1
        assert sorted(c.rtt_ms for c in todo if c.row == "batching_on") == [20, 300, 1000]
    assert exp.base["cloud.backend"] == "vllm" and exp.base["cloud.vllm.frontends"] == 1
    assert [len(parse_cpus(e)) for e in exp.device.cpus.edges] == [2] and exp.base["draft.n_threads"] == 2
