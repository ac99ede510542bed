"""Issue 16, the cloud side: every bad input gets a 4xx decided before any session or model work, no
old round rewinds a session, a flood of invalid rounds evicts nothing, slow clients are closed, and
only a liveness probe is open on a cloud with a token. Over real HTTP on loopback; the target is
the fake table (these are protocol tests, not model tests)."""
import asyncio
import json
import time

import aiohttp
import pytest

from cloud.verifier import Verifier
from common.auth import bearer_matches, check_exposure, is_loopback
from common.config import ConfigError, load_config
from common.jsonbody import BadBody, parse_json_object
from common.protocol import REPLAY_ROUNDS, VerifyRequest
from conftest import TableBackend
from test_cloud_api import first_round, post, run_with_cloud

JSON = {"Content-Type": "application/json"}


def sampled_round(**kw):
    """A sampled first round: the table wants 4 after [1, 2, 3]."""
    return first_round(draft=[4], draft_dists=[{"ids": [4, 7], "probs": [0.5, 0.5]}],
                       sampling={"temperature": 1.0, "seed": 3}) | kw


# --- 1. bodies and frames that used to reach a 500 ----------------------------------------------------
DEEP = b"[" * 100_000
DEEP_IN_FIELD = b'{"session_id": "s1", "seq": 0, "base_len": 0, "append": ' + b"[" * 5000 + b"]" * 5000 + b"}"
HUGE_INT = b'{"session_id": "s1", "seq": ' + b"9" * 5000 + b', "base_len": 0, "append": [1], "draft": [2]}'
NAN = json.dumps(first_round(rtt_ms=float("nan"))).encode()          # json.dumps writes NaN; JSON has none


@pytest.mark.parametrize("raw, headers, status", [
    (DEEP, JSON, 400),                                                         # RecursionError before
    (DEEP_IN_FIELD, JSON, 400),
    (HUGE_INT, JSON, 400),                                                     # ValueError (4300 digits) before
    (NAN, JSON, 400),
    (b'{"seq": "\xff\xfe"}', JSON, 400),                                      # not UTF-8
    (json.dumps(first_round()).encode(), {"Content-Type": "application/json; charset=utf-16"}, 415),
    (json.dumps(first_round()).encode(), {"Content-Type": "application/json; charset=bogus"}, 415),
    (json.dumps(first_round()).encode(), {"Content-Type": "text/plain"}, 415),
    (json.dumps(first_round()).encode(), {"Content-Type": "application/x-www-form-urlencoded"}, 415),
])
def test_bad_bodies_get_4xx_json_on_verify_and_generate(table_backend, raw, headers, status):
    async def body(http, url, v):
        for path in ("/v1/verify", "/v1/generate"):
            async with http.post(url + path, data=raw, headers=headers) as r:
                assert r.status == status, (path, await r.text())
                assert r.content_type == "application/json" and (await r.json())["error"]
        assert not v.sessions and table_backend.calls == 0       # nothing created, nothing computed
        assert (await post(http, url, first_round()))[0] == 200  # and the cloud goes on serving
    run_with_cloud(table_backend, body)


def test_bad_websocket_frames_get_4xx_and_the_socket_stays_usable(table_backend):
    async def body(http, url, v):
        async with http.ws_connect(url + "/v1/ws") as ws:
            for frame in (DEEP, DEEP_IN_FIELD, HUGE_INT, NAN):
                await ws.send_str(frame.decode())
                answer = json.loads((await ws.receive(timeout=10)).data)
                assert answer["status"] == 400 and answer["error"], answer
            await ws.send_str(json.dumps(first_round()))
            assert json.loads((await ws.receive(timeout=10)).data)["accepted"] == 2
        assert v.stats.errors.get(500) is None
    run_with_cloud(table_backend, body)


def test_parse_json_object_types_every_failure():
    ok = json.dumps({"a": [1, {"b": "[[[["}]}).encode()
    assert parse_json_object(ok, "application/json", "UTF-8") == {"a": [1, {"b": "[[[["}]}
    assert parse_json_object('{"x": 1}') == {"x": 1}                     # a WebSocket text frame
    assert parse_json_object(b'{"s": "' + b"[" * 10_000 + b'"}', "application/json")["s"] == "[" * 10_000
    cases = [((DEEP, "application/json", None), 400), ((HUGE_INT, "application/json", None), 400),
             ((b"\xc3\x28", "application/json", None), 400), ((b"{}", "application/json", "latin-1"), 415),
             ((b"{}", "text/plain", None), 415), ((b"{}", None, None), 415), ((b"[]", "application/json", None), 400),
             ((b'{"a": Infinity}', "application/json", None), 400), ((b"{", "application/json", None), 400)]
    for args, status in cases:
        with pytest.raises(BadBody) as e:
            parse_json_object(*args)
        assert e.value.status == status and e.value.message, args


# --- 1b. seeds and draft_dists ids ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, -(2**70), 2**64])
def test_seed_out_of_range_is_422_before_any_session(table_backend, seed):
    async def body(http, url, v):
        got, r = await post(http, url, sampled_round(sampling={"temperature": 1.0, "seed": seed}))
        assert got == 422 and r["field"] == "sampling.seed", r
        assert not v.sessions and table_backend.calls == 0
        ok, a = await post(http, url, first_round())                        # an existing session...
        got, r = await post(http, url, sampled_round(seq=5, sampling={"temperature": 1.0, "seed": seed}))
        assert got == 422                                                   # ...is not reset by a bad restart
        assert v.sessions["s1"].tokens == [1, 2, 3, 4, 5, 6] and v.sessions["s1"].last_seq == 0
        async with http.post(url + "/v1/generate", json={"session_id": "g", "prompt": [1], "max_tokens": 2,
                                                         "sampling": {"temperature": 1.0, "seed": seed}}) as r:
            assert r.status == 422
    run_with_cloud(table_backend, body)


def test_out_of_vocabulary_draft_dists_ids_are_422_before_model_work(table_backend):
    async def body(http, url, v):
        bad = sampled_round(draft_dists=[{"ids": [4, 10_000], "probs": [0.5, 0.5]}])
        got, r = await post(http, url, bad)
        assert got == 422 and r["field"] == "draft_dists.0.ids" and "vocabulary" in r["error"], r
        assert table_backend.calls == 0 and not v.sessions                   # no model pass, no session
        got, r = await post(http, url, first_round(seq=1, base_len=6, guess=99, append=[]))
        assert got == 422 and r["field"] == "guess"                           # guess is checked too
        assert (await post(http, url, sampled_round()))[0] == 200
    run_with_cloud(table_backend, body)


# --- 2. late duplicates ---------------------------------------------------------------------------------
def rounds_of(n, session_id="s1"):
    """Rounds 0..n-1 of one session that the table accepts in full (last + 1 each time)."""
    out, ctx = [], [1, 2, 3]
    for seq in range(n):
        draft = [(ctx[-1] + 1) % 32, (ctx[-1] + 2) % 32]              # the table's vocabulary: 32
        out.append({"session_id": session_id, "seq": seq, "base_len": 0 if seq == 0 else len(ctx),
                    "append": ctx if seq == 0 else [], "draft": draft})
        ctx = ctx + draft + [(ctx[-1] + 3) % 32]
    return out


def test_late_duplicates_never_rewind_a_session(table_backend):
    async def body(http, url, v):
        rounds = rounds_of(5)
        answers = [(await post(http, url, r))[1] for r in rounds[:4]]
        assert [a["committed_len"] for a in answers] == [6, 9, 12, 15]
        tokens, calls = list(v.sessions["s1"].tokens), table_backend.calls
        for seq in (0, 1):                                    # late duplicates of rounds 0 and 1
            got, r = await post(http, url, rounds[seq])
            assert got == 200 and r == answers[seq]           # the stored answers, replayed
        assert v.sessions["s1"].tokens == tokens and table_backend.calls == calls
        got, r = await post(http, url, rounds[0] | {"append": [1, 2, 9]})   # seq 0 again, another start
        assert got == 409 and r["committed_len"] == 15 and r["last_seq"] == 3
        assert v.sessions["s1"].tokens == tokens and table_backend.calls == calls
        got, r = await post(http, url, rounds[4])             # the next real round goes on
        assert got == 200 and r["committed_len"] == 18
        got, r = await post(http, url, first_round(session_id="fresh"))     # a new session with base_len 0
        assert got == 200 and r["committed_len"] == 6
        return v.stats.snapshot()
    stats = run_with_cloud(table_backend, body)
    assert stats["cache"]["replayed_rounds"] == 2 and stats["cache"]["late_rounds"] == 1


def test_rounds_older_than_the_replay_window_get_409_and_change_nothing(table_backend):
    async def body(http, url, v):
        rounds = rounds_of(REPLAY_ROUNDS + 3)
        for r in rounds:
            assert (await post(http, url, r))[0] == 200
        tokens = list(v.sessions["s1"].tokens)
        got, r = await post(http, url, rounds[0])               # no longer kept: refused, not recomputed
        assert got == 409 and r["last_seq"] == len(rounds) - 1 and "late" in r["error"]
        got, r = await post(http, url, rounds[-REPLAY_ROUNDS])  # the oldest still kept: replayed
        assert got == 200
        assert v.sessions["s1"].tokens == tokens
    run_with_cloud(table_backend, body)


# --- 3. eviction --------------------------------------------------------------------------------------
def test_live_sessions_survive_a_flood_of_invalid_first_rounds(table_backend):
    async def body(http, url, v):
        for i in range(40):
            assert (await post(http, url, first_round(session_id=f"live{i}")))[0] == 200
        sem = asyncio.Semaphore(32)

        async def flood(i):
            async with sem:
                got, r = await post(http, url, first_round(session_id=f"flood{i}", append=[1] * 60, draft=[1] * 8))
                assert got == 413
        await asyncio.gather(*(flood(i) for i in range(2000)))
        assert sorted(v.sessions) == sorted(f"live{i}" for i in range(40))
        for i in range(40):                                     # each goes on with its next round
            got, r = await post(http, url, first_round(session_id=f"live{i}", seq=1, base_len=6, append=[], draft=[7]))
            assert got == 200, r
    run_with_cloud(table_backend, body, max_sessions=64)


class GatedBackend(TableBackend):
    """The table target, but a round of a session in `hold` waits until `release` is set (holding
    neither the backend nor the admission queue's other slots)."""
    max_inflight = 4

    def __init__(self):
        super().__init__()
        self.hold, self.release, self.entered = set(), asyncio.Event(), asyncio.Event()

    async def alogits(self, session_id, tokens, n_logits, reuse, priority, **kw):
        if session_id in self.hold:
            self.entered.set()
            await asyncio.wait_for(self.release.wait(), 10)
        return await super().alogits(session_id, tokens, n_logits, reuse, priority, **kw)


def test_a_session_with_a_round_in_flight_is_never_evicted():
    backend = GatedBackend()
    backend.hold.add("busy")

    async def body(http, url, v):
        held = asyncio.ensure_future(post(http, url, first_round(session_id="busy")))
        await asyncio.wait_for(backend.entered.wait(), 10)
        got, r = await post(http, url, first_round(session_id="a"))        # max_sessions 2: full now
        assert got == 200
        got, r = await post(http, url, first_round(session_id="b"))        # "busy" is the oldest, but in flight:
        assert got == 200 and set(v.sessions) == {"busy", "b"}             # "a" goes
        backend.release.set()
        assert (await held)[0] == 200
        got, r = await post(http, url, first_round(session_id="busy", seq=1, base_len=6, append=[], draft=[7]))
        assert got == 200 and r["committed_len"] == 8
    run_with_cloud(backend, body, max_sessions=2)


def test_no_idle_session_to_evict_answers_503_with_retry_after():
    backend = GatedBackend()
    backend.hold.add("busy")

    async def body(http, url, v):
        held = asyncio.ensure_future(post(http, url, first_round(session_id="busy")))
        await asyncio.wait_for(backend.entered.wait(), 10)
        async with http.post(url + "/v1/verify", json=first_round(session_id="other")) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1" and "in flight" in (await r.json())["error"]
        backend.release.set()
        assert (await held)[0] == 200 and set(v.sessions) == {"busy"}
    run_with_cloud(backend, body, max_sessions=1)


def test_a_client_at_its_cap_evicts_its_own_oldest_session(table_backend):
    cfg = load_config(overrides={"cloud.max_sessions_per_client": 2})

    async def main():
        v = Verifier(table_backend, cfg.cloud, cfg.switches)

        def req(sid):
            return VerifyRequest.model_validate(first_round(session_id=sid))
        await v.verify(req("other"), client="10.0.0.2")
        for sid in ("m1", "m2", "m3"):
            await v.verify(req(sid), client="10.0.0.1")
        return set(v.sessions)
    assert asyncio.run(main()) == {"other", "m2", "m3"}


# --- 5. connection limits ------------------------------------------------------------------------------
def run_raw(body, **limits):
    """Run body(host, port, url, verifier) against a cloud with these cloud.limits."""
    backend = TableBackend()

    async def wrapped(http, url, v):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return await body(host, int(port), url, v, http)
    return run_with_cloud(backend, wrapped, **{f"limits.{k}": val for k, val in limits.items()})


async def _closed_after(reader, writer, feed=None, every_s=0.3, give_up_s=10.0) -> float:
    """Seconds until the server closes the connection; `feed` lines are sent every `every_s`."""
    t0 = time.monotonic()

    async def trickle():
        for line in feed or ():
            await asyncio.sleep(every_s)
            writer.write(line)
            await writer.drain()
    task = asyncio.ensure_future(trickle())
    try:
        while time.monotonic() - t0 < give_up_s:
            data = await asyncio.wait_for(reader.read(4096), give_up_s)
            if not data:
                break
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        task.cancel()
        writer.close()
    return time.monotonic() - t0


def test_slow_headers_are_closed_within_the_header_timeout():
    async def body(host, port, url, v, http):
        # a header line every 0.3 s, forever: closed after header_timeout_s (1 s), not after 60 s
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /health HTTP/1.1\r\n")
        took = await _closed_after(r, w, feed=[b"X-Slow-%d: 1\r\n" % i for i in range(100)])
        assert 0.9 <= took < 4.0, took
        # only the request line
        r, w = await asyncio.open_connection(host, port)
        w.write(b"POST /v1/verify HTTP/1.1\r\n")
        took = await _closed_after(r, w)
        assert 0.9 <= took < 4.0, took
        # connected, nothing sent
        r, w = await asyncio.open_connection(host, port)
        took = await _closed_after(r, w)
        assert 0.9 <= took < 4.0, took
        async with http.get(url + "/health") as resp:          # ordinary requests are unaffected
            assert resp.status == 200
    run_raw(body, header_timeout_s=1.0, keepalive_timeout_s=30.0)


def test_idle_keepalive_connections_are_closed():
    async def body(host, port, url, v, http):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        took = await _closed_after(r, w)
        assert 0.9 <= took < 4.0, took
    run_raw(body, header_timeout_s=10.0, keepalive_timeout_s=1.0)


def test_slow_body_gets_408():
    async def body(host, port, url, v, http):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        await w.drain()
        t0 = time.monotonic()
        raw = await asyncio.wait_for(r.read(), 10)                 # the 408, then closed (no lingering)
        assert raw.startswith(b"HTTP/1.1 408") and b"did not arrive" in raw and time.monotonic() - t0 < 4.0
        w.close()
        assert not v.sessions
    run_raw(body, body_timeout_s=1.0)


def test_connections_over_the_cap_get_503_and_are_closed():
    async def body(host, port, url, v, http):
        held = [await asyncio.open_connection(host, port) for _ in range(3)]
        await asyncio.sleep(0.1)
        r, w = await asyncio.open_connection(host, port)
        head = await asyncio.wait_for(r.read(), 5)                 # answered at once, then closed
        assert head.startswith(b"HTTP/1.1 503") and b"max_connections" in head and b"Retry-After" in head
        w.close()
        for _, hw in held:
            hw.close()
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as fresh:               # room again once they are gone
            async with fresh.get(url + "/health") as resp:
                assert resp.status == 200
    run_raw(body, max_connections=3)


def test_malformed_http_gets_a_json_400():
    async def body(host, port, url, v, http):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n")
        raw = await asyncio.wait_for(r.read(), 5)
        w.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400" and b"application/json" in head
        assert "Invalid header" in json.loads(payload)["error"]
    run_raw(body)


# --- 6. exposure ------------------------------------------------------------------------------------------
def test_with_a_token_only_a_minimal_liveness_probe_is_open(table_backend):
    good, metrics = {"Authorization": "Bearer t0k"}, {"Authorization": "Bearer m3t"}

    async def body(http, url, v):
        async with http.get(url + "/health") as r:
            assert r.status == 200 and await r.json() == {"status": "ok", "auth_required": True}
        async with http.get(url + "/health", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with http.get(url + "/health", headers=good) as r:
            assert (await r.json())["n_ctx"] == 64
        for path in ("/stats", "/metrics"):
            async with http.get(url + path) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer" and (await r.json())["error"]
            for headers in (good, metrics):
                async with http.get(url + path, headers=headers) as r:
                    assert r.status == 200
        got, r = await post(http, url, first_round(), headers=JSON | metrics)   # the metrics token: no rounds
        assert got == 401
        got, r = await post(http, url, first_round(), headers=JSON | good)
        assert got == 200
    run_with_cloud(table_backend, body, auth_token="t0k", metrics_token="m3t")


def test_without_a_token_health_keeps_its_details(table_backend):
    async def body(http, url, v):
        async with http.get(url + "/health") as r:
            assert (await r.json())["backend"] == "table"
    run_with_cloud(table_backend, body)


def test_404_and_405_are_json(table_backend):
    async def body(http, url, v):
        async with http.get(url + "/nowhere") as r:
            assert r.status == 404 and "/nowhere" in (await r.json())["error"]
        async with http.get(url + "/v1/verify") as r:
            assert r.status == 405 and (await r.json())["error"] and "POST" in r.headers["Allow"]
    run_with_cloud(table_backend, body)


def test_bearer_tokens_match_exactly():
    assert bearer_matches("Bearer s3cret", "s3cret")
    assert bearer_matches("Bearer b", ["a", "b"])
    for header in (None, "", "Bearer s3cre", "Bearer s3cret ", "bearer s3cret", "Bearer s3cr\u00e9t", "Bearer \udcff"):
        assert not bearer_matches(header, "s3cret"), header
    assert not bearer_matches("Bearer ", "")                   # an empty token never matches


def test_a_public_bind_without_a_token_refuses_to_start(capsys):
    import start_cloud
    assert start_cloud.main(["--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and "--insecure" in err and "Traceback" not in err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("example.org")
    check_exposure("0.0.0.0", "tok", False, "cloud")            # a token, or an explicit allowance: fine
    check_exposure("0.0.0.0", None, True, "cloud")
    with pytest.raises(ConfigError):
        check_exposure("::", None, False, "cloud")


# --- a failure after a stream started says so in its last line ---------------------------------------------------
class FailingBackend(TableBackend):
    def logits(self, session_id, tokens, n_logits, reuse):
        if self.calls >= 2:
            raise RuntimeError("the target went away")
        return super().logits(session_id, tokens, n_logits, reuse)


def test_generate_failure_mid_stream_ends_with_an_error_line():
    async def body(http, url, v):
        async with http.post(url + "/v1/generate", json={"session_id": "g", "prompt": [3], "max_tokens": 5}) as r:
            lines = [json.loads(x) for x in (await r.read()).splitlines()]
        assert [t for x in lines for t in x["token_ids"]] == [4, 5]
        assert lines[-1]["done"] and "went away" in lines[-1]["error"]
    run_with_cloud(FailingBackend(), body)

