"""Experiments over a population of users with their own RTTs (ablations/experiments/population.yaml,
gpu_population.yaml, gpu_goodput.yaml): `python -m ablations run FILE` runs them here when the file says
`kind: population` or `kind: goodput`.

population   seed 000's timeline experiment: Poisson arrivals that saturate the cloud, each user's RTT drawn
             from the mixture (ablations/replay.py RTT_MIXTURE), its traffic through a link emulator at that
             RTT. One cell per matrix row (fifo: switches.health_priority=false; health: the default), each on
             the SAME arrival sequence and the same user -> RTT assignment. The first `real_edges` users (by
             arrival) are real edge processes (start_edge.py, real drafter) driven by the benchmark's client
             over their OpenAI API; the others are replayed (ablations/replay.py) from recorded traces.
goodput      SLO goodput per GPU: one cell (one cloud) per matrix row (a model); in it, per dataset, a
             staircase of concurrent users for each edge class (cpu2: the recorded draft timing; fast: 10 ms
             per drafted token) with Tandem replay clients and for plain streaming (the target alone through
             the same cloud's /v1/generate, as cloud-only does), users at the seed-000 RTT mix.

A row may also set the replayed Tandem users' edge features (parallel_prefill, draft_ahead: ablations/replay.py
_tandem; default: the users section's, off) and, in a population, the FIFO row it is compared with (versus);
`rows` (e.g. --set rows=[fifo_all,health_all]) runs a subset of the matrix.

Every user, real or replayed, becomes one bench.RequestOutput, so both land in bench.compute_metrics'
per-RTT-class tables. Results: <out>/<name>.{json,md,png}.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ablations import replay
from ablations.bench import RTT_CLASSES, RequestOutput, arrival_times, compute_metrics, rtt_class_of
from ablations.processes import ROOT, ProcessFailed, Stack, start_cloud, start_edge

KINDS = ("population", "goodput")
START_TIMEOUT_S = 600.0
GPU_SHAPES = ("qwen14b", "qwen15b")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Users(_Strict):
    """Who the users are: prompts from recorded traces, RTTs from the mixture, how their edges draft."""
    traces: str                                      # recorded sessions (ablations/replay.py record), from the repo root
    datasets: list[Literal["humaneval", "mtbench"]] = ["humaneval", "mtbench"]
    max_tokens: int = Field(48, ge=1, le=4096)
    seed: int = Field(0, ge=0)                       # arrivals and the user -> RTT assignment
    drafts: Literal["recorded", "pattern"] = "recorded"
    transport: Literal["ws", "http"] = "ws"
    client_procs: int = Field(1, ge=1)               # processes running the replayed users
    link_procs: int = Field(1, ge=1)                 # link emulator processes (the users' links split among them)
    # the replayed Tandem users' edge features (ablations/replay.py _tandem), as switches.parallel_prefill and
    # switches.draft_ahead do on a real edge; off (the default): one round at a time, as the edge did before them
    parallel_prefill: bool = False
    draft_ahead: bool = False


class Population(Users):
    users: int = Field(ge=1)
    request_rate: float = Field(gt=0)                # Poisson arrivals, users per second
    timing: Literal["cpu2", "fast"] = "cpu2"
    real_edges: int = Field(0, ge=0)                 # the first users by arrival: real edge processes
    window_s: float = Field(5.0, gt=0)               # tokens-over-time bins


class Goodput(Users):
    levels: list[int] = Field(min_length=1)          # concurrent users, ascending
    timings: list[Literal["cpu2", "fast"]] = ["cpu2", "fast"]
    systems: list[Literal["tandem", "plain"]] = ["tandem", "plain"]
    stagger_s: float = Field(1.0, ge=0)              # a level's users arrive uniformly over this long
    deadline_s: Optional[float] = Field(None, gt=0)  # a user still running this long after it started is cut there
                                                     # (its TTFT and TPOT so far count)
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: list[float] = [100.0, 50.0]         # the first is the headline users_at_slo
    percentile: float = 90.0

    @model_validator(mode="after")
    def _ascending(self):
        if self.levels != sorted(set(self.levels)):
            raise ValueError("levels must be ascending and distinct")
        return self


class Row(_Strict):
    overrides: dict[str, Any] = {}
    shape: Optional[Literal["qwen14b", "qwen15b"]] = None   # random weights of this shape (cloud.vllm load_format dummy)
    datasets: Optional[list[Literal["humaneval", "mtbench"]]] = None   # goodput: this row's datasets (default: all)
    levels: Optional[list[int]] = None                               # goodput: this row's levels (default: all)
    parallel_prefill: Optional[bool] = None          # this row's replayed users' edge features (default: the users
    draft_ahead: Optional[bool] = None               # section's parallel_prefill / draft_ahead)
    versus: Optional[str] = None                     # population: the FIFO row this row is compared with (default:
                                                     # fifo; the row fifo itself with none)


class PopulationExperiment(_Strict):
    kind: Literal["population", "goodput"]
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    question: str
    notes: str = ""
    device_command: str = ""                         # how the lead runs it on the GPU machine
    stage: Optional[str] = None                      # a folder of staged GGUFs: TANDEM_CACHE (the GPU machine)
    base: dict[str, Any] = {}
    matrix: dict[str, Row] = Field(min_length=1)
    rows: Optional[list[str]] = None                 # run only these rows of the matrix (--set rows=[a,b]); default: all
    population: Optional[Population] = None
    goodput: Optional[Goodput] = None

    @model_validator(mode="after")
    def _check(self):
        from common.config import ConfigError, load_config
        if (self.population is None) == (self.goodput is None) or getattr(self, self.kind) is None:
            raise ValueError(f"kind {self.kind} needs a `{self.kind}:` section (and no other)")
        if self.kind == "population" and not {"fifo", "health"} <= set(self.matrix):
            raise ValueError("a population experiment's matrix has the rows fifo and health (and may have more)")
        for label, row in self.matrix.items():
            try:
                load_config(overrides={**self.base, **row.overrides})
            except ConfigError as e:
                raise ValueError(f"matrix.{label}: {e}") from None
            if row.versus is not None and (row.versus not in self.matrix or row.versus == label):
                raise ValueError(f"matrix.{label}.versus: {row.versus!r} is not another row of the matrix")
        unknown = [r for r in self.rows or [] if r not in self.matrix]
        if unknown:
            raise ValueError(f"rows: {', '.join(unknown)} not in the matrix ({', '.join(self.matrix)})")
        return self

    def labels(self) -> list[str]:
        """The rows this run runs, in the matrix's order."""
        return [label for label in self.matrix if self.rows is None or label in self.rows]

    def versus(self, label: str) -> Optional[str]:
        """population: the FIFO row `label` is compared with (None: it is the reference)."""
        v = self.matrix[label].versus
        return v if v is not None else (None if label == "fifo" else "fifo")

    def features(self, label: str) -> dict[str, bool]:
        """The replayed Tandem users' edge features in this row."""
        users, row = getattr(self, self.kind), self.matrix[label]
        return {k: getattr(row, k) if getattr(row, k) is not None else getattr(users, k)
                for k in ("parallel_prefill", "draft_ahead")}

    def overrides(self, label: str) -> dict[str, Any]:
        return {**self.base, **self.matrix[label].overrides}


def kind_of(path: Path) -> Optional[str]:
    """`kind:` of an experiment file (population | goodput), None for the runner's own experiments."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return tree.get("kind") if isinstance(tree, dict) and tree.get("kind") in KINDS else None


def load(path: Path, sets: list[str] = ()) -> PopulationExperiment:
    from ablations.experiment import ExperimentError, _format
    from common.config import ConfigError, parse_override, set_dotted
    tree = yaml.safe_load(Path(path).read_text())
    for item in sets:
        try:
            key, value = parse_override(item)
            if key.split(".")[0] in PopulationExperiment.model_fields:
                set_dotted(tree, key, value)
            else:
                tree.setdefault("base", {})[key] = value
        except ConfigError as e:
            raise ExperimentError(f"--set {e}") from None
    try:
        return PopulationExperiment.model_validate(tree)
    except ValidationError as e:
        raise ExperimentError(f"{path}: {_format(e)}") from None


# ---- staging (the GPU machine) ---------------------------------------------------------------------
def stage(folder: Optional[str]) -> None:
    """Point TANDEM_CACHE at staged GGUFs (ablations/device.py, as the runner's device mode does)."""
    if folder:
        from ablations.device import stage_models
        stage_models(folder)


def shape_override(row: Row, work: Path) -> dict[str, Any]:
    if row.shape is None:
        return {}
    from ablations.device import QWEN_14B, QWEN_15B, shape_dir
    d = shape_dir(work, row.shape, QWEN_14B if row.shape == "qwen14b" else QWEN_15B)
    return {"cloud.vllm.model_dir": d, "cloud.vllm.load_format": "dummy"}


def set_args(overrides: dict[str, Any]) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


# ---- links -----------------------------------------------------------------------------------------
def start_links(stack: Stack, cloud_url: str, rtts: list[float], seed: int, procs: int, log_dir: Path) -> list[str]:
    """One emulated link per user (rtt=<its RTT>), in `procs` linkemu processes; each user's URL, in order."""
    target = cloud_url.removeprefix("http://")
    urls: list[Optional[str]] = [None] * len(rtts)
    for p in range(min(procs, len(rtts))):
        idx = list(range(p, len(rtts), procs))
        f = log_dir / f"links{p}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps([f"rtt={rtts[i]:g}" for i in idx]))
        proc = stack.start(f"linkemu{p}", [sys.executable, "-m", "ablations.linkemu", "--listen", "127.0.0.1:0",
                                           "--target", target, "--profiles", str(f), "--seed", str(seed + 1000 * p)])
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = [ln.split()[-1] for ln in proc.log_path.read_text(errors="replace").splitlines()
                     if ln.startswith("linkemu listening on ")]
            if len(found) == len(idx):
                break
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise proc.failed("did not open every link")
            time.sleep(0.1)
        for i, u in zip(idx, found):
            urls[i] = u
    return urls


# ---- users -----------------------------------------------------------------------------------------
def traces_by_dataset(w: Users) -> dict[str, list[dict]]:
    rows = replay.load_traces(ROOT / w.traces)
    out = {ds: [r for r in rows if r["set"] == ds] for ds in w.datasets}
    for ds, rs in out.items():
        if not rs:
            raise ValueError(f"{w.traces} holds no {ds} trace")
    return out


def make_users(traces: dict[str, list[dict]], n: int, w: Users, rtts: list[float], arrivals: list[float],
               urls: list[str], system: str, timing: str, tag: str, features: Optional[dict] = None) -> list[dict]:
    """n users: user i alternates datasets and cycles through each dataset's traces. features: the replayed
    Tandem users' edge features (PopulationExperiment.features; default: the users section's)."""
    features = features or {"parallel_prefill": w.parallel_prefill, "draft_ahead": w.draft_ahead}
    users, counters = [], {ds: 0 for ds in traces}
    names = list(traces)
    for i in range(n):
        ds = names[i % len(names)]
        t = traces[ds][counters[ds] % len(traces[ds])]
        counters[ds] += 1
        users.append({**{k: t[k] for k in ("id", "set", "prompt", "trace", "accepted", "fallback", "guess", "guess_hit")
                         if k in t},
                      "text": t.get("text"), "uid": f"{tag}-u{i:04d}", "sid": f"{tag}-u{i:04d}", "url": urls[i],
                      "system": system, "timing": timing, "drafts": w.drafts, "transport": w.transport,
                      "arrival_s": arrivals[i], "rtt_ms": rtts[i], "rtt_class": rtt_class_of(rtts[i]),
                      "max_tokens": w.max_tokens, **features})
    return users


def lead_s(users: list[dict], far: bool = True) -> float:
    """Time before the first arrival for the users' links to be set up (a probe and a connect: ~2 RTTs);
    far=False: not waiting for the farthest (a late user starts late; its client_queue_time says by how much)."""
    far_ms = max((u["rtt_ms"] for u in users), default=0.0) if far else 0.0
    return 1.0 + 3e-3 * far_ms + 0.005 * len(users)


def run_replayed(users: list[dict], procs: int, real: Optional[list[tuple[dict, str]]] = None,
                 far: bool = True) -> list[dict]:
    """Replayed users in `procs` processes and real ones (user, edge URL) here, on one epoch."""
    real = real or []
    replayed = [u for u in users if u["uid"] not in {r[0]["uid"] for r in real}]
    with replay.UserProcesses(replayed, procs) as up:
        epoch = up.go(lead_s(users, far))
        got = asyncio.run(_real_users(real, epoch)) if real else []
        got += up.results()
    return sorted(got, key=lambda r: r["uid"])


async def _real_users(real: list[tuple[dict, str]], epoch_wall: float) -> list[dict]:
    """Real users: the benchmark's own client (bench.stream_request) against a real edge's OpenAI API."""
    import aiohttp

    from ablations.bench import ENDPOINT, first_model, stream_request
    epoch_perf = time.perf_counter() + (epoch_wall - time.time())

    async def one(u: dict, edge_url: str) -> dict:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
            model = await first_model(http, edge_url, {})
            wait = epoch_perf + u["arrival_s"] - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            body = {"model": model, "messages": [{"role": "user", "content": u["text"]}],
                    "max_completion_tokens": u["max_tokens"], "temperature": 0.0, "seed": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            o = RequestOutput(id=u["id"], dataset=u["set"], rtt_class=u["rtt_class"])
            await stream_request(http, edge_url + ENDPOINT, body, {}, o, epoch_perf)
        half = u["rtt_ms"] / 2e3
        return {"uid": u["uid"], "output": dataclasses.asdict(o), "tokens": [], "rtt_ms": u["rtt_ms"], "real": True,
                "cloud_times": [max(0.0, t - half) for t in o.chunk_times]}
    return list(await asyncio.gather(*[one(u, url) for u, url in real]))


def outputs_of(results: list[dict]) -> list[RequestOutput]:
    return [RequestOutput(**r["output"]) for r in results]


def tpot_ms(o: RequestOutput) -> Optional[float]:
    return 1e3 * (o.latency - o.ttft) / (o.output_tokens - 1) if o.success and o.output_tokens > 1 else None


def pct(values: list[float], p: float) -> Optional[float]:
    return round(float(np.percentile(values, p)), 2) if values else None


def class_table(results: list[dict], users: list[dict]) -> dict:
    """per RTT class: users, TTFT and TPOT p50/p99 (ms), over successful users."""
    by_uid = {u["uid"]: u for u in users}
    out = {}
    for c in RTT_CLASSES:
        mine = [RequestOutput(**r["output"]) for r in results if by_uid[r["uid"]]["rtt_class"] == c]
        ok = [o for o in mine if o.success]
        ttft = [1e3 * o.ttft for o in ok]
        tpot = [t for o in ok if (t := tpot_ms(o)) is not None]
        out[c] = {"users": len(mine), "failed": len(mine) - len(ok), "ttft_ms_p50": pct(ttft, 50),
                  "ttft_ms_p99": pct(ttft, 99), "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99)}
    return out


def worst_class_slowdown(fifo: dict, health: dict) -> dict:
    """The largest, over the classes both policies served, of p99 TPOT under health / under FIFO."""
    ratios = {c: round(health[c]["tpot_ms_p99"] / fifo[c]["tpot_ms_p99"], 3) for c in RTT_CLASSES
              if c in fifo and c in health and fifo[c].get("tpot_ms_p99") and health[c].get("tpot_ms_p99") is not None}
    if not ratios:
        return {"value": None, "class": None, "per_class": {}}
    worst = max(ratios, key=ratios.get)
    return {"value": ratios[worst], "class": worst, "per_class": ratios}


def timeline(results: list[dict], window_s: float) -> dict:
    """Tokens over time (s since the epoch) in bins of window_s: generated at the cloud (each chunk's time at
    the clients minus the user's one-way delay, RTT/2) and delivered at the clients."""
    cloud, client = [], []
    for r in results:
        o = r["output"]
        if not o["success"]:
            continue
        for t, tc, n in zip(o["chunk_times"], r["cloud_times"], o["chunk_tokens"]):
            client.append((o["start_time"] + t, n))
            cloud.append((o["start_time"] + tc, n))
    end = max([t for t, _ in client], default=0.0)
    edges = np.arange(0.0, end + window_s, window_s)

    def hist(ev):
        h, _ = np.histogram([t for t, _ in ev], bins=edges, weights=[n for _, n in ev]) if ev else (np.zeros(0), None)
        return h.tolist()
    return {"window_s": window_s, "t": edges[:-1].round(3).tolist(), "cloud_tokens": hist(cloud),
            "client_tokens": hist(client)}


def policy_summary(results: list[dict], users: list[dict], window_s: float) -> dict:
    outs = outputs_of(results)
    ok = [o for o in outs if o.success]
    first = min((o.start_time for o in outs), default=0.0)
    last = max((o.start_time + o.latency for o in ok), default=first)
    tokens = sum(o.output_tokens for o in ok)
    return {"effective_tok_s": round(tokens / (last - first), 3) if last > first else None,
            "tokens": tokens, "completed": len(ok), "failed": len(outs) - len(ok), "makespan_s": round(last - first, 2),
            "per_class": class_table(results, users), "timeline": timeline(results, window_s),
            "replayed": replayed_figures(results)}


def replayed_figures(results: list[dict]) -> dict:
    """The replayed Tandem users' rounds, summed (their GenStats-like figures): tau = (accepted + rounds) / rounds."""
    keys = ("rounds", "drafted", "accepted", "ahead_kept", "ahead_dropped", "resyncs")
    tot = dict.fromkeys(keys, 0)
    users = 0
    for r in results:
        f = r["output"].get("figures") or {}
        if r.get("real") or f.get("mode") != "edge_cloud":
            continue
        users += 1
        for k in keys:
            tot[k] += f.get(k) or 0
    tot["users"] = users
    tot["tau"] = round((tot["accepted"] + tot["rounds"]) / tot["rounds"], 3) if tot["rounds"] else None
    return tot


# ---- population ------------------------------------------------------------------------------------
def population_cell(exp: PopulationExperiment, label: str, log_dir: Path) -> dict:
    from ablations.runner import _load
    w = exp.population
    traces = traces_by_dataset(w)
    rtts = replay.sample_rtts(w.users, w.seed)
    arrivals = arrival_times(w.users, w.request_rate, 1.0, w.seed)
    over = {**exp.overrides(label), **shape_override(exp.matrix[label], log_dir)}
    rec = {"row": label, "overrides": over, "replay_features": exp.features(label), "load_at_start": _load(),
           "logs": str(log_dir.relative_to(log_dir.parents[1]))}
    t0 = time.perf_counter()
    with Stack(log_dir) as stack:
        cloud = start_cloud(stack, set_args(over), START_TIMEOUT_S)
        rec["startup_s"] = round(time.perf_counter() - t0, 1)
        urls = start_links(stack, cloud.url, rtts, w.seed, w.link_procs, log_dir)
        users = make_users(traces, w.users, w, rtts, arrivals, urls, "tandem", w.timing, label, exp.features(label))
        real = []
        for u in users[:w.real_edges]:             # arrivals are in order: the first users are the real ones
            if not u.get("text"):
                raise ValueError(f"{w.traces}: trace {u['id']} has no prompt text for a real edge")
            edge = start_edge(stack, u["url"], set_args(over), START_TIMEOUT_S)
            real.append((u, edge.url))
        c0 = cloud.get_json("/stats")
        t1 = time.perf_counter()
        results = run_replayed(users, w.client_procs, real)
        rec["wall_s"] = round(time.perf_counter() - t1, 1)
        c1 = cloud.get_json("/stats")
    real_ids = {u["uid"] for u, _ in real}
    for r in results:
        r["real"] = r["uid"] in real_ids
    rec["cloud_stats"] = {"before": c0, "after": c1}
    rec["load_at_end"] = _load()
    rec["users"] = [{k: u[k] for k in ("uid", "id", "set", "arrival_s", "rtt_ms", "rtt_class")} | {"real": u["uid"] in real_ids}
                    for u in users]
    rec["results"] = [{"uid": r["uid"], "real": r["real"], "cloud_times": r["cloud_times"],
                       "output": {k: v for k, v in r["output"].items() if k not in ("generated_text",)}}
                      for r in results]
    outs = outputs_of(results)
    rec["bench"] = {k: v for k, v in compute_metrics(outs, max(rec["wall_s"], 1e-3)).items()
                    if k not in ("generated_texts", "itls")}
    rec["summary"] = policy_summary(results, users, w.window_s)
    return rec


def population_result(exp: PopulationExperiment, cells: dict[str, dict], meta: dict) -> dict:
    res = {"meta": meta, "experiment": exp.model_dump(mode="json"), "policies": {}, "cells": cells}
    for label, cell in cells.items():
        if "summary" in cell:
            res["policies"][label] = {k: v for k, v in cell["summary"].items()}
    pol = res["policies"]
    if {"fifo", "health"} <= set(pol):
        res["worst_class_slowdown"] = worst_class_slowdown(pol["fifo"]["per_class"], pol["health"]["per_class"])["value"]
        res["worst_class_slowdown_detail"] = worst_class_slowdown(pol["fifo"]["per_class"], pol["health"]["per_class"])
    # every other policy's against its FIFO row (PopulationExperiment.versus; health against fifo: the figure
    # above), with its effective throughput over that row's
    res["slowdown_vs_fifo"] = {}
    for label, p in pol.items():
        ref = exp.versus(label)
        if ref in pol:
            d = worst_class_slowdown(pol[ref]["per_class"], p["per_class"])
            a, b = p.get("effective_tok_s"), pol[ref].get("effective_tok_s")
            d["versus"] = ref
            d["effective_tok_s_ratio"] = round(a / b, 3) if a and b else None
            res["slowdown_vs_fifo"][label] = d
    return res


# ---- goodput ---------------------------------------------------------------------------------------
def level_figures(results: list[dict], p: float, slo_ttft_ms: float, slo_tpot_ms: list[float]) -> dict:
    outs = outputs_of(results)
    ok = [o for o in outs if o.success]
    ttft = [1e3 * o.ttft for o in ok]
    tpot = [t for o in ok if (t := tpot_ms(o)) is not None]
    first = min((o.start_time for o in outs), default=0.0)
    last = max((o.start_time + o.latency for o in ok), default=first)
    tokens = sum(o.output_tokens for o in ok)
    f = {"users": len(outs), "failed": len(outs) - len(ok), f"p{p:g}_ttft_ms": pct(ttft, p),
         f"p{p:g}_tpot_ms": pct(tpot, p), "ttft_ms_p50": pct(ttft, 50), "tpot_ms_p50": pct(tpot, 50),
         "tok_s": round(tokens / (last - first), 1) if last > first else None}
    for slo in slo_tpot_ms:
        f[f"meets_tpot{slo:g}"] = bool(ok) and len(ok) == len(outs) and f[f"p{p:g}_ttft_ms"] <= slo_ttft_ms \
            and (f[f"p{p:g}_tpot_ms"] or 0) <= slo
    return f


def goodput_cell(exp: PopulationExperiment, label: str, log_dir: Path, progress=None) -> dict:
    """progress(record so far): called after every level (the report is rewritten: a run stopped at its
    time limit keeps every level it measured)."""
    from ablations.runner import _load
    g, row = exp.goodput, exp.matrix[label]
    traces = traces_by_dataset(g)
    datasets = row.datasets or g.datasets
    levels = row.levels or g.levels
    n_max = max(levels)
    rtts = replay.sample_rtts(n_max, g.seed)
    over = {**exp.overrides(label), **shape_override(row, log_dir)}
    rec = {"row": label, "overrides": over, "replay_features": exp.features(label), "load_at_start": _load(),
           "levels": {}, "refs": {}}
    t0 = time.perf_counter()
    with Stack(log_dir) as stack:
        cloud = start_cloud(stack, set_args(over), START_TIMEOUT_S)
        rec["startup_s"] = round(time.perf_counter() - t0, 1)
        urls = start_links(stack, cloud.url, rtts, g.seed, g.link_procs, log_dir)
        for ds in datasets:
            ts = traces[ds][:n_max]                # the traces its users replay (user i: trace i mod len)
            # the target's own greedy answers on this engine (no link): the references the replayed drafts'
            # accept/reject pattern is laid on (pattern drafts), and a warm-up
            refs = make_users({ds: ts}, len(ts), g, [0.0] * len(ts), [0.0] * len(ts), [cloud.url] * len(ts),
                              "plain", "cpu2", f"{label}-{ds}-ref")
            got = run_replayed(refs, g.client_procs)
            rec["refs"][ds] = {"identical_to_recorded": sum(r["tokens"] == replay.cut(t["fallback"], g.max_tokens)
                                                          for r, t in zip(got, ts)), "of": len(ts)}
            ts = [dict(t, fallback=r["tokens"] or t["fallback"]) for t, r in zip(ts, got)]
            for system in g.systems:
                for timing in (g.timings if system == "tandem" else ["-"]):
                    key = f"{ds}/{system}/{timing}"
                    rec["levels"][key] = []
                    for n in levels:
                        arrivals = [g.stagger_s * i / n for i in range(n)]
                        users = make_users({ds: ts}, n, g, rtts[:n], arrivals, urls[:n], system,
                                           timing if timing != "-" else "cpu2", f"{label}-{ds}-{system}-{timing}-{n}",
                                           exp.features(label))
                        for u in users:
                            u["deadline_s"] = g.deadline_s
                        t = time.perf_counter()
                        got = run_replayed(users, g.client_procs, far=False)
                        fig = level_figures(got, g.percentile, g.slo_ttft_ms, g.slo_tpot_ms)
                        fig["wall_s"] = round(time.perf_counter() - t, 1)
                        fig["per_class"] = class_table(got, users)
                        if system == "tandem":
                            fig["replayed"] = replayed_figures(got)
                        errs = [r["output"]["error"] for r in got if r["output"]["error"]]
                        fig["errors"] = errs[:3]
                        rec["levels"][key].append(fig)
                        if progress:
                            progress(rec)
                        print(f"[{exp.name}] {label} {key} {n} users: {json.dumps({k: v for k, v in fig.items() if k != 'per_class'})}",
                              flush=True)
        rec["cloud_stats"] = cloud.get_json("/stats")
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["load_at_end"] = _load()
    return rec


def goodput_rows(exp: PopulationExperiment, cells: dict[str, dict]) -> list[dict]:
    g = exp.goodput
    rows = []
    for label, cell in cells.items():
        for key, figs in (cell.get("levels") or {}).items():
            ds, system, timing = key.split("/")
            by_n = {f["users"]: f for f in figs}
            row = {"model": label, "dataset": ds, "edge": timing if system == "tandem" else "", "system": system}
            for i, slo in enumerate(g.slo_tpot_ms):
                ok = [f["users"] for f in figs if f[f"meets_tpot{slo:g}"]]
                # the most users of a level that met the SLOs with every level below it meeting them too
                best = 0
                for f in sorted(figs, key=lambda f: f["users"]):
                    if not f[f"meets_tpot{slo:g}"]:
                        break
                    best = f["users"]
                row["users_at_slo" if i == 0 else f"users_at_slo_tpot{slo:g}"] = best
                row.setdefault("levels_meeting", {})[f"tpot{slo:g}"] = ok
            row["engine_tok_s_64"] = (by_n.get(64) or {}).get("tok_s")
            row["engine_tok_s_256"] = (by_n.get(256) or {}).get("tok_s")
            row["levels"] = [{k: f[k] for k in f if k not in ("per_class",)} for f in figs]
            rows.append(row)
    return rows


# ---- running -----------------------------------------------------------------------------------------
def run(path: Path, out: Path, sets: list[str], argv: list[str]) -> int:
    from ablations.runner import _command, environment, sigterm_as_interrupt
    exp = load(path, sets)
    stage(exp.stage)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / f"{exp.name}-logs"
    meta = environment(_command(["run", *argv]))
    meta["real"] = real_text(exp)
    cells: dict[str, dict] = {}
    t0 = time.perf_counter()
    ok = True
    print(f"{exp.name}: {exp.question}\nresults -> {out}", file=sys.stderr)
    with sigterm_as_interrupt():
        try:
            for label in exp.labels():
                def progress(rec, label=label):
                    write(exp, {**cells, label: rec}, meta, out, t0, final=False)
                try:
                    if exp.kind == "population":
                        cell = population_cell(exp, label, logs / label)
                    else:
                        cell = goodput_cell(exp, label, logs / label, progress)
                except (ProcessFailed, RuntimeError, OSError, ValueError) as e:
                    ok = False
                    cell = {"row": label, "error": f"{type(e).__name__}: {e}"}
                    print(f"cell {label} failed: {e}", file=sys.stderr)
                cells[label] = cell
                write(exp, cells, meta, out, t0, final=False)
        finally:
            write(exp, cells, meta, out, t0, final=True)
    if ok:
        from ablations.runner import _pack_logs
        _pack_logs(logs)
    print(f"wrote {', '.join(p.name for p in sorted(out.glob(f'{exp.name}.*')))} in {out} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0 if ok else 1


def write(exp: PopulationExperiment, cells: dict, meta: dict, out: Path, t0: float, final: bool) -> None:
    from ablations import population_report
    from ablations.runner import _load
    meta = dict(meta, duration_s=round(time.perf_counter() - t0, 1), load_end=_load(),
                complete=final and len(cells) == len(exp.labels()) and not any("error" in c for c in cells.values()))
    if exp.kind == "population":
        result = population_result(exp, cells, meta)
    else:
        result = {"meta": meta, "experiment": exp.model_dump(mode="json"), "rows": goodput_rows(exp, cells),
                  "cells": cells}
    population_report.write(result, out)


def real_text(exp: PopulationExperiment) -> str:
    if exp.kind == "population":
        w = exp.population
        return (f"Real: the cloud (start_cloud.py), the link emulators (ablations/linkemu.py, one link per user at its "
                f"RTT) and {w.real_edges} edge process(es) (start_edge.py, llama.cpp drafter) serving the first "
                f"{w.real_edges} user(s) by arrival over their OpenAI API (ablations/bench.py's client). Replayed: the "
                f"other {w.users - w.real_edges} users, light clients (ablations/replay.py) sending the drafts recorded "
                f"from the real drafter ({w.traces}, {w.drafts} drafts, {w.timing} timing) as verify rounds over "
                f"{w.transport} to the same cloud through their own links. {features_text(exp)}")
    g = exp.goodput
    return (f"Real: the cloud (start_cloud.py) and the link emulators (one link per user at its RTT). Replayed: every "
            f"user (ablations/replay.py): Tandem users send the real drafter's accept/reject pattern ({g.traces}, "
            f"{g.drafts} drafts) on the target's own greedy answers on this engine, with the recorded draft time "
            f"(cpu2) or 10 ms per drafted token (fast); plain users stream the target's tokens from the same cloud's "
            f"/v1/generate (what cloud-only does). {features_text(exp)}")


def features_text(exp: PopulationExperiment) -> str:
    """Which edge features the replayed Tandem users ran, per row."""
    def one(label):
        on = [k for k, v in exp.features(label).items() if v]
        return f"{label}: {' + '.join(on) if on else 'none (one round at a time)'}"
    return ("The replayed Tandem users' edge features (ablations/replay.py: parallel_prefill, draft_ahead), per row: "
            + "; ".join(one(label) for label in exp.labels()) + ".")
