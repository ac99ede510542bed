"""The engine-in-a-child-process boundary (cloud/backends/vllm_engine_process.py) over real HTTP and a
real Pipe, with the fake engine of test_engine_path in the child (protocol test; the GPU run uses vLLM)."""
import asyncio

import test_engine_path as engine_path
from cloud.backends.vllm_engine_process import VllmEngineProcess
from common.config import load_config
from test_engine_path import FakeEngineBackend, verify


def fake_engine(gguf, cfg, n_ctx, cache, abort_at=-1):
    backend = FakeEngineBackend(abort_at=abort_at)
    backend.max_inflight = 64
    return backend


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
