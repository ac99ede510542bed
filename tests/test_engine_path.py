"""The verifier's engine-side path (the in-engine vLLM design) over real HTTP, with the real DraftBoard
and a simulated engine whose target predicts last+1 (protocol test; the GPU run uses vLLM itself)."""
import asyncio

import aiohttp

from cloud.backends.simulated_engine import SimulatedEngine
from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import load_config


def run(backend, body):
    cfg = load_config()

    async def main():
        verifier = Verifier(backend, cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                return await asyncio.wait_for(body(http, url), 60)   # a stuck round fails, not hangs
        finally:
            await runner.cleanup()
            backend.close()
    return asyncio.run(main())


async def verify(http, url, **kw):
    async with http.post(url + "/v1/verify", json={"session_id": "s", "draft": [1]} | kw) as r:
        return r.status, await r.json()


def test_rounds_through_the_engine_path():
    backend = SimulatedEngine()

    async def body(http, url):
        st, r = await verify(http, url, seq=0, base_len=0, append=[1, 2, 3], draft=[4, 5, 9])
        assert st == 200 and (r["accepted"], r["next_token"], r["committed_len"]) == (2, 6, 6)
        st, r = await verify(http, url, seq=1, base_len=6, append=[], draft=[7, 8])
        assert (r["accepted"], r["next_token"], r["committed_len"]) == (2, 9, 9)
        st, r = await verify(http, url, seq=1, base_len=6, append=[], draft=[7, 8])   # a retry: replayed
        assert (r["accepted"], r["next_token"]) == (2, 9)
        st, r = await verify(http, url, seq=2, base_len=9, append=[], draft=[3])
        assert (r["accepted"], r["next_token"]) == (0, 10)
    run(backend, body)
    assert backend.steps == 3            # one engine step per computed round: the retry computed nothing


def test_engine_request_ending_mid_round_is_a_409_then_resync_works():
    backend = SimulatedEngine(abort_at=1)

    async def body(http, url):
        st, r = await verify(http, url, seq=0, base_len=0, append=[1, 2, 3], draft=[4])
        assert st == 200 and (r["accepted"], r["next_token"]) == (1, 5)
        st, r = await verify(http, url, seq=1, base_len=5, append=[], draft=[6])
        assert st == 409 and "base_len" in r["error"]                     # the edge re-syncs from here
        st, r = await verify(http, url, seq=2, base_len=0, append=[1, 2, 3, 4, 5], draft=[6, 7])
        assert st == 200 and (r["accepted"], r["next_token"], r["committed_len"]) == (2, 8, 8)
    run(backend, body)


def test_accepted_pads_keep_the_session_in_its_engine_request():
    backend = SimulatedEngine()

    async def body(http, url):
        st, r = await verify(http, url, seq=0, base_len=0, append=[98, 99], draft=[100])
        # spec [100, 100, 100, 100] (padded): the target says 100, 100, 101, so the round is (1 accepted,
        # next 100) and the request holds one token (101) past the edge's context
        assert st == 200 and (r["accepted"], r["next_token"], r["committed_len"]) == (1, 100, 4)
        st, r = await verify(http, url, seq=1, base_len=4, append=[], draft=[101, 102, 103])
        assert (r["accepted"], r["next_token"]) == (3, 104)
    run(backend, body)
    assert backend.requests == 1             # no fresh request (and prefill) after accepted pads
