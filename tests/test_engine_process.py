"""The engine-in-a-child-process boundary (cloud/backends/vllm_engine_process.py) over real HTTP and a
real Pipe, with the fake engine of test_engine_path in the child (protocol test; the GPU run uses vLLM)."""
import asyncio

import test_engine_path as engine_path
from cloud.backends.vllm_engine_process import VllmEngineProcess
from common.config import load_config
from cloud.backends.simulated_engine import SimulatedEngine
from test_engine_path import verify


def fake_engine(gguf, cfg, n_ctx, cache, abort_at=-1):
    return SimulatedEngine(abort_at=abort_at)


def fake_engine_aborting(gguf, cfg, n_ctx, cache):
    return fake_engine(gguf, cfg, n_ctx, cache, abort_at=1)


def run(factory, body):
    backend = VllmEngineProcess(None, load_config().cloud.vllm, 512, factory=factory)
    try:
        return engine_path.run(backend, body)
    finally:
        backend.close()
        assert not backend._proc.is_alive()


def test_rounds_cross_the_process_boundary_in_batches():
    async def body(http, url):
        st, r = await verify(http, url, seq=0, base_len=0, append=[1, 2, 3], draft=[4, 5, 9])
        assert st == 200 and (r["accepted"], r["next_token"], r["committed_len"]) == (2, 6, 6)
        st, r = await verify(http, url, seq=1, base_len=6, append=[], draft=[7, 8])
        assert (r["accepted"], r["next_token"], r["committed_len"]) == (2, 9, 9)

        async def session(i):          # many sessions at once: their rounds share pipe writes
            sid, base, ctx, got = f"p{i}", 0, [50 * i + 1], []
            for seq in range(5):
                last = ctx[-1]
                async with http.post(url + "/v1/verify", json={"session_id": sid, "seq": seq, "base_len": base,
                                                               "append": ctx[base:], "draft": [last + 1, last + 7]}) as resp:
                    r = await resp.json()
                assert r["accepted"] == 1 and r["next_token"] == last + 2
                ctx += [last + 1, last + 2]
                base = r["committed_len"]
                got.append(r["committed_len"])
            return got
        results = await asyncio.gather(*[session(i) for i in range(20)])
        assert all(g == [3, 5, 7, 9, 11] for g in results)
    run(fake_engine, body)


def test_session_ended_in_the_child_is_a_409_in_the_parent():
    async def body(http, url):
        st, r = await verify(http, url, seq=0, base_len=0, append=[1, 2, 3], draft=[4])
        assert st == 200
        st, r = await verify(http, url, seq=1, base_len=5, append=[], draft=[6])
        assert st == 409 and "base_len" in r["error"]
        st, r = await verify(http, url, seq=2, base_len=0, append=[1, 2, 3, 4, 5], draft=[6, 7])
        assert st == 200 and (r["accepted"], r["next_token"]) == (2, 8)
    run(fake_engine_aborting, body)


def test_a_session_moves_between_frontends_without_a_fresh_request():
    """Two front ends' pipes into one engine process. A round re-synced through the other front end
    goes on in the same engine request; an expiry from the front end that lost the session is ignored,
    one from its owner drops the request."""
    from cloud.backends.vllm_engine_process import EngineClient
    from common.protocol import SamplingParams
    cfg = load_config(overrides={"cloud.vllm.frontends": 2}).cloud.vllm
    engine = VllmEngineProcess(None, cfg, 512, factory=fake_engine)
    other = EngineClient(engine.frontend_conns[0], engine.hello)
    sp = SamplingParams()

    async def body():
        assert await engine.averify("s", [1, 2, 3], [4, 5, 9], sp, None, True) == (2, 6, 0)
        assert await other.averify("s", [1, 2, 3, 4, 5, 6], [7, 8], sp, None, True) == (2, 9, 6)   # held: same request
        engine.expire("s")                      # stale: 'other' sent the last round
        assert await other.averify("s", list(range(1, 10)), [10], sp, None, True) == (1, 11, 9)
        other.expire("s")                       # the owner: the request goes
        assert (await other.averify("s", list(range(1, 12)), [12], sp, None, True))[2] == 0
    try:
        asyncio.run(asyncio.wait_for(body(), 30))
    finally:
        engine.close()


def test_frontend_processes_share_the_port_and_sessions_resync_across_them():
    """cloud.vllm.frontends = 3 through CloudNode: connections spread over the processes; a client that
    opens a new connection every round keeps landing on other front ends and re-syncs (409), and its
    rounds still come out right."""
    import aiohttp
    from cloud.node import CloudNode
    cfg = load_config(overrides={"cloud.backend": "vllm", "cloud.port": 0, "cloud.vllm.frontends": 3})

    async def main():
        node = await CloudNode.start(cfg, backend=VllmEngineProcess(None, cfg.cloud.vllm, 512, factory=fake_engine))
        try:
            pids = set()
            for _ in range(30):
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                    async with http.get(node.url + "/health") as r:
                        pids.add((await r.json())["frontend_pid"])
            assert len(pids) > 1
            ctx, base_len, resyncs = [1, 2, 3], 0, 0
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                for seq in range(12):
                    last = ctx[-1]
                    while True:
                        body = {"session_id": "hop", "seq": seq, "base_len": base_len, "append": ctx[base_len:],
                                "draft": [last + 1, last + 2, last + 9]}
                        async with http.post(node.url + "/v1/verify", json=body) as r:
                            data = await r.json()
                        if r.status == 409:
                            base_len, resyncs = 0, resyncs + 1
                            continue
                        break
                    assert r.status == 200 and (data["accepted"], data["next_token"]) == (2, last + 3), data
                    ctx += [last + 1, last + 2, last + 3]
                    base_len = data["committed_len"]
                    assert base_len == len(ctx)
            assert resyncs > 0
        finally:
            await node.close()
    asyncio.run(asyncio.wait_for(main(), 120))


def test_engine_port_posts_held_rounds_on_the_engine_thread_and_forwards_the_rest_in_order():
    """EnginePort (the engine thread's side of the pipes): held rounds are handled on the thread that
    waits, the rest are forwarded in arrival order; its own sends wait for its flush; a wait ends at
    its timeout, on a message, or when the board's waker is set."""
    import multiprocessing as mp
    import threading
    import time
    from cloud.backends.draft_board import Waker
    from cloud.backends.vllm_engine_process import EnginePort, _Wire

    async def main():
        (a0, b0), (a1, b1) = mp.Pipe(), mp.Pipe()
        wires = [_Wire(b0, None), _Wire(b1, None)]
        for w in wires:
            w.attach(read=False)
        wake, local, forwarded = Waker(), [], []

        def on_local(i, msg):
            if msg[0] != "verify_held":
                return False
            local.append((i, msg[1], threading.get_ident()))
            wires[i].send(("ok", msg[1], "answer"))         # as held_round does: waits for the flush
            return True
        port = EnginePort(wires, wake, on_local, lambda i, m: forwarded.append((i, m[0], m[1])), busy_s=0.02)
        engine_thread = {}

        def engine():
            engine_thread["id"] = threading.get_ident()
            t0 = time.monotonic()
            port.wait(0.2)                                  # nothing there: ends at the timeout
            engine_thread["idle"] = time.monotonic() - t0
            a0.send([("stats", 1), ("verify_held", 2, "s", 5, [1], None, 0.0), ("drop", "s")])
            a1.send([("verify_held", 3, "t", 5, [1], None, 0.0)])
            time.sleep(0.05)
            port.wait(5.0)                                  # both pipes are ready: ends at once
            threading.Timer(0.05, wake.set).start()
            t0 = time.monotonic()
            port.wait(5.0)                                  # the waker ends it
            engine_thread["woken"] = time.monotonic() - t0
        await asyncio.to_thread(engine)
        assert 0.15 < engine_thread["idle"] < 2.0 and engine_thread["woken"] < 2.0
        assert [(i, rid) for i, rid, _ in local] == [(0, 2), (1, 3)]
        assert all(tid == engine_thread["id"] for _, _, tid in local)
        assert forwarded == [(0, "stats", 1), (0, "drop", "s")]
        assert a0.poll(1) and a0.recv() == [("ok", 2, "answer")]   # flushed by the wait that posted it
        assert a1.poll(1) and a1.recv() == [("ok", 3, "answer")]
        wake.close()
    asyncio.run(main())


def test_busy_poll_keeps_the_loop_polling_for_its_window_only():
    from common.busy_poll import BusyPoll

    async def main():
        busy = BusyPoll(0.1)
        busy.poke()
        assert busy.task is not None
        await asyncio.sleep(0.05)
        assert busy.task is not None and not busy.task.done()
        await asyncio.sleep(0.2)
        assert busy.task is None                        # the window passed: the loop sleeps again
        off = BusyPoll(0.0)
        off.poke()
        assert off.task is None
    asyncio.run(main())
