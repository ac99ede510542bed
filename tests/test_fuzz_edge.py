"""Fuzz the edge's HTTP layer (issue 16) the way tests/test_fuzz.py fuzzes the cloud: thousands of
generated bodies, content types, methods and paths against the edge's real app on loopback. Every answer
must be < 500 with a JSON reason, none may hang, and /health must answer "ok" afterwards.

The node is the scripted fake of tests/test_openai_api.py: this is about the edge's parsing, validation,
streaming and error paths (OpenAI API and /v1/generate), not about models."""
from hypothesis import strategies as st

from common.http_limits import start_site
from edge.server import make_app
from test_fuzz import JSON_ANY, LiveServer, assert_alive, floats, fuzz_http, ints, json_bodies, near
from test_openai_api import FakeLink, FakeNode

HTTP_EXAMPLES = 2000
TEXT = st.text(max_size=20)
ROLES = st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool"]), TEXT)
CONTENT = st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                           "text": TEXT}), max_size=3), JSON_ANY)
MESSAGES = st.one_of(st.lists(st.fixed_dictionaries({"role": ROLES, "content": CONTENT},
                                                    optional={"name": TEXT, "tool_calls": JSON_ANY}), max_size=4),
                     JSON_ANY)
TOKENS = st.lists(st.one_of(st.integers(0, 400), ints()), max_size=8)
COMMON = {
    "model": st.one_of(st.just("fake-model"), TEXT, JSON_ANY), "max_tokens": ints(), "temperature": floats(),
    "top_p": floats(), "seed": st.one_of(st.none(), ints()), "stream": st.one_of(st.booleans(), JSON_ANY),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=6), JSON_ANY),
    "stream_options": st.one_of(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "x": JSON_ANY}),
                                JSON_ANY),
    "n": ints(), "logprobs": JSON_ANY, "tools": JSON_ANY, "presence_penalty": floats(), "user": TEXT,
    "response_format": st.one_of(st.just({"type": "text"}), JSON_ANY), "mode": st.one_of(
        st.sampled_from(["edge_cloud", "edge_only", "cloud_only"]), JSON_ANY), "surprise": JSON_ANY}
CHAT = st.fixed_dictionaries({}, optional={**COMMON, "messages": MESSAGES, "max_completion_tokens": ints()})
COMPLETION = st.fixed_dictionaries({}, optional={**COMMON, "prompt": st.one_of(
    TEXT, st.lists(TEXT, max_size=3), TOKENS, st.lists(TOKENS, max_size=2), JSON_ANY), "echo": JSON_ANY})
GENERATE = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(TEXT, JSON_ANY), "prompt_ids": st.one_of(TOKENS, JSON_ANY), "raw": JSON_ANY,
    "max_tokens": ints(), "temperature": floats(), "top_p": floats(), "seed": ints(), "mode": JSON_ANY,
    "stream": st.one_of(st.booleans(), JSON_ANY), "surprise": JSON_ANY})

SMALL = st.integers(1, 6)
VALID_CHAT = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system"]), "content": TEXT}), min_size=1, max_size=2), "max_tokens": SMALL},
    optional={"stream": st.booleans(), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2)})
VALID_COMPLETION = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20), "max_tokens": SMALL},
                                         optional={"stream": st.booleans()})
VALID_GENERATE = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20), "max_tokens": SMALL},
                                       optional={"stream": st.booleans()})

CHAT_BODIES = json_bodies(CHAT, near(VALID_CHAT, CHAT), near(VALID_CHAT, CHAT))
EDGE_ENDPOINTS = [
    ("POST", "/v1/chat/completions", CHAT_BODIES), ("POST", "/v1/chat/completions", CHAT_BODIES),
    ("POST", "/v1/chat/completions", CHAT_BODIES),
    ("POST", "/v1/completions", json_bodies(COMPLETION, near(VALID_COMPLETION, COMPLETION))),
    ("POST", "/v1/generate", json_bodies(GENERATE, near(VALID_GENERATE, GENERATE))),
    ("GET", "/v1/models", None), ("GET", "/v1/models/{}", None), ("GET", "/health", None), ("GET", "/stats", None),
    ("GET", "/metrics", None), ("GET", "/", None), ("GET", "/v1/chat/completions", None),
    ("PUT", "/v1/completions", json_bodies(COMPLETION)), ("POST", "/{}", json_bodies(CHAT)), ("DELETE", "/{}", None),
]


def test_fuzz_edge_http():
    node = FakeNode("Hi, wörld!", link=FakeLink(up=True))

    async def start():
        return await start_site(make_app(node), "127.0.0.1", 0, node.cfg.edge.limits)
    with LiveServer(start) as srv:
        fuzz_http(srv, EDGE_ENDPOINTS, HTTP_EXAMPLES)
        assert_alive(srv)
        metrics = srv.call(_get(srv, "/metrics"))
    assert len(node.calls) > 50                     # the fuzz reached real generations, not only errors
    statuses = {line.split('status="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith("tandem_edge_requests_total{")}
    assert statuses and not [s for s in statuses if s.startswith("5")], statuses


async def _get(srv, path):
    async with srv.http.get(srv.url + path) as r:
        return await r.text()
