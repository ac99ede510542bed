"""The whole system with real models over real loopback HTTP: CLI, edge API, session loss. (The cloud
going away mid-answer: tests/test_edge_sessions.py.)"""
import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from common.protocol import SamplingParams
from edge.generator import Mode
from edge.server import make_app
from tests.conftest import ROOT
from tests.realmodels import config, edge_and_cloud, run

pytestmark = pytest.mark.slow
GREEDY = SamplingParams()


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_client_json_embedded_cloud():
    r = cli("--mode", "client", "--humaneval", "2", "--max-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("text", "token_ids", "mode", "rounds", "drafted", "accepted", "acceptance_rate",
                "mean_accepted_length", "ttft_ms", "total_ms", "tokens_per_s"):
        assert key in out
    assert out["mode"] == "edge_cloud" and out["rounds"] > 0 and len(out["token_ids"]) == 24 and out["text"]


def test_cli_edge_only_and_errors():
    r = cli("--mode", "client", "--prompt", "Say hi.", "--max-tokens", "8", "--edge-only", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["mode"] == "edge_only"
    r = cli("--mode", "client")
    assert r.returncode == 2 and "needs --prompt" in r.stderr and "Traceback" not in r.stderr
    r = cli("--mode", "client", "--prompt", "x", "--cloud-url", "http://127.0.0.1:9")
    assert r.returncode == 3 and "unreachable" in r.stderr and "Traceback" not in r.stderr
    r = cli("--mode", "client", "--prompt", "x", "--set", "draft.max_k=0")
    assert r.returncode == 2 and "draft.max_k" in r.stderr
    r = cli("--mode", "client", "--prompt", "x", "--set", "models.cache_dir=/nonexistent")
    assert r.returncode == 2 and "python -m common.assets install" in r.stderr


def test_interactive_mode_streams_and_quits():
    p = subprocess.run([sys.executable, "main.py", "--mode", "interactive", "--max-tokens", "12"], cwd=ROOT,
                       input="Say hello.\n/quit\n", capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "tok/s" in p.stderr and "acceptance" in p.stderr and p.stdout.strip()


def test_edge_api_streams_and_rejects_bad_input():
    async def body():
        async with edge_and_cloud(config()) as (edge, cloud):
            runner = web.AppRunner(make_app(edge))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
            try:
                async with aiohttp.ClientSession() as http:
                    async with http.post(url + "/v1/generate", json={"prompt": "Say hi.", "max_tokens": 10}) as r:
                        lines = [json.loads(x) for x in (await r.read()).splitlines()]
                    assert lines[-1]["done"] and lines[-1]["stats"]["tokens"] == sum(len(x["token_ids"]) for x in lines[:-1])
                    for payload, status in [({"prompt": 3}, 422), ({}, 422), ({"prompt": "a", "mode": "nope"}, 422),
                                            ({"prompt_ids": [10**7]}, 422), ({"prompt_ids": [1] * 3000}, 413)]:
                        async with http.post(url + "/v1/generate", json=payload) as r:
                            assert r.status == status and "error" in await r.json(), payload
                    async with http.post(url + "/v1/generate", data=b"{x", headers={"Content-Type": "application/json"}) as r:
                        assert r.status == 400
                    async with http.get(url + "/health") as r:
                        assert (await r.json())["cloud"]["status"] == "ok"
                    async with http.get(url + "/stats") as r:
                        st = await r.json()
                    assert st["generations"] == 1
                    drafting = st["drafting"]               # what the adaptive draft length works from
                    assert drafting["first_step_ms"] > 0 and (drafting["step_ms"] or 1) > 0
                    assert len(drafting["acceptance_by_confidence"]) == 10
                    # the prior is 3 tokens a bin; the answer's verified drafts added to it
                    assert sum(b["weight"] for b in drafting["acceptance_by_confidence"]) > 10 * 3.0 + 0.5
            finally:
                await runner.cleanup()
    run(body())


def test_session_loss_resyncs_and_stays_lossless():
    """Exact mode: a re-synced session is re-evaluated as the target alone evaluated it (the prompt in one
    batch, `prompt_len`; every later token alone), so the answer stays bit for bit the target's."""
    async def body():
        async with edge_and_cloud(config(**{"cloud.exact": True})) as (edge, cloud):
            ids = edge.encode("Write a python function that checks if a number is prime.")
            ref = await edge.generate(ids, 48, GREEDY, Mode.CLOUD_ONLY)
            verify = cloud.verifier.verify
            calls = {"n": 0}

            async def forgetful(req, **kw):                     # the cloud loses all sessions every 3rd round
                calls["n"] += 1
                if calls["n"] % 3 == 0:
                    cloud.verifier.drop(req.session_id)
                return await verify(req, **kw)
            cloud.verifier.verify = forgetful
            spec = await edge.generate(ids, 48, GREEDY, Mode.EDGE_CLOUD)
            return ref, spec, cloud.verifier.stats.resyncs
    ref, spec, resyncs = run(body())
    assert resyncs >= 1 and spec.stats.error is None
    assert spec.token_ids == ref.token_ids
