"""Every bad-input case of the cloud API, plus idempotent retries and re-sync, over real HTTP on
loopback. The target here is a fake table (protocol tests only; losslessness uses real models)."""
import asyncio
import json

import aiohttp
import pytest

from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import load_config


def run_with_cloud(backend, body, **cloud_overrides):
    cfg = load_config(overrides={f"cloud.{k}": v for k, v in cloud_overrides.items()})

    async def main():
        verifier = Verifier(backend, cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                return await body(http, url, verifier)
        finally:
            await runner.cleanup()
    return asyncio.run(main())


def first_round(**kw):
    return {"session_id": "s1", "seq": 0, "base_len": 0, "append": [1, 2, 3], "draft": [4, 5]} | kw


async def post(http, url, payload, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(payload)
    async with http.post(url + "/v1/verify", data=data,
                         headers=headers or {"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


def test_verify_accepts_and_corrects(table_backend):
    async def body(http, url, v):
        # the table target predicts last+1: after [1,2,3] it wants 4, 5, 6 -> draft [4, 9] gets 1 accepted, then 5
        status, r = await post(http, url, first_round(draft=[4, 9]))
        assert status == 200 and (r["accepted"], r["next_token"], r["committed_len"]) == (1, 5, 5)
        status, r = await post(http, url, first_round(seq=1, base_len=5, append=[], draft=[6, 7, 8]))
        assert (r["accepted"], r["next_token"], r["committed_len"]) == (3, 9, 9)
        return v.stats.snapshot()
    stats = run_with_cloud(table_backend, body)
    assert stats["rounds"] == 2 and stats["drafted"] == 5 and stats["accepted"] == 4


@pytest.mark.parametrize("payload, raw, status, field", [
    (None, b"{not json", 400, None),                                       # malformed JSON
    (None, b"[1, 2]", 400, None),                                          # not an object
    (first_round(seq="0"), None, 422, "seq"),                              # wrong type
    (first_round(draft=["4"]), None, 422, "draft.0"),                      # a string for a token id
    (first_round(draft=list(range(17))), None, 413, "draft"),              # over-long draft (max_draft 16)
    (first_round(draft=[4, 32]), None, 422, "draft"),                      # out of vocabulary (32 tokens)
    (first_round(append=[99]), None, 422, "append"),                       # out of vocabulary
    (first_round(append=[1] * 60, draft=[1] * 8), None, 413, "append"),    # context over the window (64)
    (first_round(extra=True), None, 422, "extra"),                         # unknown field
    (first_round(base_len=7), None, 409, "base_len"),                      # unknown session
])
def test_bad_input_gets_json_error(table_backend, payload, raw, status, field):
    async def body(http, url, v):
        got, r = await post(http, url, payload, raw)
        assert got == status, r
        assert isinstance(r["error"], str) and r["error"]
        if field:
            assert r.get("field") == field
        # the server keeps serving
        ok, r = await post(http, url, first_round(session_id="after"))
        assert ok == 200 and r["accepted"] == 2
    run_with_cloud(table_backend, body)


def test_wrong_content_type_and_auth(table_backend):
    async def body(http, url, v):
        got, r = await post(http, url, None, raw=b"x", headers={"Content-Type": "text/plain",
                                                                  "Authorization": "Bearer t0k"})
        assert got == 415 and "Content-Type" in r["error"]
        got, r = await post(http, url, first_round())
        assert got == 401 and "token" in r["error"]
        got, r = await post(http, url, first_round(), headers={"Content-Type": "application/json",
                                                               "Authorization": "Bearer t0k"})
        assert got == 200
    run_with_cloud(table_backend, body, auth_token="t0k")


def test_body_too_large(table_backend):
    async def body(http, url, v):
        got, r = await post(http, url, first_round(append=[1] * 5000))
        assert got == 413 and "error" in r
    run_with_cloud(table_backend, body, max_body_bytes=4096)


def test_retry_is_idempotent_and_out_of_order_is_409(table_backend):
    async def body(http, url, v):
        _, a = await post(http, url, first_round(draft=[4, 9]))
        calls = table_backend.calls
        _, b = await post(http, url, first_round(draft=[4, 9]))          # the same round again
        assert a == b and table_backend.calls == calls                    # nothing recomputed
        got, r = await post(http, url, first_round(seq=5, base_len=5, append=[], draft=[6]))
        assert got == 409 and r["committed_len"] == 5
        got, r = await post(http, url, first_round(seq=1, base_len=3, append=[], draft=[6]))
        assert got == 409 and r["committed_len"] == 5
        # re-sync: resend the whole context as a fresh round 0
        got, r = await post(http, url, first_round(seq=2, append=[1, 2, 3, 4, 5], draft=[6]))
        assert got == 200 and r["committed_len"] == 7
        return v.stats.snapshot()
    stats = run_with_cloud(table_backend, body)
    assert stats["cache"]["replayed_rounds"] == 1 and stats["cache"]["resyncs"] == 2


def test_generate_streams_target_tokens(table_backend):
    async def body(http, url, v):
        payload = {"session_id": "g", "prompt": [3], "max_tokens": 5, "stop": [6]}
        async with http.post(url + "/v1/generate", json=payload) as r:
            lines = [json.loads(x) for x in (await r.read()).splitlines()]
        assert [t for x in lines for t in x["token_ids"]] == [4, 5, 6]
        assert lines[-1]["done"]
        async with http.post(url + "/v1/generate", json=payload | {"prompt": [1000]}) as r:
            assert r.status == 422 and "vocabulary" in (await r.json())["error"]
        async with http.get(url + "/health") as r:
            assert (await r.json())["status"] == "ok"
        async with http.get(url + "/metrics") as r:
            assert "tandem_verify_rounds" in await r.text()
    run_with_cloud(table_backend, body)


def test_websocket_rounds_and_errors(table_backend):
    """GET /v1/ws: the same rounds as POST /v1/verify, answers matched by (session_id, seq); bad input
    gets an error object with its HTTP status, and the socket stays usable."""
    async def body(http, url, v):
        async with http.ws_connect(url + "/v1/ws") as ws:
            await ws.send_str(json.dumps(first_round()))
            r = json.loads((await ws.receive()).data)
            assert (r["seq"], r["accepted"], r["next_token"], r["committed_len"]) == (0, 2, 6, 6)
            await ws.send_str("{not json")
            assert json.loads((await ws.receive()).data)["status"] == 400
            await ws.send_str(json.dumps(first_round(seq=1, base_len=6, append=[], draft=[99])))
            r = json.loads((await ws.receive()).data)
            assert r["status"] == 422 and r["field"] == "draft" and r["seq"] == 1       # outside the vocabulary
            await ws.send_str(json.dumps(first_round(seq=5, base_len=6, append=[], draft=[7])))
            r = json.loads((await ws.receive()).data)
            assert r["status"] == 409 and r["committed_len"] == 6
            await ws.send_bytes(b"\x00")
            assert json.loads((await ws.receive()).data)["status"] == 400
            await ws.send_str(json.dumps(first_round(seq=1, base_len=6, append=[], draft=[7, 8])))
            r = json.loads((await ws.receive()).data)
            assert (r["seq"], r["accepted"], r["next_token"], r["committed_len"]) == (1, 2, 9, 9)
        async with http.get(url + "/stats") as resp:
            errors = (await resp.json())["errors"]
        assert errors == {"400": 2, "409": 1, "422": 1}
    run_with_cloud(table_backend, body)


def test_websocket_needs_the_token(table_backend):
    async def body(http, url, v):
        async with http.get(url + "/v1/ws") as r:
            assert r.status == 401 and "token" in (await r.json())["error"]
        async with http.ws_connect(url + "/v1/ws", headers={"Authorization": "Bearer s3cret"}) as ws:
            await ws.send_str(json.dumps(first_round()))
            assert json.loads((await ws.receive()).data)["accepted"] == 2
    run_with_cloud(table_backend, body, auth_token="s3cret")
