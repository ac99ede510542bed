"""Run an experiment file: for each cell (row x link x repeat) start the link emulator and the edge as
processes (ablations/processes.py), warm up, run the serving benchmark (ablations/bench.py) against
the edge's OpenAI API once per dataset, scrape both nodes' /stats around each benchmark, stop the
processes, and write the result (ablations/report.py). The cloud process is kept across cells whose
cloud-side configuration is the same (CloudPool; experiment.py cloud_side) and restarted when it
changes: a vLLM cloud takes 1-2 min to start.

Device runs (the experiment's `device:` block): the staged models are found through TANDEM_CACHE
(ablations/device.py); each process runs on its CPU set; with several edge lanes, the cells of one
cloud configuration run at once, one per lane, each edge alone on its lane's CPUs, against the one
shared cloud.

  python -m ablations run ablations/experiments/rtt_sweep.yaml                    # -> /tmp/tandem-results/...
  python -m ablations run ablations/experiments/switches.yaml --out ablations/results   # refresh the committed report

A cell that fails is recorded with its reason and the tail of its processes' logs; the others still
run. The JSON is rewritten after every cell, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from ablations import report
from ablations.experiment import Cell, Experiment, Workload, cells, parse_cpus, row_config, row_mode
from ablations.processes import ROOT, ProcessFailed, Stack, cpu_spec, start_cloud, start_edge, start_link

RESULTS_TMP = Path("/tmp/tandem-results")
CALIBRATION = ROOT / "ablations" / "results" / "linkemu_calibration.md"
START_TIMEOUT_S = 300.0        # loading a model on a busy 2-core machine can take a while
WARMUP_TOKENS = 8


class CellFailed(RuntimeError):
    """A cell's benchmark failed; the message carries the tails of its processes' logs."""


def default_out(name: str) -> Path:
    return RESULTS_TMP / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# --- what the run ran on ---------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "unknown"


def environment(command: str) -> dict:
    commit = _git("rev-parse", "--short=12", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    versions = {"python": platform.python_version()}
    for dist in ("llama_cpp_python", "aiohttp", "numpy", "vllm", "torch"):
        v = _version(dist)
        if v is not None:
            versions[dist.replace("_python", "").replace("_", "-")] = v
    meta = {"command": command, "commit": commit + ("+uncommitted" if dirty else ""),
            "uncommitted": _git("status", "--porcelain", "--untracked-files=no").splitlines() if dirty else [],
            "machine": f"{_cpu_model()} ({platform.machine()}), {platform.system()} {platform.release()}",
            "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": versions, "load_start": _load()}
    if CALIBRATION.exists():
        meta["linkemu_calibration"] = str(CALIBRATION.relative_to(ROOT))
    return meta


def what_was_real(exp: Experiment) -> str:
    from common.config import load_config
    cfg = load_config(overrides=exp.base)
    cpus = exp.device.cpus if exp.device else None
    place = ""
    if cpus:
        place = (f" Each edge ran alone on its CPU set ({', '.join(cpus.edges)}: a {len(parse_cpus(cpus.edges[0]))}-core "
                 f"edge device); the cloud on {cpus.cloud or 'the other CPUs'}, the link emulators on "
                 f"{cpus.link or 'the other CPUs'}, the runner and its clients on {cpus.clients or 'the other CPUs'}."
                 + (f" Cells of one cloud configuration ran {len(cpus.edges)} at a time, one per edge CPU set, "
                    "against the one shared cloud." if len(cpus.edges) > 1 else ""))
    return (f"Real: the cloud (`start_cloud.py`, {cfg.cloud.backend} backend, target {cfg.models.target}) and the edge "
            f"(`start_edge.py`, llama.cpp, draft {cfg.models.draft}) ran as separate processes on this machine: a "
            f"fresh edge per cell, the cloud kept across cells whose cloud-side configuration was the same (each "
            f"cell's `cloud` record says whether it was reused); every byte between them crossed loopback TCP through "
            f"the link emulator (`python -m ablations.linkemu`, a process of its own, one per cell); the clients were "
            f"ablations/bench.py driving the edge's OpenAI API (`/v1/chat/completions`, streamed) over HTTP.{place} "
            f"Nothing was replayed or simulated.")


# --- one cell ------------------------------------------------------------------------------------
def _diff(after: Optional[dict], before: Optional[dict], keys: tuple[str, ...]) -> dict:
    if after is None or before is None:
        return {}
    return {k: (after.get(k) or 0) - (before.get(k) or 0) for k in keys}


EDGE_COUNTERS = ("generations", "tokens", "rounds", "drafted", "accepted", "fallbacks", "errors",
                 "tokens_draft", "tokens_target", "tokens_edge")
COUNTS = ("completed", "failed")
CLOUD_COUNTERS = ("requests", "rounds", "generated_tokens", "drafted", "accepted", "late_rounds", "evicted_sessions",
                  "ws_frames_in", "ws_frames_out", "ws_bytes_in", "ws_bytes_out", "ws_messages_in", "ws_messages_out",
                  "frontend_cpu_s", "process_cpu_s")


def _diff_list(after, before) -> list:
    if not after:
        return []
    return [a - b for a, b in zip(after, before)] if before else list(after)


def link_figures(cloud_stats: Optional[dict], edge_stats: Optional[dict]) -> dict:
    """The link's figures of one benchmark (switches.rtt_batching), from the diffs of the cloud's /stats
    (its WebSocket frames, bytes and messages each way, its front end's CPU time, how long its answers
    waited for company) and the edge's (committed tokens; how long its rounds waited):
      frames_per_round      cloud -> edge frames per verify answer (the results' direction)
      frames_per_round_up   edge -> cloud frames per verify round
      frames_per_token, bytes_per_token   both ways, per committed token
      cpu_us_per_round      the cloud front end's event-loop CPU per round (not the model's threads)
      hold_ms_p50(_up)      the median time an answer (a round) waited to share a frame
      added_ms_p50          what coalescing adds to a round at p50: hold_ms_p50 + hold_ms_p50_up"""
    from common.coalesce import hold_quantile_ms
    c, e = cloud_stats or {}, edge_stats or {}
    out_msgs, in_msgs = c.get("ws_messages_out") or 0, c.get("ws_messages_in") or 0
    tokens = e.get("tokens") or 0
    frames = (c.get("ws_frames_in") or 0) + (c.get("ws_frames_out") or 0)
    nbytes = (c.get("ws_bytes_in") or 0) + (c.get("ws_bytes_out") or 0)
    down = hold_quantile_ms(c.get("ws_hold_counts") or [], 0.5)
    up = hold_quantile_ms(e.get("hold_counts") or [], 0.5)
    m = {"frames_per_round": c["ws_frames_out"] / out_msgs if out_msgs else None,
         "frames_per_round_up": c["ws_frames_in"] / in_msgs if in_msgs else None,
         "frames_per_token": frames / tokens if tokens and frames else None,
         "bytes_per_token": nbytes / tokens if tokens and nbytes else None,
         "cpu_us_per_round": 1e6 * c["frontend_cpu_s"] / out_msgs if out_msgs and c.get("frontend_cpu_s") else None,
         "hold_ms_p50": down, "hold_ms_p50_up": up,
         "added_ms_p50": None if down is None and up is None else (down or 0.0) + (up or 0.0)}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}


def batching_rows(exp: Experiment, rows: list[dict]) -> None:
    """Where the experiment's rows differ in switches.rtt_batching: each row names it, and each row with
    it on gets the user-visible difference to the row with it off at the same link and dataset
    (tpot_added_ms_p50, ttft_added_ms_p50: p50 on - p50 off; noisy beside added_ms_p50, which is measured)."""
    from common.config import Switches
    default = Switches().rtt_batching
    on = {label: bool({**exp.base, **exp.matrix[label]}.get("switches.rtt_batching", default)) for label in exp.matrix}
    if len(set(on.values())) < 2:
        return
    for row in rows:
        row["rtt_batching"] = on[row["row"]]
    for row in rows:
        if not row["rtt_batching"]:
            continue
        off = next((r for r in rows if not r["rtt_batching"] and r["link"] == row["link"]
                    and r["dataset"] == row["dataset"]), None)
        for m in ("tpot", "ttft"):
            a, b = row.get(f"{m}_ms_p50"), (off or {}).get(f"{m}_ms_p50")
            row[f"{m}_added_ms_p50"] = None if a is None or b is None else round(a - b, 3)


def summarise(mode: str, rtt_ms: Optional[float], bench: dict, cloud_after: Optional[dict]) -> dict:
    """The figures of one (cell, dataset) from the benchmark's output (ablations/bench.py: vLLM's
    fields, and per request the generation's own figures from its last chunk) and the cloud's /stats."""
    tandem = bench.get("tandem") or {}
    ok = [i for i, e in enumerate(bench.get("errors") or []) if not e]
    per_user = [bench["output_lens"][i] / bench["latencies"][i] for i in ok
                if bench["output_lens"][i] and bench["latencies"][i] > 0]
    reqs = tandem.get("requests") or []
    figs = [r["figures"] for r in reqs if r.get("success") and r.get("figures")]
    rounds = sum(f.get("rounds") or 0 for f in figs)
    tokens = sum(f.get("tokens") or 0 for f in figs)
    draft_ms = sum((f.get("draft_ms_per_round") or 0) * (f.get("rounds") or 0) for f in figs)
    m = {
        "per_user_tok_s": float(np.median(per_user)) if per_user else None,
        "ttft_ms_p50": bench.get("median_ttft_ms"), "ttft_ms_p99": bench.get("p99_ttft_ms"),
        "tpot_ms_p50": bench.get("median_tpot_ms"), "tpot_ms_p99": bench.get("p99_tpot_ms"),
        "itl_ms_p50": bench.get("median_itl_ms"), "e2el_ms_p50": bench.get("median_e2el_ms"),
        "output_throughput": bench.get("output_throughput"),
        "tau": tandem.get("tau"), "acceptance": tandem.get("acceptance_rate"),
        "rounds_per_100_tokens": 100 * rounds / tokens if rounds and tokens else None,
        # 0 means the answers did not report the cloud's time (no model computes a token in 0 ms)
        "compute_ms_per_token": tandem.get("cloud_compute_ms_per_token") or None,
        "draft_ms_per_round": draft_ms / rounds if rounds else None,
        "verify_ms_p50": ((cloud_after or {}).get("latency_ms") or {}).get("p50"),
        "completed": bench.get("completed"), "failed": bench.get("failed"),
    }
    if mode == "edge_cloud":
        ttfts = bench.get("ttfts") or []
        m.update(bound([(r["figures"], ttfts[i] * 1e3) for i, r in enumerate(reqs)
                        if r.get("success") and r.get("figures") and i < len(ttfts)], rtt_ms or 0.0))
    else:
        m.update(bound([], 0.0))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}


def bound(requests: list[tuple[dict, float]], rtt_ms: float) -> dict:
    """The per-round bound of edge-cloud speculation, from each request's own measurements (its
    generation's figures and the TTFT its client saw). Every round costs at least k*t_draft (the edge's
    draft ms of the round, the KV sync included) + RTT (the link's) + t_verify (the cloud's compute ms
    of the round), one after the other, so for a request of R rounds and n tokens:
      E2EL >= work = sum over rounds of (draft + RTT + verify):   tok/s <= n / work
      E2EL - TTFT >= work - TTFT (the first round ends by TTFT):   TPOT >= (work - TTFT) / (n - 1)
    bound_tok_s and bound_tpot_ms are the medians over requests (as per_user_tok_s and TPOT p50);
    bound_round_ms is the mean round's cost, k*t_draft + RTT + t_verify."""
    tok_s, tpot, work_all, rounds_all = [], [], 0.0, 0
    for f, ttft_ms in requests:
        r, n = f.get("rounds") or 0, f.get("tokens") or 0
        if not r or not n:
            continue
        work = r * ((f.get("draft_ms_per_round") or 0) + rtt_ms + (f.get("compute_ms_per_round") or 0))
        work_all, rounds_all = work_all + work, rounds_all + r
        tok_s.append(1e3 * n / work)
        if n > 1:
            tpot.append(max(0.0, work - ttft_ms) / (n - 1))
    return {"bound_round_ms": work_all / rounds_all if rounds_all else None,
            "bound_tok_s": float(np.median(tok_s)) if tok_s else None,
            "bound_tpot_ms": float(np.median(tpot)) if tpot else None}


async def _warmup(url: str) -> None:
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
                "max_tokens": WARMUP_TOKENS, "temperature": 0.0}) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"warm-up request failed: HTTP {r.status} {body}")


def _link_stats(log_path: Path) -> Optional[dict]:
    with contextlib.suppress(OSError, ValueError):
        for line in reversed(log_path.read_text(errors="replace").splitlines()):
            if line.startswith("linkemu stats "):
                return json.loads(line[len("linkemu stats "):])
    return None


class CloudPool:
    """The cloud process, kept up across cells whose cloud-side overrides (Cell.cloud_overrides) are the
    same, stopped and started afresh when they change, started again if it died. Thread-safe: the
    lanes of a device run share it (the runner gives them only cells of one cloud configuration at a
    time)."""

    def __init__(self, logs: Path, cpus: Optional[frozenset[int]] = None, start=None):
        self.logs, self.cpus = logs, cpus
        self._start = start or (lambda stack, set_args: start_cloud(stack, set_args, START_TIMEOUT_S, cpus))
        self.key, self.stack, self.proc, self.count, self.served, self.startup_s = None, None, None, 0, 0, None
        self.stopped: list[dict] = []          # every cloud stopped so far: its logs, exit status, cells served
        self._lock = threading.Lock()

    def _ensure(self, cell: Cell) -> None:
        """The cloud for this cell's cloud configuration is up (started here if not). Under the lock."""
        key = cell.cloud_overrides
        if self.proc is not None and self.key == key and self.proc.popen.poll() is None:
            return
        self.close()
        self.count += 1
        self.stack = Stack(self.logs / f"cloud{self.count}")
        t = time.perf_counter()
        try:
            self.proc = self._start(self.stack, cell.set_args(key))
        except BaseException:
            self.close()
            raise
        self.key, self.served, self.startup_s = key, 0, round(time.perf_counter() - t, 1)

    def prepare(self, cell: Cell) -> None:
        """Start the cloud for this cell's configuration now, from the calling thread: the lanes' threads
        come and go, and a child dies with the thread that started it (PR_SET_PDEATHSIG)."""
        with self._lock:
            self._ensure(cell)

    def get(self, cell: Cell):
        """(the cloud process for this cell, the cell's record of it)."""
        with self._lock:
            self._ensure(cell)
            self.served += 1
            record = {"logs": self._where(), "reused": self.served > 1, "cells_before": self.served - 1}
            if self.served == 1:
                record["startup_s"] = self.startup_s
            return self.proc, record

    def _where(self) -> str:
        return f"{self.logs.name}/cloud{self.count}"

    def close(self) -> None:
        if self.stack is not None:
            self.stack.__exit__(None, None, None)
            self.stopped.append({"logs": self._where(), "cells": self.served, "processes": self.stack.stopped})
        self.key, self.stack, self.proc = None, None, None


@dataclass(frozen=True)
class Placement:
    """The CPU sets of a run's processes (None: wherever the OS puts them)."""
    edges: tuple[Optional[frozenset[int]], ...] = (None,)     # one per lane
    cloud: Optional[frozenset[int]] = None
    link: Optional[frozenset[int]] = None
    clients: Optional[frozenset[int]] = None

    @classmethod
    def of(cls, exp: Experiment) -> "Placement":
        """From the experiment's device.cpus; a process it leaves out gets every CPU but the edges'."""
        cpus = exp.device.cpus if exp.device else None
        if cpus is None:
            return cls()
        here = os.sched_getaffinity(0)
        cpus.check(here)
        edges = tuple(parse_cpus(e) for e in cpus.edges)
        rest = frozenset(here) - frozenset().union(*edges)
        sets = cpus.sets()
        if not rest and not all(sets.values()):
            from ablations.experiment import ExperimentError
            raise ExperimentError("device.cpus: the edges take every CPU; name the cloud's, link's and clients' sets")
        return cls(edges, sets["cloud"] or rest, sets["link"] or rest, sets["clients"] or rest)


def _start(stack: Stack, cell: Cell, seed: int, pool: CloudPool, place: Placement, lane: int):
    """cloud (the pool's) -> link emulator -> edge, each ready before the next starts (none of the
    first two for a row without a cloud)."""
    cloud, link, cloud_record = None, None, None
    if cell.needs_cloud:
        cloud, cloud_record = pool.get(cell)
        link = start_link(stack, cloud.url, cell.link, seed, START_TIMEOUT_S, place.link)
    edge = start_edge(stack, link.url if link else None, cell.set_args(), START_TIMEOUT_S, place.edges[lane])
    return edge, cloud, link, cloud_record


def _measure(w, cell: Cell, edge, cloud, reqs: list, own_window: bool = True, shared: bool = False) -> dict:
    """One benchmark against the edge, the nodes' /stats scraped before and after. own_window: the
    cloud's latency window (its last 4096 rounds) holds this cell's rounds alone; else (a cloud kept
    from an earlier cell, or shared with cells running at once) its percentiles are not this cell's
    and are left out. shared (cells running at once against one cloud): the cloud's counters moved for
    all of them, so none of its figures is this cell's (frames, bytes, CPU per round are left out)."""
    from ablations.bench import parse_goodput, run_benchmark
    e0, c0 = edge.get_json("/stats"), cloud.get_json("/stats") if cloud else None
    t = time.perf_counter()
    bench = asyncio.run(run_benchmark(
        edge.url, reqs, request_rate=w.request_rate, burstiness=w.burstiness, max_concurrency=w.max_concurrency,
        goodput=parse_goodput(w.goodput) or None, api_key=None, temperature=w.temperature, seed=w.seed,
        headers_for=None, percentiles=(50, 90, 99), progress=False))
    wall = time.perf_counter() - t
    e1, c1 = edge.get_json("/stats"), cloud.get_json("/stats") if cloud else None
    if c1 and not own_window:
        c1 = {**c1, "latency_ms": None, "queue_ms": None}
    edge_stats = {**_diff(e1, e0, EDGE_COUNTERS),
                  "hold_counts": _diff_list(((e1 or {}).get("link_frames") or {}).get("hold_counts"),
                                            ((e0 or {}).get("link_frames") or {}).get("hold_counts")),
                  "drafting": (e1 or {}).get("drafting")}
    cloud_stats = {**_diff(c1, c0, CLOUD_COUNTERS), "latency_ms": c1.get("latency_ms"), "queue_ms": c1.get("queue_ms"),
                   "ws_hold_counts": _diff_list(c1.get("ws_hold_counts"), c0.get("ws_hold_counts"))} if c1 else None
    if cloud_stats and shared:
        cloud_stats = {"shared": "with cells running at once: the cloud's counters are not this cell's"}
    return {**summarise(cell.mode, cell.rtt_ms, bench, c1), **link_figures(cloud_stats, edge_stats),
            "wall_s": round(wall, 1), "bench": bench, "edge_stats": edge_stats, "cloud_stats": cloud_stats}


RAW = ("itls",)                                      # per request: every inter-chunk gap
RAW_PER_REQUEST = ("chunk_times", "chunk_tokens")     # per request: every chunk's time and tokens
RAW_TANDEM = ("per_dataset", "per_rtt_class")         # one dataset and one link per benchmark: copies of its totals


def slim_bench(bench: dict) -> dict:
    """A benchmark's output as the result JSON keeps it: without the raw per-chunk lists (RAW,
    RAW_PER_REQUEST) and the copies (RAW_TANDEM), which the logs archive keeps whole
    (<cell>/bench_<dataset>.json). Every figure
    a report shows, and derive_rows' inputs (per request: the figures, TTFT, E2EL, output length,
    text), stays."""
    out = {k: v for k, v in bench.items() if k not in RAW}
    tandem = out.get("tandem")
    if isinstance(tandem, dict):
        out["tandem"] = {k: v for k, v in tandem.items() if k not in RAW_TANDEM}
        if tandem.get("requests"):
            out["tandem"]["requests"] = [{k: v for k, v in r.items() if k not in RAW_PER_REQUEST}
                                         for r in tandem["requests"]]
    return out


def run_cell(exp: Experiment, cell: Cell, requests: dict[str, list], log_dir: Path, pool: CloudPool,
             place: Placement = Placement(), lane: int = 0, shared: bool = False) -> dict:
    """Start the cell's processes (the cloud from the pool), run one benchmark per dataset, stop them;
    the cell's record. shared: other cells run at once against the same cloud."""
    w = exp.workload
    record: dict[str, Any] = {"row": cell.row, "mode": cell.mode, "link": cell.link, "rtt_ms": cell.rtt_ms,
                              "repeat": cell.repeat, "overrides": dict(cell.overrides),
                              "logs": f"{log_dir.parent.name}/{log_dir.name}", "load_at_start": _load(), "datasets": {}}
    if place.edges[lane] is not None:
        record["edge_cpus"] = cpu_spec(place.edges[lane])
    t0 = time.perf_counter()
    link = None
    with Stack(log_dir) as stack:
        try:
            edge, cloud, link, record["cloud"] = _start(stack, cell, w.seed, pool, place, lane)
            record["startup_s"] = round(time.perf_counter() - t0, 1)
            own = not shared and not (record["cloud"] or {}).get("reused")
            if w.warmup:
                asyncio.run(_warmup(edge.url))
            for ds, reqs in requests.items():
                data = _measure(w, cell, edge, cloud, reqs, own, shared)
                (log_dir / f"bench_{ds}.json").write_text(json.dumps(data["bench"]))   # whole, in the logs archive
                data["bench"] = slim_bench(data["bench"])     # for this run's rows; the JSON leaves it out
                record["datasets"][ds] = data
        except ProcessFailed:
            raise
        except Exception as e:         # the benchmark or a scrape failed: say why, with every process's log
            procs = stack.procs + ([pool.proc] if cell.needs_cloud and pool.proc else [])
            tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.tail(15)}" for p in procs)
            raise CellFailed(f"{type(e).__name__}: {e}\n{tails}") from e
    record["processes"] = stack.stopped
    if link is not None:
        record["link_stats"] = _link_stats(link.log_path)
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record


# --- the whole experiment --------------------------------------------------------------------------
def rows_of(exp: Experiment, records: list[dict]) -> list[dict]:
    """One row per (matrix row, link, dataset): the mean over repeats of each figure. A row without a
    cloud was measured once (per repeat) and stands for every link."""
    from ablations.experiment import LOCAL_MODES, METRICS, link_rtt_ms
    out = []
    for label in exp.matrix:
        for link in exp.links:
            for ds in exp.workload.datasets:
                runs = [r for r in records if r["row"] == label and r["link"] in (link, None)
                        and ds in r.get("datasets", {})]
                failed = [r for r in records if r["row"] == label and r["link"] in (link, None) and r.get("error")]
                if not runs and not failed:
                    continue
                mode = (runs or failed)[0]["mode"]
                row = {"row": label, "mode": mode, "link": link,
                       "rtt_ms": link_rtt_ms(link), "dataset": ds, "repeats": len(runs),
                       "measured_once": mode in LOCAL_MODES}
                for m in METRICS:
                    vals = [r["datasets"][ds].get(m) for r in runs]
                    vals = [v for v in vals if v is not None]
                    mean = float(np.mean(vals)) if vals else None
                    row[m] = None if mean is None else int(mean) if mean.is_integer() and m in COUNTS else round(mean, 3)
                    if len(vals) > 1:
                        row.setdefault("spread", {})[m] = [min(vals), max(vals)]
                if failed and not runs:
                    row["error"] = failed[0]["error"]
                out.append(row)
    speedup_rows(exp, out)
    return out


FIXED_K4 = {"draft.max_k": 4, "switches.adaptive_draft": False, "switches.draft_ahead": False,
            "switches.ngram_draft": False}


def speedup_rows(exp: Experiment, rows: list[dict]) -> None:
    """speedup_vs_fixed (issue 15's drafting bar): each row's per-user tok/s over that of the experiment's
    fixed-k=4 row (an edge-cloud row with draft.max_k 4 and adaptive_draft, draft_ahead, ngram_draft off)
    at the same link and dataset; nothing where the experiment has no such row."""
    from common.config import ConfigError
    def is_fixed(label: str) -> bool:
        cfg = row_config(exp, label)
        return row_mode(exp, label) == "edge_cloud" and all(
            getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) == v for k, v in FIXED_K4.items())
    try:
        fixed = next((label for label in exp.matrix if is_fixed(label)), None)
    except ConfigError:                # an old result whose rows today's config no longer loads
        return
    if fixed is None:
        return
    base = {(r["link"], r["dataset"]): r.get("per_user_tok_s") for r in rows if r["row"] == fixed}
    for row in rows:
        b, v = base.get((row["link"], row["dataset"])), row.get("per_user_tok_s")
        row["speedup_vs_fixed"] = round(v / b, 3) if v and b else None


def _texts(record: dict, ds: str) -> Optional[list]:
    return (((record.get("datasets") or {}).get(ds) or {}).get("bench") or {}).get("generated_texts")


def agreement(exp: Experiment, records: list[dict], rows: list[dict]) -> None:
    """Greedy only: how many answers of each row are the same text as the target alone's (the
    cloud_only row's at the same link, dataset and repeat), as `same_text_as_cloud_only: [same, of]`.
    Tandem's greedy output is the target's own answer up to floating-point near-ties (cloud.exact makes
    it bit for bit); this says how often that held here. The edge-only row shows how often the draft
    model alone gives the target's answer."""
    if exp.workload.temperature != 0:
        return
    refs = {(r["link"], r["repeat"]): r for r in records if r["mode"] == "cloud_only" and "datasets" in r}
    for row in rows:
        if row["mode"] == "cloud_only":
            continue
        same = total = 0
        for rec in records:
            if rec["row"] != row["row"] or rec["link"] not in (row["link"], None):
                continue
            mine = _texts(rec, row["dataset"])
            theirs = _texts(refs.get((row["link"], rec["repeat"]), {}), row["dataset"])
            if mine and theirs and len(mine) == len(theirs):
                same += sum(a == b for a, b in zip(mine, theirs))
                total += len(mine)
        if total:
            row["same_text_as_cloud_only"] = [same, total]


def _command(argv: Optional[list[str]]) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python -m ablations " + " ".join(shlex.quote(a) for a in args)


def waves(todo: list[Cell]) -> list[list[Cell]]:
    """The cells cut where the cloud configuration changes: every cell of a wave can share one cloud
    (a cell without a cloud joins the wave it falls in)."""
    out: list[list[Cell]] = [[]]
    key = None
    for c in todo:
        if c.needs_cloud:
            if key is not None and c.cloud_overrides != key:
                out.append([])
            key = c.cloud_overrides
        out[-1].append(c)
    return [wave for wave in out if wave]


def run_experiment(exp: Experiment, out: Path, argv: Optional[list[str]] = None) -> tuple[dict, bool]:
    """Run every cell; write <out>/<name>.{json,md,png}. Returns (result, all cells succeeded)."""
    from ablations.bench import load_requests
    w = exp.workload
    out.mkdir(parents=True, exist_ok=True)
    logs = out / f"{exp.name}-logs"
    if exp.device and exp.device.stage:
        from ablations.device import stage_models
        stage_models(exp.device.stage)            # before any process starts: they inherit TANDEM_CACHE
    place = Placement.of(exp)
    meta = environment(_command(argv))
    meta["real"] = what_was_real(exp)
    requests = {ds: load_requests(ds, w.num_prompts, w.split, w.max_tokens, w.seed) for ds in w.datasets}
    result = {"meta": meta, "experiment": exp.model_dump(mode="json"), "rows": [], "cells": []}
    todo = cells(exp)
    t0 = time.perf_counter()
    state = {"ok": True}
    lock, stop = threading.Lock(), threading.Event()
    pool = CloudPool(logs, place.cloud)
    bar = tqdm(total=len(todo), desc=exp.name, unit="cell")
    mine = os.sched_getaffinity(0) if place.clients else None
    if place.clients:
        os.sched_setaffinity(0, place.clients)    # the runner's threads: the benchmark clients
    switch = sys.getswitchinterval()
    if len(place.edges) > 1:                      # lanes' clients share this process's GIL: a thread that wants it
        sys.setswitchinterval(0.0005)             # waits up to this long (5 ms by default) to stamp a chunk

    def one(cell: Cell, lane: int, shared: bool) -> None:
        failures = (ProcessFailed, CellFailed, Exception) if shared else (ProcessFailed, CellFailed)
        try:
            record = run_cell(exp, cell, requests, logs / cell.slug, pool, place, lane, shared)
        except failures as e:               # a lane's thread records anything as the cell's failure
            state["ok"] = False
            record = {"row": cell.row, "mode": cell.mode, "link": cell.link, "rtt_ms": cell.rtt_ms,
                      "repeat": cell.repeat, "error": f"{type(e).__name__}: {e}", "logs": str(logs / cell.slug)}
            tqdm.write(f"cell {cell.row} @ {cell.link or 'no link'} failed: {e}", file=sys.stderr)
        with lock:
            result["cells"].append(record)
            _finish(exp, result, out, t0, final=False, draw=not shared)
            bar.set_postfix_str(f"{cell.row} @ {cell.link or 'no link'}")
            bar.update()

    def lane_worker(lane: int, queue: list[Cell], cloud_ready: threading.Event) -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                cell = queue.pop(0)
            if cell.needs_cloud:
                cloud_ready.wait()
            one(cell, lane, shared=True)

    try:
        for wave in waves(todo):
            if len(place.edges) == 1:
                for cell in wave:
                    one(cell, 0, shared=False)
                continue
            # the cells without a cloud first (they run while the cloud starts; local_target, the slowest,
            # first of them), then the highest RTT first, so that the lanes end together
            queue = sorted(wave, key=lambda c: (c.needs_cloud, c.mode != "local_target", -(c.rtt_ms or 0.0)))
            cloud_ready = threading.Event()
            threads = [threading.Thread(target=lane_worker, args=(i, queue, cloud_ready), daemon=True)
                       for i in range(min(len(place.edges), len(wave)))]
            for t in threads:
                t.start()
            first = next((c for c in wave if c.needs_cloud), None)
            try:
                if first is not None:
                    pool.prepare(first)     # from this thread, which outlives the lanes' threads
            except ProcessFailed as e:
                tqdm.write(f"cloud failed to start: {e}", file=sys.stderr)   # the cells will say so too
            finally:
                cloud_ready.set()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
    except BaseException:
        stop.set()
        raise
    finally:
        pool.close()
        if mine:
            os.sched_setaffinity(0, mine)
        sys.setswitchinterval(switch)
        bar.close()
        with lock:
            result["clouds"] = pool.stopped
            _finish(exp, result, out, t0, final=True)
    if state["ok"]:
        _pack_logs(logs)
    return result, state["ok"]


def attach_bench(result: dict, folder: Path) -> None:
    """Each cell's benchmark output where the JSON does not carry it (report.dumps leaves it out): from the
    run's logs beside the JSON (<name>-logs.tar.gz, or the folder of a run that failed), each cell's
    <cell>/bench_<dataset>.json, as slim_bench keeps it. A cell whose file is not there stays without."""
    name = result["experiment"]["name"]
    archive, tree = folder / f"{name}-logs.tar.gz", folder / f"{name}-logs"
    tar = tarfile.open(archive) if archive.exists() else None
    try:
        for cell in result.get("cells") or []:
            for ds, data in (cell.get("datasets") or {}).items():
                if data.get("bench") is not None or not cell.get("logs"):
                    continue
                member = f"{name}-logs/{Path(cell['logs']).name}/bench_{ds}.json"
                if tar is not None:
                    with contextlib.suppress(KeyError):
                        data["bench"] = slim_bench(json.load(tar.extractfile(member)))
                elif (tree.parent / member).exists():
                    data["bench"] = slim_bench(json.loads((tree.parent / member).read_text()))
    finally:
        if tar is not None:
            tar.close()


def derive_rows(result: dict, folder: Optional[Path] = None) -> dict:
    """The rows (the figures a report shows) from the result's raw cells, by today's definitions:
    each cell's benchmark output (from the logs in `folder`, attach_bench) and /stats are summarised
    again. Used after every cell and by `python -m ablations report`, so a report re-drawn from an old
    JSON uses the same figures as a run."""
    if folder is not None:
        attach_bench(result, folder)
    raw = [c for c in result.get("cells") or [] if any(d.get("bench") for d in (c.get("datasets") or {}).values())]
    if not raw:
        return result                  # nothing raw to derive from: the rows stand as written
    spec = result["experiment"]        # as written then: not validated against today's config schema
    exp = Experiment.model_construct(**{**spec, "workload": Workload.model_construct(**spec["workload"])})
    for cell in result["cells"]:
        for data in (cell.get("datasets") or {}).values():
            if data.get("bench") is not None:
                data.update(summarise(cell["mode"], cell.get("rtt_ms"), data["bench"],
                                      {"latency_ms": (data.get("cloud_stats") or {}).get("latency_ms")}))
                data.update(link_figures(data.get("cloud_stats"), data.get("edge_stats")))
    result["rows"] = rows_of(exp, result["cells"])
    agreement(exp, result["cells"], result["rows"])
    batching_rows(exp, result["rows"])
    return result


def _finish(exp: Experiment, result: dict, out: Path, t0: float, final: bool, draw: bool = True) -> None:
    """Rows derived, the JSON written (and, with draw, the Markdown and PNG: not while lanes measure in
    this process, as matplotlib would hold the GIL their clients time with)."""
    result["rows"] = rows_of(exp, result["cells"])
    agreement(exp, result["cells"], result["rows"])
    batching_rows(exp, result["rows"])
    result["meta"]["duration_s"] = round(time.perf_counter() - t0, 1)
    result["meta"]["load_end"] = _load()
    result["meta"]["complete"] = final and len(result["cells"]) == len(cells(exp))
    if draw:
        report.write(result, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{exp.name}.json").write_text(report.dumps(result))


def _pack_logs(logs: Path) -> None:
    """A finished run's process logs: one compressed archive beside the report (kept as a folder when
    something failed, to read)."""
    if not logs.is_dir():
        return
    with tarfile.open(logs.with_suffix(".tar.gz"), "w:gz") as tar:
        tar.add(logs, arcname=logs.name)
    shutil.rmtree(logs)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a CI timeout, `kill`) ends the run as Ctrl-C does: processes stopped, results written."""
    def handler(signum, frame):
        raise KeyboardInterrupt()
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
