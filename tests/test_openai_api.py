"""The edge's HTTP API at the protocol level, over real loopback HTTP, with a scripted fake node (no
models): OpenAI shapes, SSE framing, usage, stop strings, errors, auth, 429, abandon, the openai SDK."""
import asyncio
import contextlib
import json
import logging
import time

import aiohttp
import openai
import pytest

from common.config import load_config
from common.http_limits import start_site
from common.protocol import SamplingParams
from edge.generator import EdgeBusy, GenStats, Mode, Piece
from edge.server import make_app
from edge.text_stream import Span, StopMatcher

EOS = 256
JSON = {"Content-Type": "application/json"}


class FakeLink:
    def __init__(self, up=True):
        self.up, self.rtt_ms, self.health_factor, self.transport = up, 12.5, 0.9, "ws"
        self.down_events, self.up_events = 1, 1


class FakeNode:
    """The EdgeNode interface the server codes against. A token is one byte (id < 256) or EOS (256).
    `stream` answers `self.answer` (str) in pieces of `piece_len` tokens, sources draft, draft, target,..."""

    model_name = "fake-model"
    n_vocab = 300

    def __init__(self, answer="Hello, world!", piece_len=3, link=None, **cfg):
        self.cfg = load_config(overrides={"draft.n_ctx": 256, **cfg})
        self.answer, self.piece_len, self.link = answer, piece_len, link
        self.active_sessions, self.queue_depth = 0, 0
        self.delay_s = 0.0            # before each piece
        self.fail_after = None        # pieces; then stats.error, as the Generator reports a failure
        self.busy = None              # EdgeBusy retry_after_s: raise it before the first piece
        self.calls, self.produced, self.closed = [], 0, asyncio.Event()

    def drafting_stats(self):
        return {"step_ms": None, "verify_ms_at_k": {}, "acceptance_by_confidence": []}

    def encode(self, text, raw=False):
        return list((text if raw else f"<user>{text}<assistant>").encode())

    def encode_messages(self, messages, user_rtt_ms=None):
        self.user_rtt_ms = user_rtt_ms
        out = ""
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role '{m['role']}'")
            out += f"<{m['role']}>{m['content']}"
        return list((out + "<assistant>").encode())

    def sampling(self, temperature=None, seed=None, top_p=None):
        return SamplingParams(temperature=temperature or 0.0, seed=seed, top_p=top_p or 1.0)

    def detokenize(self, ids):
        return b"".join(bytes([t]) if t < 256 else b"" for t in ids)

    async def stream(self, prompt_ids, max_tokens, sampling, mode, stats_out, arrived=None):
        self.calls.append({"prompt_ids": prompt_ids, "max_tokens": max_tokens, "sampling": sampling, "mode": mode,
                           "arrived": arrived})
        if self.busy is not None:
            raise EdgeBusy(8, 32, self.busy)
        if mode is Mode.CLOUD_ONLY and self.link is None:
            raise ValueError("mode cloud_only needs a cloud URL")
        stats = GenStats(mode=(mode or Mode.EDGE_CLOUD).value)
        stats_out.append(stats)
        toks = list(self.answer.encode()) + [EOS]
        t0 = arrived or time.perf_counter()
        import codecs
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for n, i in enumerate(range(0, len(toks), self.piece_len)):
                if self.fail_after is not None and n >= self.fail_after:
                    stats.error = "CloudUnavailable: the cloud went away"
                    return
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                ids = toks[i:i + self.piece_len][:max_tokens - stats.tokens]
                sources = ["draft"] * (len(ids) - 1) + ["target"]
                stats.rounds += 1
                stats.drafted += len(ids)
                stats.accepted += len(ids) - 1
                stats.accept_hist[len(ids) - 1] += 1
                stats.by_source.update(sources)
                stats.tokens += len(ids)
                if stats.ttft_ms is None:
                    stats.ttft_ms = (time.perf_counter() - t0) * 1e3
                self.produced += len(ids)
                yield Piece(ids, dec.decode(self.detokenize(ids)), sources)
                if stats.tokens >= max_tokens:
                    return
        finally:
            stats.total_ms = (time.perf_counter() - t0) * 1e3
            self.closed.set()


@contextlib.asynccontextmanager
async def serving(node):
    runner, url = await start_site(make_app(node), "127.0.0.1", 0, node.cfg.edge.limits)
    try:
        async with aiohttp.ClientSession() as http:
            yield http, url
    finally:
        await runner.cleanup()


def run(coro):
    return asyncio.run(coro)


def chat(content="Hi", **kw):
    return {"messages": [{"role": "user", "content": content}], **kw}


def sse_events(raw: bytes) -> list:
    """Parse an SSE body strictly: every event is one 'data: ...' line followed by a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-50:]
    events = text[:-2].split("\n\n")
    out = []
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, e
        out.append(e[len("data: "):])
    assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return [json.loads(x) for x in out[:-1]]


def assert_openai_error(body, status_type="invalid_request_error"):
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"] == status_type


# ---------------------------------------------------------------------------------------------------------
def test_stop_matcher_holds_prefixes_and_cuts_at_the_earliest_stop():
    m = StopMatcher(["END", "xyz"])
    out = m.push([Span("ab", 1, "draft"), Span("cE", 2, "target")])
    assert "".join(s.text for s in out) == "ab"           # "cE" held: "E" may begin "END"
    out = m.push([Span("N", 3, "draft")])
    assert out == [] and not m.stopped
    out = m.push([Span("D!", 4, "target")])
    assert m.stopped and [(s.text, s.token_id) for s in out] == [("c", 2)]   # cut before "END"
    assert m.push([Span("more", 5, "draft")]) == [] and m.flush() == []
    m = StopMatcher(["END"])
    assert [s.text for s in m.push([Span("aE", 1)])] == []
    assert [s.text for s in m.push([Span("x", 2)])] == ["aE", "x"]        # not a stop after all: released
    assert [s.text for s in m.push([Span("EN", 3)])] == []
    assert [s.text for s in m.flush()] == ["EN"]                          # end of answer: released


def test_models_and_page():
    async def body():
        async with serving(FakeNode()) as (http, url):
            async with http.get(url + "/v1/models") as r:
                assert r.status == 200
                models = await r.json()
            assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake-model"]
            async with http.get(url + "/v1/models/fake-model") as r:
                assert r.status == 200 and (await r.json())["object"] == "model"
            async with http.get(url + "/v1/models/gpt-4") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
            async with http.get(url + "/") as r:
                html = await r.text()
                assert r.status == 200 and r.content_type == "text/html" and "/static/app.js" in html
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
                assert "http://" not in html and "https://" not in html          # nothing from a CDN
            for asset in ("/static/app.js", "/static/style.css"):
                async with http.get(url + asset) as r:
                    assert r.status == 200 and "http" not in (await r.text()).replace("http-equiv", "")
    run(body())


def test_chat_completion_shape_usage_and_tandem_figures():
    node = FakeNode("Hello, world!")
    async def body():
        async with serving(node) as (http, url):
            async with http.post(url + "/v1/chat/completions", json=chat(max_tokens=50, seed=7, temperature=0.5)) as r:
                assert r.status == 200
                out = await r.json()
            async with http.post(url + "/v1/chat/completions", json=chat(max_completion_tokens=5)) as r:
                short = await r.json()
        return out, short
    out, short = run(body())
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "fake-model"
    assert isinstance(out["created"], int)
    [choice] = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    n_prompt = len(node.encode_messages([{"role": "user", "content": "Hi"}]))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 14, "total_tokens": n_prompt + 14}
    t = out["tandem"]
    assert t["mode"] == "edge_cloud" and t["rounds"] == 5 and t["tokens_by_source"] == {"draft": 9, "target": 5, "edge": 0}
    assert t["mean_accepted_length"] == 2.8 and t["ttft_ms"] is not None
    assert t["token_ids"] == list(b"Hello, world!") + [EOS] and t["sources"] == ["draft", "draft", "target"] * 4 + ["draft", "target"]
    assert node.calls[0]["sampling"].temperature == 0.5 and node.calls[0]["sampling"].seed == 7
    assert node.calls[0]["arrived"] is not None
    assert short["choices"][0]["message"]["content"] == "Hello" and short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 5 and node.calls[1]["max_tokens"] == 5


def test_chat_stream_sse_framing_provenance_and_usage():
    node = FakeNode("Héllo wörld")
    async def body():
        async with serving(node) as (http, url):
            req = chat(stream=True, stream_options={"include_usage": True}, max_tokens=100)
            async with http.post(url + "/v1/chat/completions", json=req) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                assert "Access-Control-Allow-Origin" not in r.headers
                return sse_events(await r.read())
    chunks = run(body())
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == "Héllo wörld"
    for c in content:        # each chunk: its tokens, their provenance and texts, adding up to its content
        t = c["tandem"]
        assert len(t["token_ids"]) == len(t["sources"]) == len(t["texts"])
        assert "".join(t["texts"]) == c["choices"][0]["delta"]["content"]
        assert set(t["sources"]) <= {"draft", "target"}
    ids = [i for c in content for i in c["tandem"]["token_ids"]]
    assert ids == list("Héllo wörld".encode()) + [EOS]
    # the UTF-8 character split across two tokens is whole, on the token that completes it
    texts = [x for c in content for x in c["tandem"]["texts"]]
    assert texts[1:3] == ["", "é"]
    last, usage = chunks[-2], chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["delta"] == {}
    assert last["tandem"]["mode"] == "edge_cloud" and last["tandem"]["tokens_by_source"]["draft"] > 0
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ids)


@pytest.mark.parametrize("piece_len", [1, 2, 5])
def test_stop_strings_across_pieces_and_utf8(piece_len):
    node = FakeNode("naïve café END ünd mehr", piece_len=piece_len)
    async def body():
        async with serving(node) as (http, url):
            out = {}
            for stop in ["END", ["zzz", "é E"], "ü", ["ïve"]]:
                async with http.post(url + "/v1/chat/completions", json=chat(stop=stop)) as r:
                    whole = await r.json()
                async with http.post(url + "/v1/chat/completions", json=chat(stop=stop, stream=True)) as r:
                    chunks = sse_events(await r.read())
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
                out[json.dumps(stop, ensure_ascii=False)] = (whole["choices"][0]["message"]["content"], whole["choices"][0]["finish_reason"], text,
                            chunks[-1]["choices"][0]["finish_reason"])
            await asyncio.wait_for(node.closed.wait(), 1)
            return out
    out = run(body())
    assert out['"END"'] == ("naïve café ", "stop", "naïve café ", "stop")
    assert out['["zzz", "é E"]'] == ("naïve caf", "stop", "naïve caf", "stop")
    assert out['"ü"'] == ("naïve café END ", "stop", "naïve café END ", "stop")
    assert out['["ïve"]'] == ("na", "stop", "na", "stop")


def test_completions_endpoint():
    node = FakeNode("42")
    async def body():
        async with serving(node) as (http, url):
            res = []
            for prompt in ["The answer is", ["The answer is"], [84, 104], [[84, 104]]]:
                async with http.post(url + "/v1/completions", json={"prompt": prompt, "model": "fake-model"}) as r:
                    assert r.status == 200, await r.text()
                    res.append(await r.json())
            async with http.post(url + "/v1/completions", json={"prompt": "x", "stream": True}) as r:
                chunks = sse_events(await r.read())
            async with http.post(url + "/v1/completions", json={"prompt": ["a", "b"]}) as r:
                two = (r.status, await r.json())
            async with http.post(url + "/v1/completions", json={"prompt": "x", "echo": True, "suffix": "y"}) as r:
                echo = (r.status, await r.json())
            return res, chunks, two, echo
    res, chunks, two, echo = run(body())
    for out in res:
        assert out["object"] == "text_completion" and out["choices"][0]["text"] == "42"
        assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 3
    assert node.calls[0]["prompt_ids"] == list(b"The answer is")           # raw: no chat template
    assert node.calls[2]["prompt_ids"] == [84, 104] == node.calls[3]["prompt_ids"]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "42"
    assert two[0] == 400 and two[1]["error"]["param"].startswith("prompt")
    assert echo[0] == 400 and "'echo'" in echo[1]["error"]["message"] and "'suffix'" in echo[1]["error"]["message"]


def test_unsupported_fields_get_400_naming_them_and_neutral_ones_pass():
    node = FakeNode()
    async def body():
        async with serving(node) as (http, url):
            async with http.post(url + "/v1/chat/completions", json=chat(
                    n=2, logprobs=True, tools=[{"type": "function"}], response_format={"type": "json_object"},
                    presence_penalty=0.5, frobnicate=1)) as r:
                bad = (r.status, await r.json())
            neutral = chat(n=1, user="u1", presence_penalty=0, frequency_penalty=0.0, logit_bias={}, logprobs=False,
                           response_format={"type": "text"}, store=False, metadata={"a": "b"}, parallel_tool_calls=True)
            async with http.post(url + "/v1/chat/completions", json=neutral) as r:
                ok = (r.status, await r.json())
            return bad, ok
    (status, body), (ok_status, ok_body) = run(body())
    assert status == 400
    assert_openai_error(body)
    msg = body["error"]["message"]
    for field in ("'n'", "'logprobs'", "'tools'", "'response_format'", "'presence_penalty'", "'frobnicate'"):
        assert field in msg, (field, msg)
    assert body["error"]["param"] == "n" and body["error"]["code"] == "unsupported_parameter"
    assert ok_status == 200 and ok_body["choices"][0]["message"]["content"] == "Hello, world!"
    assert len(node.calls) == 1                        # the rejected request never reached the node


BAD_BODIES = [
    # (description, raw body, content type, expected status, expected param or None)
    ("malformed JSON", b"{x", "application/json", 400, None),
    ("deeply nested", b"[" * 50000, "application/json", 400, None),
    ("huge integer", b'{"max_tokens": ' + b"9" * 5000 + b"}", "application/json", 400, None),
    ("invalid UTF-8", b'{"messages": "\xff\xfe"}', "application/json", 400, None),
    ("utf-16 charset", json.dumps(chat()).encode(), "application/json; charset=utf-16", 415, None),
    ("bogus charset", json.dumps(chat()).encode(), "application/json; charset=bogus", 415, None),
    ("text/plain", json.dumps(chat()).encode(), "text/plain", 415, None),
    ("form", b"a=b", "application/x-www-form-urlencoded", 415, None),
    ("not an object", b"[1, 2]", "application/json", 400, None),
    ("NaN", b'{"temperature": NaN, "messages": []}', "application/json", 400, None),
]
BAD_REQUESTS = [
    (chat(seed=-1), "seed"), (chat(seed=2 ** 63), "seed"), (chat(temperature=3), "temperature"), (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens="5"), "max_tokens"), (chat(stop=["a", "b", "c", "d", "e"]), "stop"), (chat(stop=""), "stop"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"), (chat(top_p=0), "top_p"), (chat(stream="yes"), "stream"),
    (chat(mode="nope"), "mode"), (chat(stream_options={"include_usage": 1}), "stream_options.include_usage"),
    (chat(max_tokens=3, max_completion_tokens=4), "max_tokens"), ({"prompt": "x"}, None),
]


def test_bad_input_gets_openai_shaped_4xx_and_the_server_keeps_serving():
    node = FakeNode(**{"edge.max_body_bytes": 65536})
    async def body():
        async with serving(node) as (http, url):
            got = []
            for name, raw, ctype, status, _ in BAD_BODIES:
                async with http.post(url + "/v1/chat/completions", data=raw, headers={"Content-Type": ctype}) as r:
                    got.append((name, r.status, status, await r.json()))
            for payload, param in BAD_REQUESTS:
                async with http.post(url + "/v1/chat/completions", json=payload) as r:
                    got.append((json.dumps(payload)[:60], r.status, 400, await r.json()))
                    if param:
                        assert (got[-1][3]["error"]["param"] or "").startswith(param), got[-1]
            async with http.post(url + "/v1/chat/completions", data=b"{" + b" " * 70000 + b"}", headers=JSON) as r:
                got.append(("too large", r.status, 413, await r.json()))
            async with http.get(url + "/nope") as r:
                got.append(("no route", r.status, 404, await r.json()))
            async with http.get(url + "/v1/chat/completions") as r:
                got.append(("wrong method", r.status, 405, await r.json()))
                assert "POST" in r.headers.get("Allow", "")
            async with http.post(url + "/v1/chat/completions", json=chat(model="gpt-4o")) as r:
                got.append(("unknown model", r.status, 404, await r.json()))
            async with http.post(url + "/v1/chat/completions", json=chat("x" * 300)) as r:
                got.append(("context", r.status, 400, await r.json()))
                assert got[-1][3]["error"]["code"] == "context_length_exceeded"
            async with http.post(url + "/v1/generate", data=b"[" * 5000, headers=JSON) as r:
                got.append(("ndjson nested", r.status, 400, await r.json()))
            async with http.post(url + "/v1/chat/completions", json=chat()) as r:
                after = r.status
            return got, after
    got, after = run(body())
    for name, status, want, out in got:
        assert status == want, (name, status, out)
        assert_openai_error(out)
    assert after == 200 and len(node.calls) == 1


def test_api_keys():
    node = FakeNode(**{"edge.api_keys": ["k-one", "k-two"]})
    async def body():
        async with serving(node) as (http, url):
            res = {}
            for name, headers in [("none", {}), ("wrong", {"Authorization": "Bearer nope"}),
                                  ("basic", {"Authorization": "Basic k-one"}), ("good", {"Authorization": "Bearer k-two"})]:
                async with http.post(url + "/v1/chat/completions", json=chat(), headers=headers) as r:
                    res[name] = (r.status, await r.json(), r.headers.get("WWW-Authenticate"))
            for path in ("/metrics", "/stats", "/v1/models"):
                async with http.get(url + path) as r:
                    res[path] = r.status
            for path in ("/health", "/", "/static/app.js"):
                async with http.get(url + path) as r:
                    res[path] = r.status
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as client:
                with pytest.raises(openai.AuthenticationError):
                    await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
            return res
    res = run(body())
    for name in ("none", "wrong", "basic"):
        status, out, www = res[name]
        assert status == 401 and www == "Bearer" and out["error"]["code"] == "invalid_api_key", name
        assert_openai_error(out)
    assert res["good"][0] == 200
    assert res["/metrics"] == res["/stats"] == res["/v1/models"] == 401
    assert res["/health"] == res["/"] == res["/static/app.js"] == 200


def test_queue_full_is_429_with_retry_after():
    node = FakeNode()
    node.busy = 2.5
    async def body():
        async with serving(node) as (http, url):
            out = []
            for path, payload in [("/v1/chat/completions", chat()), ("/v1/chat/completions", chat(stream=True)),
                                  ("/v1/completions", {"prompt": "x", "stream": True}),
                                  ("/v1/generate", {"prompt": "x"})]:
                async with http.post(url + path, json=payload) as r:
                    out.append((r.status, r.headers.get("Retry-After"), r.content_type, await r.json()))
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
            return out
    for status, retry, ctype, body_ in run(body()):
        assert status == 429 and retry == "3" and ctype == "application/json"
        assert_openai_error(body_, "rate_limit_error")


def test_client_disconnect_stops_the_generation_without_a_traceback(caplog):
    caplog.set_level(logging.DEBUG)
    async def one(path: str, stream: bool):
        node = FakeNode("x" * 200, piece_len=1)
        node.delay_s = 0.05
        payload = chat(stream=stream, max_tokens=200) if "chat" in path else {"prompt": "x", "stream": stream,
                                                                               "max_tokens": 200}
        async with serving(node) as (http, url):
            if stream:
                async with http.post(url + path, json=payload) as r:
                    await r.content.readline()                             # the first chunk, then hang up
                    r.close()
            else:
                with pytest.raises(asyncio.TimeoutError):
                    await http.post(url + path, json=payload, timeout=aiohttp.ClientTimeout(total=0.3))
            t = time.perf_counter()
            await asyncio.wait_for(node.closed.wait(), 2)                  # the node's stream was closed
            stopped_after = time.perf_counter() - t
            produced = node.produced
            await asyncio.sleep(0.3)
            assert node.produced == produced                               # and nothing more was generated
            node.delay_s = 0
            async with http.post(url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 200                                     # and the server serves on
            return stopped_after, produced
    for path in ("/v1/chat/completions", "/v1/generate"):
        for stream in (True, False):
            stopped_after, produced = run(one(path, stream))
            assert stopped_after < 0.5 and produced < 20, (path, stream, stopped_after, produced)
    server_logs = [r for r in caplog.records if r.name.startswith(("tandem", "aiohttp", "asyncio"))]
    assert not [r for r in server_logs if r.exc_info or r.levelno >= logging.ERROR], caplog.text


def test_a_queued_request_whose_client_left_is_dropped():
    node = FakeNode()
    async def waiting_forever(*a, **k):            # the node's queue: the turn never comes
        node.calls.append("queued")
        try:
            await asyncio.sleep(60)
            yield Piece([], "", [])
        finally:
            node.closed.set()
    node.stream = waiting_forever
    async def body():
        async with serving(node) as (http, url):
            with pytest.raises(asyncio.TimeoutError):
                await http.post(url + "/v1/chat/completions", json=chat(stream=True),
                                timeout=aiohttp.ClientTimeout(total=0.3))
            await asyncio.wait_for(node.closed.wait(), 1)
    run(body())
    assert node.calls == ["queued"]


def test_midstream_failure_ends_the_stream_unmistakably():
    node = FakeNode("abcdefghijkl", piece_len=2)
    node.fail_after = 2
    async def body():
        async with serving(node) as (http, url):
            async with http.post(url + "/v1/chat/completions", json=chat(stream=True)) as r:
                chunks = sse_events(await r.read())
            async with http.post(url + "/v1/chat/completions", json=chat()) as r:
                whole = (r.status, await r.json())
            async with http.post(url + "/v1/generate", json={"prompt": "x"}) as r:
                lines = [json.loads(x) for x in (await r.read()).splitlines()]
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
                got = []
                with pytest.raises(openai.APIError) as err:
                    async for c in await client.chat.completions.create(
                            model="fake-model", messages=[{"role": "user", "content": "x"}], stream=True):
                        got.append(c.choices[0].delta.content or "")
                node.fail_after = 0
                async with http.post(url + "/v1/chat/completions", json=chat()) as r:
                    nothing = (r.status, await r.json())
            return chunks, whole, lines, "".join(got), str(err.value), nothing
    chunks, whole, lines, got, err, nothing = run(body())
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "abcd"                                     # what was streamed stands
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "error" and "went away" in last["error"]["message"]
    assert last["error"]["type"] == "server_error" and last["tandem"]["error"]
    assert whole[0] == 200 and whole[1]["choices"][0]["finish_reason"] == "error"
    assert whole[1]["choices"][0]["message"]["content"] == "abcd" and whole[1]["tandem"]["error"]
    assert lines[-1]["done"] is True and lines[-1]["ok"] is False and "went away" in lines[-1]["error"]
    assert "".join(x["text"] for x in lines[:-1]) == "abcd"
    assert got == "abcd" and "went away" in err                # the SDK delivers the text, then raises
    assert nothing[0] == 502 and nothing[1]["error"]["code"] == "generation_failed"


def test_openai_sdk_chat_with_and_without_streaming():
    node = FakeNode("Hi there, ünïcode!", **{"edge.api_keys": ["sk-test"]})
    async def body():
        async with serving(node) as (http, url):
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0) as client:
                [model] = [m.id async for m in client.models.list()]
                msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
                whole = await client.chat.completions.create(model=model, messages=msgs, max_tokens=64, seed=1)
                parts, usage, finish = [], None, None
                stream = await client.chat.completions.create(model=model, messages=msgs, max_tokens=64, stream=True,
                                                              stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.choices:
                        parts.append(chunk.choices[0].delta.content or "")
                        finish = chunk.choices[0].finish_reason or finish
                    if chunk.usage:
                        usage = chunk.usage
                comp = await client.completions.create(model=model, prompt="Say", max_tokens=4)
            return whole, "".join(parts), usage, finish, comp
    whole, streamed, usage, finish, comp = run(body())
    assert whole.choices[0].message.content == streamed == "Hi there, ünïcode!"
    assert whole.choices[0].finish_reason == finish == "stop"
    assert whole.usage.completion_tokens == usage.completion_tokens == len("Hi there, ünïcode!".encode()) + 1
    assert whole.model_extra["tandem"]["mode"] == "edge_cloud"                       # Tandem's figures ride along
    assert node.calls[0]["prompt_ids"] == node.encode_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}])    # multi-turn
    assert comp.choices[0].text == "Hi t" and comp.choices[0].finish_reason == "length"


def test_no_cors_and_mode_errors():
    node = FakeNode()
    async def body():
        async with serving(node) as (http, url):
            async with http.options(url + "/v1/chat/completions", headers={
                    "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}) as r:
                pre = (r.status, dict(r.headers))
            async with http.post(url + "/v1/chat/completions", json=chat(),
                                 headers={"Origin": "http://evil.example"}) as r:
                post = dict(r.headers)
            async with http.post(url + "/v1/chat/completions", json=chat(mode="cloud_only")) as r:
                mode = (r.status, await r.json())
            return pre, post, mode
    (status, pre), post, mode = run(body())
    assert status == 405
    assert not [h for h in list(pre) + list(post) if h.lower().startswith("access-control-")]
    assert mode[0] == 400 and "cloud" in mode[1]["error"]["message"]


def test_health_is_truthful_and_stats_and_metrics_count():
    async def health(node):
        async with serving(node) as (http, url):
            async with http.get(url + "/health") as r:
                return r.status, await r.json()
    status, h = run(health(FakeNode()))                       # edge_cloud mode without a cloud link
    assert status == 200 and h["status"] == "degraded" and h["service"] == "tandem-edge"
    status, h = run(health(FakeNode(link=FakeLink(up=False))))
    assert status == 200 and h["status"] == "degraded" and h["cloud"]["up"] is False
    assert h["cloud"]["status"] == "unreachable"
    status, h = run(health(FakeNode(link=FakeLink(up=True))))
    assert h["status"] == "ok" and h["cloud"]["rtt_ms"] == 12.5 and h["cloud"]["health_factor"] == 0.9
    status, h = run(health(FakeNode(**{"switches.draft_verify": False})))
    assert h["status"] == "ok" and h["mode"] == "edge_only"

    node = FakeNode("Hello, world!", link=FakeLink())
    node.active_sessions, node.queue_depth = 2, 5
    async def body():
        async with serving(node) as (http, url):
            async with http.post(url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
            async with http.post(url + "/v1/chat/completions", json=chat(stream=True)) as r:
                await r.read()
            async with http.post(url + "/v1/chat/completions", json=chat(n=3)) as r:
                assert r.status == 400
            async with http.post(url + "/v1/generate", json={"prompt": "x", "stream": False}) as r:
                gen = await r.json()
            async with http.get(url + "/stats") as r:
                stats = await r.json()
            async with http.get(url + "/metrics") as r:
                assert r.content_type == "text/plain"
                return gen, stats, await r.text()
    gen, stats, metrics = run(body())
    assert gen["ok"] is True and gen["text"] == "Hello, world!" and set(gen["sources"]) == {"draft", "target"}
    assert stats["generations"] == 3 and stats["tokens"] == 42 and stats["tokens_draft"] == 27
    assert stats["link"]["rtt_ms"] == 12.5 and stats["queue_depth"] == 5

    def value(line_start):
        [line] = [x for x in metrics.splitlines() if x.rsplit(" ", 1)[0] == line_start]
        return float(line.rsplit(" ", 1)[1])
    assert value('tandem_edge_requests_total{endpoint="/v1/chat/completions",status="200"}') == 2
    assert value('tandem_edge_requests_total{endpoint="/v1/chat/completions",status="400"}') == 1
    assert value('tandem_edge_tokens_total{source="draft"}') == 27
    assert value('tandem_edge_tokens_total{source="target"}') == 15
    assert value("tandem_edge_rounds_total") == 15
    assert value("tandem_edge_accepted_length_count") == 15 and value("tandem_edge_ttft_seconds_count") == 3
    assert value("tandem_edge_link_rtt_ms") == 12.5 and value("tandem_edge_link_health_factor") == 0.9
    assert value("tandem_edge_cloud_up") == 1 and value("tandem_edge_queue_depth") == 5
    assert value("tandem_edge_active_sessions") == 2 and value("tandem_edge_cloud_down_events_total") == 1
    assert value("tandem_edge_fallbacks_total") == 0


def test_ndjson_generate_still_works():
    node = FakeNode("Hi!")
    async def body():
        async with serving(node) as (http, url):
            async with http.post(url + "/v1/generate", json={"prompt": "x", "max_tokens": 10}) as r:
                assert r.content_type == "application/x-ndjson"
                lines = [json.loads(x) for x in (await r.read()).splitlines()]
            async with http.post(url + "/v1/generate", json={"prompt": "x", "seed": -1}) as r:
                neg = (r.status, await r.json())
            async with http.post(url + "/v1/generate", data=json.dumps({"prompt": "x"}), headers={"Content-Type": "text/plain"}) as r:
                plain = r.status
            return lines, neg, plain
    lines, neg, plain = run(body())
    assert "".join(x["text"] for x in lines[:-1]) == "Hi!"
    assert [s for x in lines[:-1] for s in x["sources"]] == ["draft", "draft", "target", "target"]
    assert lines[-1]["done"] and lines[-1]["ok"] and lines[-1]["error"] is None and lines[-1]["stats"]["tokens"] == 4
    assert neg[0] == 422 and neg[1]["error"]["param"] == "seed" and plain == 415


def test_an_internal_error_is_a_500_in_openai_shape():
    node = FakeNode()
    def broken(messages):
        raise RuntimeError("boom")
    node.encode_messages = broken
    async def body():
        async with serving(node) as (http, url):
            async with http.post(url + "/v1/chat/completions", json=chat()) as r:
                out = (r.status, await r.json())
            async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
                return out, r.status
    (status, err), after = run(body())
    assert status == 500 and after == 200
    assert_openai_error(err, "server_error")
    assert "boom" not in err["error"]["message"]            # details stay in the edge's log


def test_slow_headers_and_idle_connections_are_closed_under_edge_limits():
    node = FakeNode(**{"edge.limits.header_timeout_s": 0.5, "edge.limits.keepalive_timeout_s": 0.5})
    async def closed_after(host, port, data: bytes) -> float:
        reader, writer = await asyncio.open_connection(host, port)
        t = time.perf_counter()
        writer.write(data)
        try:
            while await asyncio.wait_for(reader.read(1024), 5):
                pass
        finally:
            writer.close()
        return time.perf_counter() - t
    async def body():
        async with serving(node) as (http, url):
            host, port = url[len("http://"):].split(":")
            slow = await closed_after(host, int(port), b"GET /health HTTP/1.1\r\nHost: x\r\n")   # never ends its head
            idle = await closed_after(host, int(port), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")   # then idles
            return slow, idle
    slow, idle = run(body())
    assert slow < 2 and idle < 2, (slow, idle)
