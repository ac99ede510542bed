"""A serving benchmark of an OpenAI-compatible chat endpoint (the edge's), with the conventions of
`vllm bench serve`, so its JSON can be laid beside vLLM's.

    python -m ablations.bench --base-url http://127.0.0.1:8081 --dataset humaneval --num-prompts 20 \
        --max-tokens 64 --request-rate inf --burstiness 1.0 --max-concurrency 4 \
        --goodput ttft:2000 tpot:100 --result-file out.json --seed 0

Each request streams POST /v1/chat/completions (stream: true, stream_options.include_usage) over
aiohttp, as a real client does, and records when every chunk that carries tokens arrives.

Arrivals, as vLLM's `get_request`: the gap before each request is 0 at --request-rate inf (all sent at
once), 1/rate at --burstiness inf, else drawn from a gamma distribution with shape = burstiness and
scale = 1 / (rate * burstiness) (burstiness 1: a Poisson process); the cumulative times are then
scaled so the last one falls at num_prompts / rate (vLLM does this to steady throughput across seeds).
Seeded by --seed. --max-concurrency caps the requests in flight with a semaphore (a request waiting
for it counts its wait as client_queue_time, not as latency).

Per request (vLLM's definitions; times from the moment the request is sent):
  TTFT  the first chunk that carries tokens (content text or tandem.token_ids; a role-only chunk does not)
  ITL   every gap between two consecutive such chunks (a chunk may carry several tokens: speculation)
  E2EL  the last such chunk ("latencies")
  TPOT  (E2EL - TTFT) / (output_tokens - 1), output_tokens = usage.completion_tokens; only requests
        with more than one token enter TPOT's statistics; for goodput a one-token request has TPOT 0
Each of ttft|tpot|itl|e2el gets mean_X_ms, median_X_ms, std_X_ms (population) and pP_X_ms for every
percentile asked (numpy's linear percentile; p99.9 -> "p99.9_X_ms"); empty -> 0, as vLLM.
request_throughput = completed / duration, output_throughput = output tokens / duration,
total_token_throughput = (input + output tokens) / duration; request_goodput = requests meeting every
SLO given (--goodput ttft:MS tpot:MS e2el:MS; a value equal to its SLO meets it) / duration.

A request fails (counted in `failed`, its reason in `errors`) on an HTTP error (429, 500, ...: the
status and the server's message), a stream ending with finish_reason "error" (the chunk's error
message), a stream that ends without [DONE], no chunk with tokens, or a connection error. Failed
requests enter no latency figure.

JSON fields (top level, vLLM's names): date, backend, endpoint_type, label, model_id, num_prompts,
request_rate ("inf" or a number), burstiness, max_concurrency, duration, completed, failed,
total_input_tokens, total_output_tokens, request_throughput, request_goodput (null without --goodput),
output_throughput, total_token_throughput, max_output_tokens_per_s, max_concurrent_requests,
{mean,median,std,pP}_{ttft,tpot,itl,e2el}_ms, {mean,median,std,pP}_client_queue_time_ms (with
max_concurrency), per request: input_lens, output_lens, ttfts, itls, latencies (seconds), start_times
(seconds since the benchmark began), queue_times, generated_texts, errors; and, where the server
reports speculation, spec_decode_acceptance_rate (%), spec_decode_acceptance_length,
spec_decode_num_drafts, spec_decode_draft_tokens, spec_decode_accepted_tokens.
Also goodput (the SLOs in ms), temperature, seed, percentiles.

`tandem` (what only Tandem reports; from each generation's last chunk, successful requests only):
  tau                   Σ(accepted + rounds) / Σ rounds: tokens committed per verify round, every round
                        weighing the same (so a request counts by its rounds, i.e. by the tokens it
                        committed); = vLLM's acceptance length
  acceptance_rate       Σ accepted / Σ drafted (a fraction; vLLM's spec_decode_acceptance_rate is in %)
  rounds, rounds_per_request, drafted, accepted, fallbacks, modes {mode: requests}
  cloud_compute_ms_per_token   Σ compute_ms / Σ tokens over requests the cloud served (edge-cloud, cloud-only)
                        rounds (cloud-only generations report no per-round compute: left out)
  tokens_by_source      {draft, target, edge}: committed tokens by provenance
  rtt_class_bounds_ms   RTT_CLASS_BOUNDS_MS below
  per_dataset, per_rtt_class   {name: the vLLM latency/throughput fields above (no per-request
                        lists) + the figures above, for that group}
  requests              per request: id, dataset, rtt_class, rtt_ms, success, finish_reason,
                        chunk_times (s since sent), chunk_tokens (tokens per chunk), figures
A request's RTT class is its BenchRequest.rtt_class if set, else its generation's rtt_ms (the edge's
smoothed RTT to the cloud) bucketed by RTT_CLASS_BOUNDS_MS, else "unknown".
"""
from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterator, Optional, Sequence

import aiohttp
import numpy as np
from tqdm import tqdm

from common import prompts

# RTT classes, the population experiment's: a class holds RTTs below its bound (ms) and at or above
# the previous one's: very_good < 100 <= good < 400 <= bad < 1100 <= very_bad. The bounds part the
# components of its RTT mixture (ablations/replay.py RTT_MIXTURE: N(20,10), N(200,30), N(700,80),
# N(2000,400) ms), each bound at least 3.3 standard deviations from the components on either side
# except the last (2.25 below N(2000,400): about 1 % of that 1 % falls in `bad`).
RTT_CLASS_BOUNDS_MS: tuple[tuple[str, float], ...] = (
    ("very_good", 100.0), ("good", 400.0), ("bad", 1100.0), ("very_bad", math.inf))
RTT_CLASSES = tuple(name for name, _ in RTT_CLASS_BOUNDS_MS)
UNKNOWN_RTT_CLASS = "unknown"

DATASETS = ("humaneval", "mtbench", "heldout", "mixed")
SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
ENDPOINT = "/v1/chat/completions"
BACKEND = "openai-chat"
TIMEOUT_S = 6 * 60 * 60          # vLLM's AIOHTTP_TIMEOUT
NO_TOKEN_ERROR = "Never received a valid chunk to calculate TTFT. This response will be marked as failed!"


class BenchError(RuntimeError):
    """The benchmark cannot run (the server cannot be reached, has no model, ...)."""


@dataclass
class BenchRequest:
    prompt: str                          # the user message
    id: str
    dataset: str                         # humaneval | mtbench (where the prompt came from)
    max_tokens: int = 128
    rtt_class: Optional[str] = None      # set by who knows the user's link; else from the answer's rtt_ms
    mode: Optional[str] = None           # Tandem's request field: edge_cloud | edge_only | cloud_only


@dataclass
class RequestOutput:
    """One request as the client saw it. Times in seconds."""
    id: str = ""
    dataset: str = ""
    rtt_class: Optional[str] = None      # the request's own class (None: from figures.rtt_ms)
    success: bool = False
    error: str = ""
    generated_text: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0                 # E2EL
    start_time: float = 0.0              # when sent, since the benchmark began
    client_queue_time: float = 0.0       # waiting for --max-concurrency before it was sent
    chunk_times: list[float] = field(default_factory=list)    # since sent, one per chunk with tokens
    chunk_tokens: list[int] = field(default_factory=list)     # tokens in that chunk
    finish_reason: Optional[str] = None
    figures: Optional[dict] = None       # the last chunk's `tandem` (the generation's figures)


def rtt_class_of(rtt_ms: Optional[float]) -> Optional[str]:
    if rtt_ms is None:
        return None
    return next(name for name, bound in RTT_CLASS_BOUNDS_MS if rtt_ms < bound)


def resolved_rtt_class(out: RequestOutput) -> str:
    return out.rtt_class or rtt_class_of((out.figures or {}).get("rtt_ms")) or UNKNOWN_RTT_CLASS


# ---------------------------------------------------------------- data

def _passes(name: str, items: list, rng: np.random.Generator, max_tokens: int) -> Iterator[BenchRequest]:
    """The prompts in a seeded order, reshuffled for each further pass (ids then get '#pass')."""
    for k in range(1 << 62):
        for i in rng.permutation(len(items)):
            p = items[i]
            yield BenchRequest(prompt=p.text, id=p.id if k == 0 else f"{p.id}#{k}", dataset=name,
                               max_tokens=max_tokens)


def load_requests(dataset: str, num_prompts: int, split: str = "all", max_tokens: int = 128,
                  seed: int = 0) -> list[BenchRequest]:
    """num_prompts requests: humaneval | mtbench (of `split`), heldout (the held-out split of both) or
    mixed (both, of `split`). Several datasets alternate (humaneval, mtbench, humaneval, ...). Each is
    in a seeded random order; past its end it starts again in a new order."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset '{dataset}' ({', '.join(DATASETS)})")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, not {num_prompts}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    if dataset == "heldout":
        if split not in ("all", "heldout"):
            raise ValueError(f"dataset 'heldout' is the held-out split of both datasets, not split '{split}'")
        split = "heldout"
    names = ("humaneval", "mtbench") if dataset in ("heldout", "mixed") else (dataset,)
    streams = [_passes(n, prompts.dataset(n, split), np.random.default_rng([seed, j]), max_tokens)
               for j, n in enumerate(names)]
    out: list[BenchRequest] = []
    while len(out) < num_prompts:
        for s in streams:
            if len(out) < num_prompts:
                out.append(next(s))
    return out


# ---------------------------------------------------------------- arrivals

def arrival_times(n: int, request_rate: float = math.inf, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """When each of n requests is sent, in seconds from the start: vLLM's get_request (see the module
    docstring), with numpy's seeded generator."""
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf: all at once), not {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, not {burstiness}")
    rng = np.random.default_rng(seed)
    if math.isinf(request_rate):
        gaps = [0.0] * n
    elif math.isinf(burstiness):
        gaps = [1.0 / request_rate] * n
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n).tolist()
    times = np.cumsum(gaps).tolist() if n else []
    if times and times[-1] != 0:
        factor = (n / request_rate) / times[-1]
        times = [t * factor for t in times]
    return times


# ---------------------------------------------------------------- one request

class _SSE:
    """Server-sent events from arbitrary byte pieces: the `data` of each complete event."""

    def __init__(self):
        self.buf = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def feed(self, data: bytes) -> list[str]:
        self.buf += self.decoder.decode(data).replace("\r\n", "\n")
        events = []
        while "\n\n" in self.buf:
            event, self.buf = self.buf.split("\n\n", 1)
            lines = [ln[5:].removeprefix(" ") for ln in event.split("\n") if ln.startswith("data:")]
            if lines:
                events.append("\n".join(lines))
        return events


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    text = await resp.text(errors="replace")
    try:
        err = json.loads(text).get("error")
        message = err.get("message") if isinstance(err, dict) else err
        if message:
            return str(message)
    except (ValueError, AttributeError):
        pass
    return text.strip()[:500] or (resp.reason or "")


def _chunk_error(chunk: dict) -> str:
    err = chunk.get("error")
    message = err.get("message") if isinstance(err, dict) else err
    return str(message) if message else "the generation failed (finish_reason 'error')"


async def stream_request(session: aiohttp.ClientSession, url: str, body: dict, headers: dict,
                         out: RequestOutput, t_bench: float) -> RequestOutput:
    """Send one streaming chat request and fill `out` as the chunks arrive."""
    st = time.perf_counter()
    out.start_time = st - t_bench
    last, done = st, False
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {await _error_text(resp)}"
                return out
            sse = _SSE()
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                for message in sse.feed(data):
                    if message == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(message)
                    tandem = chunk.get("tandem") if isinstance(chunk.get("tandem"), dict) else {}
                    if choices := chunk.get("choices"):
                        choice = choices[0]
                        text = (choice.get("delta") or {}).get("content") or ""
                        ids = tandem.get("token_ids")
                        if text or ids:
                            if not out.chunk_times:
                                out.ttft = now - st
                            else:
                                out.itl.append(now - last)
                            last = now
                            out.chunk_times.append(now - st)
                            out.chunk_tokens.append(len(ids) if isinstance(ids, list) else 1)
                            out.generated_text += text
                        if choice.get("finish_reason") is not None:
                            out.finish_reason = choice["finish_reason"]
                            if tandem and "token_ids" not in tandem:
                                out.figures = tandem
                            if out.finish_reason == "error":
                                out.error = _chunk_error(chunk)
                    elif chunk.get("error"):
                        out.error = _chunk_error(chunk)
                    if usage := chunk.get("usage"):
                        out.output_tokens = usage.get("completion_tokens") or 0
                        out.prompt_len = usage.get("prompt_tokens") or out.prompt_len
    except Exception as e:          # connection refused/reset, timeout, a malformed chunk: this request failed
        out.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return out
    if out.error:
        return out
    if not done:
        out.error = "the stream ended without [DONE]"
    elif not out.chunk_times:
        out.error = NO_TOKEN_ERROR
    else:
        out.success = True
        out.latency = last - st
        out.output_tokens = out.output_tokens or sum(out.chunk_tokens)
    return out


# ---------------------------------------------------------------- metrics

def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _stats(name: str, values: list[float], percentiles: Sequence[float]) -> dict:
    """vLLM's: mean, median, std and percentiles in ms of values in seconds; empty -> 0."""
    v = values or 0
    out = {f"mean_{name}_ms": float(np.mean(v) * 1000), f"median_{name}_ms": float(np.median(v) * 1000),
           f"std_{name}_ms": float(np.std(v) * 1000)}
    for p in percentiles:
        out[f"p{_p_word(p)}_{name}_ms"] = float(np.percentile(v, p) * 1000)
    return out


def _tpot(o: RequestOutput) -> float:
    return (o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0


def _is_good(o: RequestOutput, goodput: dict[str, float]) -> bool:
    value = {"ttft": o.ttft, "tpot": _tpot(o), "e2el": o.latency}
    return all(slo / 1000 >= value[name] for name, slo in goodput.items())


def _summary(outputs: list[RequestOutput], duration_s: float, goodput: Optional[dict[str, float]],
             percentiles: Sequence[float]) -> dict:
    ok = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in ok)
    total_output = sum(o.output_tokens for o in ok)
    m = {"completed": len(ok), "failed": len(outputs) - len(ok),
         "total_input_tokens": total_input, "total_output_tokens": total_output,
         "request_throughput": len(ok) / duration_s,
         "request_goodput": sum(_is_good(o, goodput) for o in ok) / duration_s if goodput else None,
         "output_throughput": total_output / duration_s,
         "total_token_throughput": (total_input + total_output) / duration_s}
    series = {"ttft": [o.ttft for o in ok], "tpot": [_tpot(o) for o in ok if o.output_tokens > 1],
              "itl": [x for o in ok for x in o.itl], "e2el": [o.latency for o in ok]}
    for name in LATENCY_METRICS:
        m.update(_stats(name, series[name], percentiles))
    return m


def _peaks(ok: list[RequestOutput]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s (tokens in the busiest whole second since the first request was
    sent; here each chunk counts its own tokens) and max_concurrent_requests (sweep over [start, end))."""
    if not ok:
        return 0.0, 0
    t0 = min(o.start_time for o in ok)
    end = max(o.start_time + o.latency for o in ok)
    per_second = np.zeros(int(np.ceil(end - t0)) + 1)
    for o in ok:
        for t, n in zip(o.chunk_times, o.chunk_tokens):
            per_second[int(o.start_time + t - t0)] += n
    events = sorted([(o.start_time, 1) for o in ok] + [(o.start_time + o.latency, -1) for o in ok])
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return float(per_second.max()), peak


def _tandem_figures(ok: list[RequestOutput]) -> dict:
    figs = [o.figures for o in ok if o.figures]
    rounds = sum(f.get("rounds") or 0 for f in figs)
    drafted = sum(f.get("drafted") or 0 for f in figs)
    accepted = sum(f.get("accepted") or 0 for f in figs)
    by_source = Counter({"draft": 0, "target": 0, "edge": 0})
    for f in figs:
        by_source.update(f.get("tokens_by_source") or {})
    verified = [f for f in figs if f.get("mode") != "edge_only" and f.get("compute_ms") is not None]
    compute_ms = sum(f["compute_ms"] for f in verified)
    compute_tokens = sum(f.get("tokens") or 0 for f in verified)
    return {"requests_with_figures": len(figs),
            "modes": dict(Counter(f.get("mode") for f in figs)),
            "tau": (accepted + rounds) / rounds if rounds else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            "rounds": rounds, "rounds_per_request": rounds / len(figs) if figs else None,
            "drafted": drafted, "accepted": accepted,
            "cloud_compute_ms_per_token": compute_ms / compute_tokens if compute_tokens else None,
            "tokens_by_source": dict(by_source),
            "fallbacks": sum(f.get("fallbacks") or 0 for f in figs)}


def _groups(outputs: list[RequestOutput], key: Callable[[RequestOutput], str], duration_s, goodput,
            percentiles) -> dict:
    by: dict[str, list[RequestOutput]] = defaultdict(list)
    for o in outputs:
        by[key(o)].append(o)
    return {name: {**_summary(group, duration_s, goodput, percentiles),
                   **_tandem_figures([o for o in group if o.success])} for name, group in sorted(by.items())}


def check_goodput(goodput: Optional[dict[str, float]]) -> dict[str, float]:
    goodput = dict(goodput or {})
    for name, slo in goodput.items():
        if name not in SLO_METRICS:
            raise ValueError(f"goodput SLO '{name}' is not one of {', '.join(SLO_METRICS)}")
        if not (isinstance(slo, (int, float)) and slo >= 0 and math.isfinite(slo)):
            raise ValueError(f"goodput SLO {name}:{slo} must be a non-negative number of ms")
    return goodput


def check_percentiles(percentiles: Sequence[float]) -> list[float]:
    ps = [float(p) for p in percentiles]
    if not ps or any(not 0 <= p <= 100 for p in ps):
        raise ValueError(f"percentiles must be between 0 and 100, not {list(percentiles)}")
    return ps


def compute_metrics(outputs: list[RequestOutput], duration_s: float, goodput: Optional[dict[str, float]] = None,
                    percentiles: Sequence[float] = (50, 90, 99)) -> dict:
    """The benchmark's figures from what the client saw: vLLM's fields, per-request lists, `tandem`."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, not {duration_s}")
    goodput, percentiles = check_goodput(goodput), check_percentiles(percentiles)
    ok = [o for o in outputs if o.success]
    peak_tok_s, peak_requests = _peaks(ok)
    result = {"duration": duration_s, **_summary(outputs, duration_s, goodput or None, percentiles),
              "max_output_tokens_per_s": peak_tok_s, "max_concurrent_requests": peak_requests,
              "input_lens": [o.prompt_len for o in outputs],
              "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
              "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
              "latencies": [o.latency for o in outputs], "start_times": [o.start_time for o in outputs],
              "queue_times": [o.client_queue_time for o in outputs],
              "generated_texts": [o.generated_text for o in outputs], "errors": [o.error for o in outputs]}
    overall = _tandem_figures(ok)
    if overall["rounds"]:          # vLLM's names for the same figures (its server reports them via /metrics)
        result.update({"spec_decode_acceptance_rate": 100 * overall["accepted"] / overall["drafted"]
                       if overall["drafted"] else 0.0,
                       "spec_decode_acceptance_length": overall["tau"],
                       "spec_decode_num_drafts": overall["rounds"],
                       "spec_decode_draft_tokens": overall["drafted"],
                       "spec_decode_accepted_tokens": overall["accepted"]})
    result["tandem"] = {
        **overall,
        "rtt_class_bounds_ms": {name: (None if math.isinf(b) else b) for name, b in RTT_CLASS_BOUNDS_MS},
        "per_dataset": _groups(outputs, lambda o: o.dataset or "unknown", duration_s, goodput, percentiles),
        "per_rtt_class": _groups(outputs, resolved_rtt_class, duration_s, goodput, percentiles),
        "requests": [{"id": o.id, "dataset": o.dataset, "rtt_class": resolved_rtt_class(o),
                      "rtt_ms": (o.figures or {}).get("rtt_ms"), "success": o.success,
                      "finish_reason": o.finish_reason, "chunk_times": o.chunk_times,
                      "chunk_tokens": o.chunk_tokens, "figures": o.figures} for o in outputs]}
    return result


# ---------------------------------------------------------------- the run

def _root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


async def first_model(session: aiohttp.ClientSession, base: str, headers: dict) -> str:
    """The first model the server lists (GET /v1/models), as vLLM's bench picks it."""
    url = base + "/v1/models"
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise BenchError(f"{url} answered HTTP {resp.status}: {await _error_text(resp)}")
            data = (await resp.json()).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        raise BenchError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if not data:
        raise BenchError(f"{url} lists no model")
    return data[0]["id"]


async def run_benchmark(base_url: str, requests: list[BenchRequest], *, request_rate: float = math.inf,
                        burstiness: float = 1.0, max_concurrency: Optional[int] = None,
                        goodput: Optional[dict[str, float]] = None, api_key: Optional[str] = None,
                        temperature: float = 0.0, seed: int = 0,
                        headers_for: Optional[Callable[[BenchRequest], dict]] = None,
                        percentiles: Sequence[float] = (50, 90, 99), progress: bool = True,
                        model: Optional[str] = None, timeout_s: float = TIMEOUT_S) -> dict:
    """Send `requests` to base_url's /v1/chat/completions at the given arrivals; return the result
    JSON (see the module docstring). Raises ValueError on bad arguments, BenchError when the server
    cannot be reached at all; a request that fails is counted in the result instead."""
    if not requests:
        raise ValueError("no requests to send")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
    if not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be between 0 and 2, not {temperature}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")
    goodput, percentiles = check_goodput(goodput), check_percentiles(percentiles)
    times = arrival_times(len(requests), request_rate, burstiness, seed)
    base = _root(base_url)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, limit_per_host=max_concurrency or 0,
                                     keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        model_id = model or await first_model(session, base, auth)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        pbar = tqdm(total=len(requests), disable=not progress, desc="requests", unit="req")

        async def one(i: int, req: BenchRequest, arrived: float) -> RequestOutput:
            body = {"model": model_id, "messages": [{"role": "user", "content": req.prompt}],
                    "max_completion_tokens": req.max_tokens, "temperature": float(temperature),
                    "seed": seed + i, "stream": True, "stream_options": {"include_usage": True}}
            if req.mode is not None:
                body["mode"] = req.mode
            headers = {**auth, **(headers_for(req) if headers_for else {})}
            out = RequestOutput(id=req.id, dataset=req.dataset, rtt_class=req.rtt_class)
            async with gate:
                await stream_request(session, base + ENDPOINT, body, headers, out, t0)
            out.client_queue_time = out.start_time - arrived
            pbar.update(1)
            return out

        tasks = []
        t0 = time.perf_counter()
        try:
            for i, req in enumerate(requests):
                if times[i] > 0 and (wait := t0 + times[i] - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                tasks.append(asyncio.create_task(one(i, req, time.perf_counter() - t0)))
            outputs = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            pbar.close()
        duration = time.perf_counter() - t0
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": BACKEND, "endpoint_type": BACKEND,
              "label": "tandem", "model_id": model_id, "num_prompts": len(requests),
              "request_rate": "inf" if math.isinf(request_rate) else request_rate,
              "burstiness": "inf" if math.isinf(burstiness) else burstiness, "max_concurrency": max_concurrency,
              "goodput": goodput or None, "temperature": temperature, "seed": seed, "percentiles": percentiles,
              **compute_metrics(outputs, duration, goodput, percentiles)}
    if max_concurrency is not None:
        result.update(_stats("client_queue_time", [o.client_queue_time for o in outputs if o.success], percentiles))
    return result


# ---------------------------------------------------------------- the summary and the CLI

def _line(label: str, value, fmt: str = "") -> str:
    if value is None:
        return "{:<40} {:<10}".format(label, "n/a")
    return ("{:<40} {:<10" + fmt + "}").format(label, value)


def summary_table(r: dict) -> str:
    """vLLM's printed summary, then Tandem's figures and a line per RTT class."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             _line("Successful requests:", r["completed"]), _line("Failed requests:", r["failed"])]
    if r.get("max_concurrency") is not None:
        lines.append(_line("Maximum request concurrency:", r["max_concurrency"]))
    if isinstance(r.get("request_rate"), (int, float)):
        lines.append(_line("Request rate configured (RPS):", r["request_rate"], ".2f"))
    lines += [_line("Benchmark duration (s):", r["duration"], ".2f"),
              _line("Total input tokens:", r["total_input_tokens"]),
              _line("Total generated tokens:", r["total_output_tokens"]),
              _line("Request throughput (req/s):", r["request_throughput"], ".2f")]
    if r.get("request_goodput") is not None:
        lines.append(_line("Request goodput (req/s):", r["request_goodput"], ".2f"))
    lines += [_line("Output token throughput (tok/s):", r["output_throughput"], ".2f"),
              _line("Peak output token throughput (tok/s):", r["max_output_tokens_per_s"], ".2f"),
              _line("Peak concurrent requests:", r["max_concurrent_requests"], ".2f"),
              _line("Total token throughput (tok/s):", r["total_token_throughput"], ".2f")]
    heads = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
             "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency"),
             "client_queue_time": ("Client Queue Time", "Client-side Queueing")}
    for key, (short, head) in heads.items():
        if f"mean_{key}_ms" not in r:
            continue
        lines += ["{s:{c}^{n}}".format(s=head, n=50, c="-"),
                  _line(f"Mean {short} (ms):", r[f"mean_{key}_ms"], ".2f"),
                  _line(f"Median {short} (ms):", r[f"median_{key}_ms"], ".2f")]
        lines += [_line(f"P{_p_word(p)} {short} (ms):", r[f"p{_p_word(p)}_{key}_ms"], ".2f") for p in r["percentiles"]]
    t = r["tandem"]
    src, rate = t["tokens_by_source"], t["acceptance_rate"]
    lines += ["{s:{c}^{n}}".format(s="Tandem", n=50, c="-"),
              _line("Mean accepted length (tau):", t["tau"], ".3f"),
              _line("Acceptance rate (%):", None if rate is None else 100 * rate, ".2f"),
              _line("Verify rounds:", t["rounds"]),
              _line("Cloud compute per token (ms):", t["cloud_compute_ms_per_token"], ".2f"),
              _line("Tokens draft/target/edge:", f"{src['draft']}/{src['target']}/{src['edge']}"),
              _line("Modes:", ", ".join(f"{k}={v}" for k, v in t["modes"].items()) or None)]
    p_hi = _p_word(max(r["percentiles"]))
    for title, groups in (("Per RTT class", t["per_rtt_class"]), ("Per dataset", t["per_dataset"])):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        lines.append(f"{'':<10} {'ok/fail':>8} {'TTFT p50':>9} {'TPOT p50':>9} {f'TPOT p{p_hi}':>9} {'tau':>6}")
        for name, g in groups.items():
            tau = "n/a" if g["tau"] is None else f"{g['tau']:.2f}"
            lines.append(f"{name:<10} {str(g['completed']) + '/' + str(g['failed']):>8} {g['median_ttft_ms']:>9.1f} "
                         f"{g['median_tpot_ms']:>9.1f} {g[f'p{p_hi}_tpot_ms']:>9.1f} {tau:>6}")
    lines.append("=" * 50)
    return "\n".join(lines)


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """'ttft:2000 tpot:100' -> {"ttft": 2000.0, "tpot": 100.0} (ms), as vLLM's --goodput."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        try:
            out[name] = float(value) if sep else float("nan")
        except ValueError:
            out[name] = float("nan")
        if not sep or math.isnan(out[name]):
            raise ValueError(f"goodput '{pair}' is not KEY:MS (keys {', '.join(SLO_METRICS)})")
    return check_goodput(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ablations.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8081", help="the edge (or any OpenAI-compatible server)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--dataset", choices=DATASETS, default="humaneval")
    p.add_argument("--split", choices=("all", "tune", "heldout"), default="all")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1: Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--metric-percentiles", default="50,90,99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--mode", choices=("edge_cloud", "edge_only", "cloud_only"), default=None,
                   help="Tandem's generation mode per request (default: the edge's config)")
    p.add_argument("--rtt-class", choices=RTT_CLASSES, default=None,
                   help="label every request with this RTT class (default: from each answer's rtt_ms)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="write the result JSON here")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        goodput = parse_goodput(args.goodput or [])
        percentiles = check_percentiles([float(x) for x in args.metric_percentiles.split(",") if x.strip()])
        requests = load_requests(args.dataset, args.num_prompts, args.split, args.max_tokens, args.seed)
        if args.result_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.result_file))):
            raise ValueError(f"--result-file {args.result_file}: its directory does not exist")
    except ValueError as e:
        parser.error(str(e))
    for req in requests:
        req.mode, req.rtt_class = args.mode, args.rtt_class
    try:
        result = asyncio.run(run_benchmark(
            args.base_url, requests, request_rate=args.request_rate, burstiness=args.burstiness,
            max_concurrency=args.max_concurrency, goodput=goodput or None, api_key=args.api_key,
            temperature=args.temperature, seed=args.seed, percentiles=percentiles,
            progress=not args.disable_tqdm, model=args.model))
    except ValueError as e:
        parser.error(str(e))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    result["command"] = " ".join(["python -m ablations.bench", *(argv if argv is not None else sys.argv[1:])])
    print(summary_table(result))
    if args.result_file:
        try:
            with open(args.result_file, "w") as f:
                json.dump(result, f, allow_nan=False)
        except OSError as e:
            print(f"bench: cannot write {args.result_file}: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.result_file}")
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
