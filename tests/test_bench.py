"""The serving benchmark (ablations/bench.py): its metrics from hand-worked outputs (exact), the same
metrics measured off a scripted SSE server over loopback (to a stated tolerance), vLLM's arrivals
(Poisson/gamma statistics, the schedule as the server sees it, the concurrency cap), failures, the
datasets and the CLI. Fast: no models; one slow smoke test against a real edge."""
import asyncio
import contextlib
import json
import math
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from ablations import bench
from ablations.bench import BenchRequest, RequestOutput, compute_metrics, load_requests, run_benchmark
from common import prompts

# Live timings on a shared 2-core machine (other jobs running: load 4-5 seen while writing these): the
# typical (median) request is measured to within LIVE_TOL_S of the script; one chunk now and then is
# delayed by up to LATE_S. The scripted gaps (>= 100 ms) are far apart compared with both.
LIVE_TOL_S = 0.03
LATE_S = 0.2


# ------------------------------------------------------------------ a scripted OpenAI-shaped server

class ScriptedEdge:
    """/v1/chat/completions streaming as the edge does (role + content chunks with `tandem`, a last chunk
    with finish_reason and figures, a usage chunk, [DONE]). The user message names the script; a script
    is {"chunks": [(seconds after arrival, [token ids]), ...], "figures": {...}, "finish": "length",
    "role_chunk": True (first a chunk with the role alone, as vLLM's server sends),
    "status": 429|500 (an HTTP error instead), "error": "why" (finish_reason "error"), "drop": True
    (the connection is cut after the chunks)}. Counts streams in flight (peak) and arrival times."""

    def __init__(self, scripts: dict, default: str | None = None):
        self.scripts, self.default = scripts, default
        self.active = self.peak = 0
        self.arrivals: list[float] = []
        self.bodies: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", lambda r: web.json_response(
            {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        self.arrivals.append(t0)
        body = await request.json()
        self.bodies.append(body)
        s = self.scripts.get(body["messages"][0]["content"]) or self.scripts[self.default]
        if "status" in s:
            return web.json_response({"error": {"message": s.get("message", "scripted failure"), "type": "x",
                                                "param": None, "code": None}}, status=s["status"])
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n, role_alone = 0, s.get("role_chunk", False)
            if role_alone:          # as vLLM's server: a first chunk with the role and no token
                await resp.write(sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "finish_reason": None}]}))
            for i, (at, ids) in enumerate(s["chunks"]):
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                texts = [f"<{t}>" for t in ids]
                delta = ({"role": "assistant"} if i == 0 and not role_alone else {}) | {"content": "".join(texts)}
                await resp.write(sse({"choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                                      "tandem": {"token_ids": ids, "sources": ["draft"] * len(ids), "texts": texts}}))
                n += len(ids)
            if s.get("drop"):
                request.transport.close()
                return resp
            usage = {"prompt_tokens": s.get("prompt_tokens", 11), "completion_tokens": n, "total_tokens": 11 + n}
            finish = "error" if "error" in s else s.get("finish", "length")
            last = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "tandem": s.get("figures", {})}
            if "error" in s:
                last |= {"error": {"message": s["error"], "type": "server_error", "code": "generation_failed"},
                         "usage": usage}
            await resp.write(sse(last))
            if body.get("stream_options", {}).get("include_usage") and "error" not in s:
                await resp.write(sse({"choices": [], "usage": usage}))
        finally:
            self.active -= 1          # before [DONE]: the client cannot start another stream before it reads it
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


@contextlib.contextmanager
def serve(server: ScriptedEdge):
    """The server on a loopback port, on its own event loop in a thread (the benchmark runs asyncio.run)."""
    loop, started = asyncio.new_event_loop(), threading.Event()
    state = {}

    async def up():
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["runner"], state["url"] = runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(up()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield state["url"]
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def requests_for(*names, max_tokens=8, **kw):
    return [BenchRequest(prompt=n, id=f"r{i}", dataset="humaneval", max_tokens=max_tokens, **kw)
            for i, n in enumerate(names)]


def run(url, reqs, **kw):
    return asyncio.run(run_benchmark(url, reqs, progress=False, **kw))


# ------------------------------------------------------------------ compute_metrics, exact

def out(ttft, itl, latency, tokens, prompt_len, start, chunk_times, chunk_tokens, figures=None, rtt_class=None,
        dataset="humaneval"):
    return RequestOutput(id="x", dataset=dataset, rtt_class=rtt_class, success=True, prompt_len=prompt_len,
                         output_tokens=tokens, ttft=ttft, itl=itl, latency=latency, start_time=start,
                         chunk_times=chunk_times, chunk_tokens=chunk_tokens, figures=figures, finish_reason="length")


def fig(mode, rounds, drafted, accepted, tokens, draft, target, compute, rtt):
    return {"mode": mode, "rounds": rounds, "drafted": drafted, "accepted": accepted, "tokens": tokens,
            "tokens_by_source": {"draft": draft, "target": target, "edge": 0}, "compute_ms_per_round": compute,
            "compute_ms": None if compute is None else compute * rounds,
            "rtt_ms": rtt, "fallbacks": 0}


@pytest.fixture
def worked():
    """Four requests and a failure, worked by hand below (times in s)."""
    return [
        out(0.1, [0.05, 0.15], 0.3, 4, 10, 0.0, [0.1, 0.15, 0.3], [1, 2, 1],
            fig("edge_cloud", 2, 6, 2, 4, 2, 2, 10.0, 20.0)),                       # very_good
        out(0.2, [0.1], 0.3, 3, 20, 0.5, [0.2, 0.3], [1, 2],
            fig("edge_cloud", 1, 4, 2, 3, 2, 1, 30.0, 700.0), dataset="mtbench"),   # bad
        out(0.3, [], 0.3, 1, 30, 0.6, [0.3], [1],
            fig("cloud_only", 0, 0, 0, 1, 0, 1, None, 2000.0)),                     # very_bad
        out(0.4, [0.2, 0.3, 0.2], 1.1, 8, 40, 1.2, [0.4, 0.6, 0.9, 1.1], [1, 2, 2, 3],
            fig("edge_cloud", 4, 12, 4, 8, 4, 4, 5.0, 10.0), rtt_class="bad"),      # its own class wins
        RequestOutput(id="e", dataset="mtbench", error="HTTP 429: busy"),
    ]


def test_latency_metrics_are_vllms_worked_by_hand(worked):
    r = compute_metrics(worked, 2.0, None, (50, 90, 99, 99.9))
    approx = lambda x: pytest.approx(x, abs=1e-9)                       # noqa: E731
    assert (r["completed"], r["failed"], r["duration"]) == (4, 1, 2.0)
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (100, 16)
    assert r["request_throughput"] == 2.0 and r["output_throughput"] == 8.0 and r["total_token_throughput"] == 58.0
    assert r["request_goodput"] is None
    # TTFT 100, 200, 300, 400 ms
    assert r["mean_ttft_ms"] == approx(250) and r["median_ttft_ms"] == approx(250)
    assert r["std_ttft_ms"] == approx(math.sqrt(12500)) and r["p50_ttft_ms"] == approx(250)
    assert r["p90_ttft_ms"] == approx(370) and r["p99_ttft_ms"] == approx(397) and r["p99.9_ttft_ms"] == approx(399.7)
    # TPOT = (E2EL - TTFT) / (tokens - 1): 200/3, 50, (one token: none), 700/7 = 100
    assert r["mean_tpot_ms"] == approx((200 / 3 + 50 + 100) / 3) and r["median_tpot_ms"] == approx(200 / 3)
    assert r["p90_tpot_ms"] == approx(200 / 3 + 0.8 * (100 - 200 / 3))
    assert r["p99_tpot_ms"] == approx(200 / 3 + 0.98 * (100 - 200 / 3))
    # ITL: every gap, pooled: 50, 150, 100, 200, 300, 200
    assert r["mean_itl_ms"] == approx(1000 / 6) and r["median_itl_ms"] == approx(175)
    assert r["p90_itl_ms"] == approx(250) and r["p99_itl_ms"] == approx(295)
    # E2EL 300, 300, 300, 1100
    assert r["mean_e2el_ms"] == approx(500) and r["median_e2el_ms"] == approx(300)
    assert r["std_e2el_ms"] == approx(math.sqrt(120000))
    assert r["p90_e2el_ms"] == approx(860) and r["p99_e2el_ms"] == approx(1076)
    # busiest second: 4 + 3 + 1 tokens in [0, 1); overlap: the 2nd and 3rd requests
    assert r["max_output_tokens_per_s"] == 8 and r["max_concurrent_requests"] == 2
    assert r["output_lens"] == [4, 3, 1, 8, 0] and r["input_lens"] == [10, 20, 30, 40, 0]
    assert r["ttfts"][:4] == [0.1, 0.2, 0.3, 0.4] and r["itls"][3] == [0.2, 0.3, 0.2]
    assert r["latencies"][3] == 1.1 and r["errors"] == ["", "", "", "", "HTTP 429: busy"]
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("slos,good", [
    ({"ttft": 300, "tpot": 70}, 3),       # 4th: TTFT 400; the 1-token request has TPOT 0; 300 == 300 meets
    ({"e2el": 300}, 3),                   # 4th: 1100 ms
    ({"tpot": 60}, 2),                    # 1st: 66.7 ms, 4th: 100 ms
    ({"ttft": 99}, 0),
    ({"ttft": 2000, "tpot": 100, "e2el": 1100}, 4),
])
def test_goodput_counts_requests_meeting_every_slo(worked, slos, good):
    assert compute_metrics(worked, 2.0, slos)["request_goodput"] == good / 2.0


def test_tandem_figures_overall_per_dataset_and_rtt_class(worked):
    r = compute_metrics(worked, 2.0, {"tpot": 60})
    t = r["tandem"]
    assert t["tau"] == pytest.approx((8 + 7) / 7)             # Σ(accepted + rounds) / Σ rounds
    assert t["acceptance_rate"] == pytest.approx(8 / 22) and r["spec_decode_acceptance_rate"] == pytest.approx(800 / 22)
    assert r["spec_decode_acceptance_length"] == t["tau"] and r["spec_decode_num_drafts"] == t["rounds"] == 7
    assert t["cloud_compute_ms_per_token"] == pytest.approx((20 + 30 + 20) / 15)   # the cloud-only answer reports no compute here
    assert t["tokens_by_source"] == {"draft": 8, "target": 8, "edge": 0}
    assert t["modes"] == {"edge_cloud": 3, "cloud_only": 1} and t["rounds_per_request"] == 7 / 4
    classes = t["per_rtt_class"]
    assert set(classes) == {"very_good", "bad", "very_bad", "unknown"}
    assert (classes["bad"]["completed"], classes["unknown"]["failed"]) == (2, 1)
    assert classes["bad"]["tau"] == pytest.approx((2 + 1 + 4 + 4) / 5)
    assert classes["bad"]["median_ttft_ms"] == pytest.approx(300) and classes["bad"]["request_goodput"] == 0.5
    assert classes["very_bad"]["tau"] is None and classes["very_bad"]["cloud_compute_ms_per_token"] is None
    ds = t["per_dataset"]
    assert (ds["humaneval"]["completed"], ds["mtbench"]["completed"], ds["mtbench"]["failed"]) == (3, 1, 1)
    assert ds["mtbench"]["mean_tpot_ms"] == pytest.approx(50)
    assert [q["rtt_class"] for q in t["requests"]] == ["very_good", "bad", "very_bad", "bad", "unknown"]


def test_rtt_class_bounds():
    assert [bench.rtt_class_of(x) for x in (0, 99.99, 100, 399.9, 400, 1099.9, 1100, 5000, None)] == \
        ["very_good", "very_good", "good", "good", "bad", "bad", "very_bad", "very_bad", None]


def test_empty_and_bad_arguments():
    r = compute_metrics([RequestOutput(error="x")], 1.0, {"ttft": 1})
    assert (r["completed"], r["failed"], r["mean_ttft_ms"], r["request_goodput"]) == (0, 1, 0.0, 0.0)
    assert r["tandem"]["tau"] is None
    with pytest.raises(ValueError, match="goodput SLO 'ttfb'"):
        compute_metrics([], 1.0, {"ttfb": 1})
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([], 0.0)
    with pytest.raises(ValueError, match="percentiles"):
        compute_metrics([], 1.0, None, (50, 101))
    with pytest.raises(ValueError, match="KEY:MS"):
        bench.parse_goodput(["ttft=3"])
    assert bench.parse_goodput(["ttft:2000", "tpot:100"]) == {"ttft": 2000.0, "tpot": 100.0}


# ------------------------------------------------------------------ arrivals

def gaps(times):
    return np.diff([0.0, *times])


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_the_rate_and_the_burstiness_variance(burstiness):
    rate, n = 10.0, 40000
    g = gaps(bench.arrival_times(n, rate, burstiness, seed=3))
    assert g.mean() == pytest.approx(1 / rate, rel=1e-9)            # vLLM scales the total to n / rate
    cv2 = g.var() / g.mean() ** 2                                   # gamma(shape b): CV² = 1/b; Poisson: 1
    assert cv2 == pytest.approx(1 / burstiness, rel=0.06)


def test_arrivals_inf_rate_uniform_and_seeded():
    assert bench.arrival_times(5, math.inf, 1.0) == [0.0] * 5
    assert gaps(bench.arrival_times(4, 2.0, math.inf)) == pytest.approx([0.5] * 4)
    assert bench.arrival_times(50, 5.0, 1.0, seed=1) == bench.arrival_times(50, 5.0, 1.0, seed=1)
    assert bench.arrival_times(50, 5.0, 1.0, seed=1) != bench.arrival_times(50, 5.0, 1.0, seed=2)
    for bad in ({"request_rate": 0}, {"request_rate": 1, "burstiness": 0}):
        with pytest.raises(ValueError):
            bench.arrival_times(3, **{"burstiness": 1.0, **bad})


def test_the_server_sees_the_poisson_schedule():
    n, rate = 20, 10.0
    server = ScriptedEdge({"q": {"chunks": [(0.0, [1])]}})
    with serve(server) as url:
        r = run(url, requests_for(*["q"] * n), request_rate=rate, seed=7)
    assert r["completed"] == n
    sched = np.array(bench.arrival_times(n, rate, 1.0, seed=7))
    seen = np.array(sorted(server.arrivals))
    late = seen - sched - np.median(seen - sched)          # each arrival against the schedule, common offset removed
    assert np.median(np.abs(late)) < LIVE_TOL_S / 3 and np.quantile(np.abs(late), 0.75) < LIVE_TOL_S
    assert np.abs(late).max() < LATE_S
    assert np.diff(seen).mean() == pytest.approx(np.diff(sched).mean(), abs=0.005)
    assert r["request_rate"] == rate and r["burstiness"] == 1.0


@pytest.mark.parametrize("cap", [3, None])
def test_max_concurrency_is_never_exceeded(cap):
    n = 12
    server = ScriptedEdge({"q": {"chunks": [(0.03, [1]), (0.06, [2])]}})
    with serve(server) as url:
        r = run(url, requests_for(*["q"] * n), max_concurrency=cap)
    assert r["completed"] == n and server.peak == (cap or n)
    assert r["max_concurrent_requests"] <= (cap or n) and r["max_concurrency"] == cap
    if cap:
        assert max(r["queue_times"]) > 0.05 and "p99_client_queue_time_ms" in r


# ------------------------------------------------------------------ the live stream

FIGURES = {"mode": "edge_cloud", "rounds": 2, "drafted": 5, "accepted": 2, "tokens": 4, "fallbacks": 0,
           "mean_accepted_length": 2.0, "tokens_by_source": {"draft": 2, "target": 2, "edge": 0},
           "compute_ms_per_round": 12.5, "compute_ms": 25.0, "rtt_ms": 700.0}


def test_timings_measured_off_a_scripted_stream():
    script = {"chunks": [(0.2, [1]), (0.3, [2, 3]), (0.6, [4])], "figures": FIGURES, "prompt_tokens": 17,
              "role_chunk": True}
    server = ScriptedEdge({"timed": script})
    n = 6
    with serve(server) as url:
        r = run(url, requests_for(*["timed"] * n, max_tokens=9, mode="edge_cloud"), max_concurrency=2,
                goodput={"ttft": 500, "tpot": 200}, api_key="k", headers_for=lambda q: {"X-Req": q.id})
    assert (r["completed"], r["failed"], r["model_id"]) == (n, 0, "fake-model")
    ttft, e2el = np.array(r["ttfts"]), np.array(r["latencies"])
    itl = np.array(r["itls"])
    # no chunk can arrive before it was sent; a busy machine may delay one (LATE_S), not the typical one
    assert ttft.min() >= 0.2 and e2el.min() >= 0.6
    assert ttft.max() < 0.2 + LATE_S and e2el.max() < 0.6 + LATE_S
    assert np.median(ttft) == pytest.approx(0.2, abs=LIVE_TOL_S)
    assert np.median(e2el) == pytest.approx(0.6, abs=LIVE_TOL_S)
    assert np.median(itl, axis=0) == pytest.approx([0.1, 0.3], abs=LIVE_TOL_S)
    assert r["median_tpot_ms"] == pytest.approx((600 - 200) / 3, abs=1e3 * LIVE_TOL_S)    # 4 tokens: 3 after the 1st
    assert r["median_e2el_ms"] == pytest.approx(1e3 * np.median(e2el))
    assert r["mean_itl_ms"] == pytest.approx(1e3 * itl.mean())
    assert r["output_lens"] == [4] * n and r["input_lens"] == [17] * n and r["request_goodput"] > 0
    assert r["generated_texts"] == ["<1><2><3><4>"] * n
    assert r["tandem"]["tau"] == 2.0 and r["tandem"]["cloud_compute_ms_per_token"] == pytest.approx(25 / 4)
    assert list(r["tandem"]["per_rtt_class"]) == ["bad"]                       # rtt_ms 700
    q = r["tandem"]["requests"][0]
    assert q["chunk_tokens"] == [1, 2, 1] and q["chunk_times"] == pytest.approx(
        [r["ttfts"][0], r["ttfts"][0] + r["itls"][0][0], r["latencies"][0]])
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 9 and body["model"] == "fake-model" and body["mode"] == "edge_cloud"
    assert body["messages"] == [{"role": "user", "content": "timed"}] and body["temperature"] == 0.0
    json.dumps(r, allow_nan=False)


def test_failed_requests_are_counted_with_their_reason():
    scripts = {"ok": {"chunks": [(0.0, [1]), (0.01, [2])], "figures": FIGURES},
               "busy": {"status": 429, "message": "the edge is busy: 32 waiting"},
               "boom": {"status": 500, "message": "internal error (logged on the edge)"},
               "mid": {"chunks": [(0.0, [1])], "error": "CloudError: verify failed", "figures": FIGURES},
               "cut": {"chunks": [(0.0, [1])], "drop": True}}
    with serve(ScriptedEdge(scripts)) as url:
        r = run(url, requests_for(*scripts), goodput={"ttft": 1000})
    assert (r["completed"], r["failed"]) == (1, 4)
    errors = dict(zip(scripts, r["errors"]))
    assert errors["ok"] == ""
    assert errors["busy"] == "HTTP 429: the edge is busy: 32 waiting"
    assert errors["boom"] == "HTTP 500: internal error (logged on the edge)"
    assert errors["mid"] == "CloudError: verify failed"
    assert errors["cut"]                                # a cut stream: a payload error or no [DONE]
    assert r["output_lens"] == [2, 0, 0, 0, 0] and r["request_goodput"] == 1 / r["duration"]
    assert r["tandem"]["per_rtt_class"]["unknown"]["failed"] == 3       # mid carries rtt_ms: class "bad"
    bad = r["tandem"]["per_rtt_class"]["bad"]
    assert (bad["completed"], bad["failed"]) == (1, 1)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(bench.BenchError, match="cannot reach http://127.0.0.1:9/v1/models"):
        asyncio.run(run_benchmark("http://127.0.0.1:9", requests_for("x"), progress=False, timeout_s=5))
    with pytest.raises(ValueError, match="max_concurrency"):
        asyncio.run(run_benchmark("http://127.0.0.1:9", requests_for("x"), max_concurrency=0))


# ------------------------------------------------------------------ datasets and the CLI

def test_load_requests_datasets_splits_and_seed():
    held = load_requests("heldout", 10, max_tokens=16, seed=1)
    assert [q.dataset for q in held] == ["humaneval", "mtbench"] * 5 and all(q.max_tokens == 16 for q in held)
    held_ids = {p.id for p in prompts.humaneval("heldout")} | {p.id for p in prompts.mtbench("heldout")}
    assert {q.id for q in held} <= held_ids
    assert load_requests("heldout", 10, seed=1) == load_requests("heldout", 10, "heldout", seed=1)
    assert [q.id for q in load_requests("mixed", 6, seed=1)] != [q.id for q in load_requests("mixed", 6, seed=2)]
    tune = load_requests("mtbench", 30, "tune")
    assert not {q.id for q in tune} & held_ids and {q.dataset for q in tune} == {"mtbench"}
    he = {p.id: p.text for p in prompts.humaneval()}
    many = load_requests("humaneval", len(he) + 5)
    assert len({q.id for q in many}) == len(many) and sum("#1" in q.id for q in many) == 5
    assert all(he[q.id.split("#")[0]] == q.prompt for q in many)
    for bad in (("nope", 3), ("humaneval", 0), ("heldout", 3, "tune")):
        with pytest.raises(ValueError):
            load_requests(*bad)


def test_cli_prints_the_table_and_writes_vllm_fields(tmp_path, capsys):
    server = ScriptedEdge({"any": {"chunks": [(0.01, [1, 2]), (0.02, [3])], "figures": FIGURES}}, default="any")
    path = tmp_path / "out.json"
    with serve(server) as url:
        rc = bench.main(["--base-url", url, "--dataset", "mixed", "--num-prompts", "4", "--max-tokens", "8",
                         "--request-rate", "inf", "--max-concurrency", "2", "--goodput", "ttft:2000", "tpot:100",
                         "--result-file", str(path), "--seed", "0", "--disable-tqdm"])
    printed = capsys.readouterr().out
    assert rc == 0 and "Serving Benchmark Result" in printed and "Mean TTFT (ms):" in printed
    assert "P90 TPOT (ms):" in printed and "Mean accepted length (tau):" in printed and "Request goodput" in printed
    r = json.loads(path.read_text())
    for k in ("date", "backend", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency",
              "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
              "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
              "max_concurrent_requests", "input_lens", "output_lens", "ttfts", "itls", "latencies", "errors",
              "generated_texts", "start_times", "mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p99_e2el_ms",
              "p50_ttft_ms", "p90_tpot_ms", "spec_decode_acceptance_length", "tandem", "command"):
        assert k in r, k
    assert r["request_rate"] == "inf" and r["num_prompts"] == 4 and r["completed"] == 4
    assert {b["messages"][0]["content"][:8] for b in server.bodies} >= {"Complete"}
    assert set(r["tandem"]["per_dataset"]) == {"humaneval", "mtbench"}


def test_cli_bad_input_is_a_message_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--goodput", "ttft:fast"])
    assert e.value.code == 2 and "KEY:MS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--result-file", "/nonexistent-dir/out.json"])
    assert "directory does not exist" in capsys.readouterr().err
    assert bench.main(["--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--disable-tqdm"]) == 1
    assert "cannot reach" in capsys.readouterr().err


# ------------------------------------------------------------------ a real edge

@pytest.mark.slow
def test_smoke_against_a_real_edge():
    from tests.edge_http import edge_server
    from tests.realmodels import config
    with edge_server(config()) as server:
        r = run(server.url, load_requests("mixed", 2, max_tokens=8), goodput={"ttft": 60000, "tpot": 10000})
    assert (r["completed"], r["failed"]) == (2, 0), r["errors"]
    for k in ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p90_e2el_ms", "request_goodput",
              "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls"):
        assert k in r, k
    t = r["tandem"]
    assert t["tau"] > 0 and t["modes"] == {"edge_cloud": 2} and t["cloud_compute_ms_per_token"] > 0
    assert sum(t["tokens_by_source"].values()) == r["total_output_tokens"] > 0
    assert set(t["per_dataset"]) == {"humaneval", "mtbench"} and set(t["per_rtt_class"]) <= set(bench.RTT_CLASSES)
    json.dumps(r, allow_nan=False)
