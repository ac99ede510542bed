"""Fuzz the servers' HTTP layer (issue 16): thousands of generated bodies, headers and WebSocket frames
against a real server on loopback. Every answer must be < 500 (errors as JSON with a reason), none may
hang, and the server must answer /health afterwards.

The cloud here runs the fake table target (tests/conftest.py): this is about parsing, validation and
session bookkeeping, not about models. The helpers take any base URL, so another server (the edge)
is fuzzed the same way:

    with LiveServer(start_my_server) as srv:            # start() -> (runner, base_url), on srv's loop
        fuzz_http(srv, [("POST", "/v1/x", json_bodies(my_shapes))], max_examples=1500)
        fuzz_ws(srv, "/v1/ws", ws_frames(my_shapes), max_examples=500)   # if it has a WebSocket
        assert_alive(srv)
"""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
import urllib.parse
from typing import Awaitable, Callable, Optional

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import load_config
from conftest import TableBackend

ANSWER_TIMEOUT_S = 15.0          # one request, answered in full (a generate stream included)
HTTP_EXAMPLES = 2500
WS_EXAMPLES = 1200


# --- a server on its own event loop, driven from the (synchronous) hypothesis test -----------------------
class LiveServer:
    """Runs `start()` -> (runner, base_url) on an event loop in a thread, with one client session;
    call(coro) runs a coroutine there and fails the test if it takes over `timeout`."""

    def __init__(self, start: Callable[[], Awaitable[tuple]], headers: Optional[dict] = None):
        self._start, self.headers = start, headers or {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuzz-server")

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        self.runner, self.url = self.call(self._start())[:2]
        self.http = self.call(self._client())
        return self

    async def _client(self):
        return aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S))

    def call(self, coro, timeout: float = ANSWER_TIMEOUT_S + 5):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)   # TimeoutError: a hang

    def __exit__(self, *exc) -> None:
        try:
            self.call(self.http.close())
            self.call(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


# --- what gets sent ------------------------------------------------------------------------------------
def ints() -> st.SearchStrategy[int]:
    """Mostly small, sometimes negative, huge, or past 64 bits."""
    return st.one_of(st.integers(-3, 70), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 2**63, 2**64]))


def tokens() -> st.SearchStrategy[list]:
    return st.lists(st.one_of(st.integers(0, 40), ints()), max_size=10)


def floats() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(-1.0, 12.0), st.floats(allow_nan=False, allow_infinity=False), st.just(0.0))


JSON_ANY = st.recursive(
    st.one_of(st.none(), st.booleans(), ints(), floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)

SAMPLING = st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.just(0.0), floats()), "top_k": ints(), "top_p": floats(),
    "seed": st.one_of(st.none(), ints()), "junk": JSON_ANY})

VERIFY = st.fixed_dictionaries({}, optional={
    "session_id": st.one_of(st.sampled_from(["s1", "s2", "s3"]), st.text(max_size=12)),
    "seq": st.one_of(st.integers(0, 4), ints()), "base_len": st.one_of(st.integers(0, 12), ints()),
    "append": tokens(), "draft": tokens(),
    "draft_dists": st.one_of(st.none(), st.lists(st.fixed_dictionaries({}, optional={
        "ids": tokens(), "probs": st.lists(floats(), max_size=5)}), max_size=4)),
    "sampling": SAMPLING, "reuse_cache": st.one_of(st.booleans(), JSON_ANY), "rtt_ms": st.one_of(st.none(), floats()),
    "guess": st.one_of(st.integers(0, 40), ints()), "prompt_len": ints(), "surprise": JSON_ANY})

GENERATE = st.fixed_dictionaries({}, optional={
    "session_id": st.one_of(st.sampled_from(["g1", "g2"]), st.text(max_size=12)),
    "prompt": tokens(), "max_tokens": st.one_of(st.integers(-1, 40), ints()), "sampling": SAMPLING,
    "stop": tokens(), "surprise": JSON_ANY})


def near(valid: st.SearchStrategy[dict], fuzzed: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    """A valid message with up to two fields replaced by fuzzed ones (so the fuzz reaches past validation)."""
    return st.builds(lambda base, over, k: base | dict(list(over.items())[:k]), valid, fuzzed,
                     st.sampled_from([0, 0, 1, 2]))


_FRESH = itertools.count()                                           # new session ids
SMALL_IDS = st.lists(st.integers(0, 31), min_size=1, max_size=6)      # inside the table's vocabulary (32)
VALID_VERIFY = st.fixed_dictionaries({
    "session_id": st.one_of(st.sampled_from(["s1", "s2", "s3"]), st.builds(lambda: f"f{next(_FRESH)}")),
    "seq": st.integers(0, 4), "base_len": st.sampled_from([0, 0, 5, 9]),
    "append": SMALL_IDS, "draft": st.lists(st.integers(0, 31), min_size=1, max_size=4)})
VALID_GENERATE = st.fixed_dictionaries({
    "session_id": st.sampled_from(["g1", "g2"]), "prompt": SMALL_IDS, "max_tokens": st.integers(1, 12)})


def raw_bodies() -> st.SearchStrategy[bytes]:
    """Bytes no JSON encoder would write: garbage, truncations, deep nesting, huge ints, bad UTF-8."""
    return st.one_of(
        st.binary(max_size=300),
        st.builds(lambda d, cut: json.dumps(d).encode()[:cut], VERIFY, st.integers(0, 200)),
        st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * (n // 2)),
        st.integers(1, 3000).map(lambda n: b'{"a": ' + b'{"b": ' * n + b"1" + b"}" * n + b"}"),
        st.integers(4000, 6000).map(lambda n: b'{"seq": ' + b"9" * n + b"}"),
        st.sampled_from([b'{"seq": NaN}', b'{"rtt_ms": Infinity}', b"\xef\xbb\xbf{}", b'{"a": "\xff"}', b"", b"null"]),
    )


def json_bodies(*shapes: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Bodies: the shapes (dicts) as JSON, any JSON value, or raw bytes."""
    return st.one_of(*(s.map(lambda d: json.dumps(d).encode()) for s in shapes),
                     JSON_ANY.map(lambda d: json.dumps(d).encode()), raw_bodies())


CONTENT_TYPES = st.one_of(
    st.just("application/json"), st.just("application/json"), st.just("application/json"),
    st.sampled_from(["application/json; charset=utf-8", "application/json; charset=UTF-16", "application/json; charset=bogus",
                     "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x", "", "application/json;;;", "*/*"]))


def ws_frames(*shapes: st.SearchStrategy) -> st.SearchStrategy:
    """Text frames (str) or binary frames (bytes)."""
    return st.one_of(*(s.map(json.dumps) for s in shapes), JSON_ANY.map(json.dumps),
                     raw_bodies().map(lambda b: b.decode("utf-8", "replace")), st.binary(max_size=64))


# --- the checks ---------------------------------------------------------------------------------------------
async def _request(srv: LiveServer, method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, bytes, str]:
    headers = {"Content-Type": ctype} if body is not None else {}
    async with srv.http.request(method, srv.url + path, data=body, headers=headers) as r:
        return r.status, await r.read(), r.content_type


def _check_answer(status: int, raw: bytes, ctype: str, what) -> None:
    assert status < 500, (status, raw[:300], what)
    if status >= 400:
        assert ctype == "application/json" and json.loads(raw)["error"], (status, raw[:300], what)


def fuzz_http(srv: LiveServer, endpoints: list[tuple[str, str, st.SearchStrategy]], max_examples: int) -> None:
    """Send generated bodies to (method, path, body strategy) endpoints; a path may hold '{}' for a
    generated path segment. Every answer < 500, JSON errors, none over ANSWER_TIMEOUT_S."""
    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(endpoint=st.sampled_from(endpoints), data=st.data(), ctype=CONTENT_TYPES,
           segment=st.text(min_size=1, max_size=20))
    def one(endpoint, data, ctype, segment):
        method, path, bodies = endpoint
        body = data.draw(bodies) if bodies is not None else None
        path = path.replace("{}", urllib.parse.quote(segment, safe=""))
        status, raw, got_type = srv.call(_request(srv, method, path, body, ctype))
        _check_answer(status, raw, got_type, (method, path, ctype, body[:200] if body else body))
    one()


async def _ws_exchange(srv: LiveServer, ws, frame) -> dict:
    if isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_str(frame)
    msg = await ws.receive(timeout=ANSWER_TIMEOUT_S)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg, frame)
    return json.loads(msg.data)


def fuzz_ws(srv: LiveServer, path: str, frames: st.SearchStrategy, max_examples: int) -> None:
    """Send generated frames over one WebSocket, one at a time; every answer is an answer (an error
    has a status < 500), and the socket stays open throughout."""
    ws = srv.call(srv.http.ws_connect(srv.url + path))

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(frame=frames)
    def one(frame):
        answer = srv.call(_ws_exchange(srv, ws, frame))
        if "error" in answer:
            assert 400 <= answer["status"] < 500 and answer["error"], (answer, frame)
    try:
        one()
        assert not ws.closed
    finally:
        srv.call(ws.close())


def assert_alive(srv: LiveServer, path: str = "/health") -> None:
    status, raw, _ = srv.call(_request(srv, "GET", path, None, ""))
    assert status == 200 and json.loads(raw)["status"] == "ok"


# --- the cloud --------------------------------------------------------------------------------------------
VERIFY_BODIES = json_bodies(VERIFY, near(VALID_VERIFY, VERIFY), near(VALID_VERIFY, VERIFY))
GENERATE_BODIES = json_bodies(GENERATE, near(VALID_GENERATE, GENERATE))
CLOUD_ENDPOINTS = [                                     # (the rounds are listed thrice: most of the fuzz)
    ("POST", "/v1/verify", VERIFY_BODIES), ("POST", "/v1/verify", VERIFY_BODIES), ("POST", "/v1/verify", VERIFY_BODIES),
    ("POST", "/v1/generate", GENERATE_BODIES), ("POST", "/v1/generate", GENERATE_BODIES),
    ("DELETE", "/v1/sessions/{}", None),
    ("GET", "/health", None), ("GET", "/stats", None), ("GET", "/metrics", None),
    ("GET", "/v1/verify", None), ("PUT", "/v1/generate", json_bodies(GENERATE)), ("POST", "/{}", json_bodies(VERIFY)),
]


@pytest.fixture
def cloud():
    cfg = load_config()
    verifier = Verifier(TableBackend(), cfg.cloud, cfg.switches)

    async def start():
        return await start_cloud(verifier, cfg, "127.0.0.1", 0)
    with LiveServer(start) as srv:
        srv.verifier = verifier
        yield srv


def test_fuzz_cloud_http(cloud):
    fuzz_http(cloud, CLOUD_ENDPOINTS, HTTP_EXAMPLES)
    assert_alive(cloud)
    assert not [s for s in cloud.verifier.stats.errors if s >= 500], cloud.verifier.stats.errors
    assert cloud.verifier.stats.rounds > 0          # the fuzz reached real verification too, not only errors


def test_fuzz_cloud_websocket(cloud):
    fuzz_ws(cloud, "/v1/ws", ws_frames(VERIFY, near(VALID_VERIFY, VERIFY), near(VALID_VERIFY, VERIFY)), WS_EXAMPLES)
    assert_alive(cloud)
    assert not [s for s in cloud.verifier.stats.errors if s >= 500], cloud.verifier.stats.errors
    assert cloud.verifier.stats.rounds > 0
