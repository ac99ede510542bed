"""The GPU engine jobs (issue 3): what the vLLM cloud does at 64-256 sessions, beside vLLM alone, one
job per engine, results under --out. Experiments with real edges behind a link, one user or a population,
run through the runner instead (`python -m ablations run gpu_rtt_sweep`, gpu_goodput, gpu_population);
these jobs measure the engine: throughput, the oracle ceiling, the 14B shape, exactness.

  python -m ablations device prepare                   # here (CPU): tokenize the prompts once
  python -m ablations device run --jobs JOB,JOB --out $OUT      # on the device (staging: shared/device/README.md)
  python -m ablations device report ablations/results/gpu_vllm-logs.tar.xz    # here: results/gpu_vllm.{json,md}
(`python -m ablations.gpu_vllm ...`, as the reports' commands are written, is the same entry point.)

Jobs (each starts its own engine in a subprocess, writes job_<name>.json, and keeps what later jobs
need in --work, /tmp/gpu_work by default):
  smoke    random-weight 1.5B shape: in-engine design vs vLLM alone (plumbing check, no weights needed)
  plain    the real 1.5B alone: greedy references (with the top-2 gap per token) and plain streaming
           throughput at 64 and 256 sessions
  edges    the in-engine design behind our aiohttp cloud with REAL edges (llama.cpp 0.5B drafter on
           the device's CPU, our edge code over HTTP): lossless vs `plain`, tau and acceptance; then
           trace-driven light clients (the real edges' recorded drafts, replayed over HTTP) at 64 and
           256 sessions, the same engine fed oracle drafts of the same tau (no wire), and a run with
           the recorded draft time + an emulated RTT; engine step profile
  replay   the edges job's replay and oracle alone (from its traces), --repeats pairs at 64 and 256
  big      random-weight 14B: plain vs in-engine (light clients over HTTP, drafts = its own greedy
           output with every 4th token wrong) vs in-engine oracle, 64 and 256 sessions
  anchor   vLLM's own speculative decoding with the 0.5B as draft_model, 1 and 64 sessions
  baseline request-per-round design: verify latency k=4 at 1k context with/without prefix reuse
  invariance  the real 1.5B alone: greedy outputs all at once (twice), 8 at a time, one at a time, for
           one engine setting (--variant): is vLLM alone batch invariant here
  Any job + `--batch-invariant`: VLLM_BATCH_INVARIANT=1 (results suffixed _bi).
  Any job + `--exact`: exact mode (results suffixed _exact). Jobs with our cloud set the config key
  cloud.exact=true, so make_backend (cloud/backends/base.py) applies it as the product does
  (VLLM_BATCH_INVARIANT=1, TRITON_ATTN unless --attention names another); the jobs of vLLM alone
  (plain, big_plain, anchor) get the same two settings here (exact_vllm_alone). The replay job also
  checks greedy equality: every replayed and oracle session against vLLM target-only on the same engine.

  python -m ablations.gpu_vllm report-exact DIR     # here: one session's plain/replay jobs, default and
                                                    # --exact -> results/gpu_exact.{json,md}
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ablations.replay import TracePlan, cpu_list, cut, run_light

HERE = Path(__file__).resolve().parent
PROMPTS_FILE = HERE / "results" / "gpu_prompts.json"
RESULTS = HERE / "results"
K = 4


def log(msg: str) -> None:
    print(f"[gpu_vllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare() -> None:
    from common.assets import model_path
    from common.llama_runtime import LlamaRunner
    from common.prompts import chat, humaneval, mtbench
    runner = LlamaRunner(model_path("qwen2.5-coder-0.5b-instruct-q4_k_m"), 4096)
    rows = [{"id": p.id, "set": "humaneval", "ids": runner.tokenize(chat(p.text))} for p in humaneval()[:32]]
    rows += [{"id": p.id, "set": "mtbench", "ids": runner.tokenize(chat(p.text))} for p in mtbench()[:32]]
    PROMPTS_FILE.write_text(json.dumps(rows))
    print(f"wrote {len(rows)} prompts to {PROMPTS_FILE}")


# ---- models ---------------------------------------------------------------------------------------
from ablations.device import QWEN_14B, QWEN_15B, shape_dir  # noqa: E402,F401  (model shapes: ablations/device.py)


def real_dir(args, which: str) -> str:
    from cloud.backends.torch_backend import dequantized_dir
    gguf = args.gguf if which == "target" else args.draft_gguf
    t0 = time.time()
    d = dequantized_dir(Path(gguf), "bfloat16", args.cache)
    log(f"{which} bf16 folder ready in {time.time() - t0:.1f} s: {d}")
    return str(d)


def vcfg(args, **over):
    from common.config import VllmConfig
    return VllmConfig(execution=args.execution, gpu_memory_utilization=0.85, max_num_seqs=256,
                      num_speculative_tokens=K, pad_drafts=not args.no_pad, tensor_parallel_size=args.tp,
                      engine_process=not args.in_process, attention_backend=args.attention,
                      early_answers=not args.late_answers,
                      **{k: v for k, v in (("gather_ms", args.gather_ms), ("switch_interval_ms", args.switch_ms),
                                           ("frontends", args.frontends), ("busy_poll_ms", args.busy_poll_ms))
                         if v is not None}, **over)


def prompts(n=None) -> list[dict]:
    rows = json.loads(PROMPTS_FILE.read_text())
    return rows[:n] if n else rows


# ---- plain vLLM (no speculation): references and streaming throughput ------------------------------
def plain_engine(model_dir, args, **extra):
    from vllm import EngineArgs, LLMEngine
    from cloud.backends.vllm_args import engine_kwargs
    return LLMEngine.from_engine_args(EngineArgs(**engine_kwargs(model_dir, vcfg(args), 4096, **extra)))


_DRIVES = iter(range(10**9))


def drive(engine, reqs: list[tuple[list[int], object]]) -> tuple[list[list[int]], list, float]:
    """Add all requests at once, step to the end: outputs, logprobs, wall seconds. Fresh cache
    salts per call: no prefix-cache hits across calls (as for new sessions)."""
    t0 = time.perf_counter()
    tag = next(_DRIVES)
    for i, (ids, sp) in enumerate(reqs):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids, "cache_salt": f"d{tag}r{i}"}, sp)
    outs, lps = [None] * len(reqs), [None] * len(reqs)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                i = int(o.request_id[1:])
                outs[i], lps[i] = list(o.outputs[0].token_ids), o.outputs[0].logprobs
    return outs, lps, time.perf_counter() - t0


def throughput(engine, ids_list, sessions: int, n_new: int) -> dict:
    from vllm import SamplingParams
    sp = SamplingParams(max_tokens=n_new, temperature=0.0, detokenize=False)
    reqs = [(ids_list[i % len(ids_list)], sp) for i in range(sessions)]
    outs, _, wall = drive(engine, reqs)
    n = sum(map(len, outs))
    return {"sessions": sessions, "tokens": n, "wall_s": round(wall, 2), "tokens_per_s": round(n / wall, 1)}


def job_plain(args, work: Path) -> dict:
    from vllm import SamplingParams
    model = real_dir(args, "target")
    t0 = time.time()
    eng = plain_engine(model, args)
    res = {"engine_up_s": round(time.time() - t0, 1)}
    rows = prompts(args.prompts)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=2, detokenize=False)
    refs, lps, _ = drive(eng, [(p["ids"], sp) for p in rows])
    gaps = []
    for lp in lps:                      # top-1 minus top-2 logprob at each generated position
        g = []
        for d in lp:
            v = sorted((x.logprob for x in d.values()), reverse=True)
            g.append(round(v[0] - v[1], 4) if len(v) > 1 else None)
        gaps.append(g)
    (work / "refs15.json").write_text(json.dumps({"refs": refs, "gaps": gaps}))
    for s in (64, 256):
        drive(eng, [(rows[0]["ids"], sp)])       # warm
        runs = [throughput(eng, [p["ids"] for p in rows], s, args.max_tokens) for _ in range(max(args.repeats, 1))]
        res[f"plain_{s}"] = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]    # the median run
        res[f"plain_{s}_runs"] = [r["tokens_per_s"] for r in runs]
        log(f"plain {s}: {res[f'plain_{s}']} (runs {res[f'plain_{s}_runs']})")
    res["single_stream"] = throughput(eng, [rows[0]["ids"]], 1, args.max_tokens)
    return res


VARIANTS = {"default": {}, "no_prefix_cache": {"enable_prefix_caching": False},
            "no_chunked_prefill": {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192},
            "eager": {"enforce_eager": True}}


def drive_window(engine, rows: list[dict], sp, width: int, tag: str) -> list[list[int]]:
    """Greedy outputs with at most `width` requests in vLLM at once (a new one as each finishes)."""
    outs, nxt = [None] * len(rows), 0
    live = 0
    while nxt < len(rows) or live:
        while live < width and nxt < len(rows):
            engine.add_request(f"{tag}{nxt}", {"prompt_token_ids": rows[nxt]["ids"], "cache_salt": f"{tag}{nxt}"}, sp)
            nxt, live = nxt + 1, live + 1
        for o in engine.step():
            if o.finished:
                outs[int(o.request_id[len(tag):])] = list(o.outputs[0].token_ids)
                live -= 1
    return outs


def job_invariance(args, work: Path) -> dict:
    """Is vLLM alone (LLMEngine, no speculation) batch invariant on this machine? The same greedy
    requests all at once, twice, then 8 at a time, then one at a time (first 16 prompts), on one engine
    with the settings of --variant (VARIANTS); outputs kept for comparisons across engines."""
    from vllm import SamplingParams
    model = real_dir(args, "target")
    t0 = time.time()
    eng = plain_engine(model, args, **VARIANTS[args.variant])
    res = {"variant": args.variant, "engine_up_s": round(time.time() - t0, 1), "outs": {}}
    rows = prompts(args.prompts)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, detokenize=False)
    for name, rr, width in (("all", rows, len(rows)), ("all_again", rows, len(rows)), ("w8", rows, 8),
                            ("w1", rows[:16], 1)):
        t = time.time()
        res["outs"][name] = [cut(o, args.max_tokens) for o in drive_window(eng, rr, sp, width, f"{name}-")]
        same = sum(a == b for a, b in zip(res["outs"][name], res["outs"]["all"]))
        res[f"{name}_identical_to_all"] = f"{same}/{len(rr)}"
        log(f"invariance {args.variant} {name}: {same}/{len(rr)} identical to all-at-once ({time.time() - t:.1f} s)")
    return res


# ---- the in-engine design behind our cloud ---------------------------------------------------------
async def start_tandem_cloud(model_dir, args, **vover):
    """Our cloud (CloudNode: engine process + HTTP front ends) on a free port."""
    from cloud.node import CloudNode
    from common.config import load_config
    t0 = time.time()
    cfg = load_config(overrides={"cloud.backend": "vllm", "cloud.max_sessions": 4096, "cloud.n_ctx": 4096,
                                 "cloud.max_draft": 16, "cloud.exact": bool(args.exact)})
    cfg.cloud.vllm = vcfg(args, model_dir=model_dir, **vover)
    node = await CloudNode.start(cfg, "127.0.0.1", 0)
    if args.engine_cpus:                             # the engine process (every thread) alone on these CPUs
        eng = cpu_list(args.engine_cpus)
        for pid, cpus in [(node.verifier.backend._proc.pid, eng), (os.getpid(), os.sched_getaffinity(0) - eng),
                          *[(p.pid, os.sched_getaffinity(0) - eng) for p in node._frontends]]:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), cpus)
    log(f"in-engine cloud up in {time.time() - t0:.1f} s at {node.url} (engine in a child process: "
        f"{cfg.cloud.vllm.engine_process}, front ends: {1 + len(node._frontends)})")
    return node.verifier.backend, node.verifier, node, node.url, round(time.time() - t0, 1)


def edge_worker(url: str, rows: list[dict], n_new: int, threads: int, out_q) -> None:
    """A real edge process: llama.cpp drafter + our Generator, one prompt after another."""
    from common.config import load_config
    from edge.generator import GenStats
    from edge.node import EdgeNode
    cfg = load_config(overrides={"draft.n_threads": threads,
                                 "edge.request_timeout_s": 300})

    async def go():
        async with EdgeNode(cfg, url) as node:
            for p in rows:
                box = []
                ids = []
                async for piece in node.stream(p["ids"], n_new, node.sampling(), None, box):
                    ids += piece.token_ids
                st: GenStats = box[0]
                out_q.put({"id": p["id"], "set": p["set"], "out": ids, "stats": st.as_dict(), "trace": st.trace,
                           "error": st.error})
    asyncio.run(go())


def run_real_edges(url, rows, n_new, procs, threads) -> list[dict]:
    """Real edges straight on the cloud's port (no link between them: the edges job measures
    losslessness and records drafts; experiments with a link run through `python -m ablations run`)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [rows[i::procs] for i in range(procs)]
    ps = [ctx.Process(target=edge_worker, args=(url, s, n_new, threads, q)) for s in shares if s]
    for p in ps:
        p.start()
    got = []
    from tqdm import tqdm
    for _ in tqdm(range(len(rows)), desc="real edges", mininterval=10):
        got.append(q.get(timeout=900))
    for p in ps:
        p.join()
    order = {r["id"]: i for i, r in enumerate(rows)}
    return sorted(got, key=lambda g: order[g["id"]])


def light_kw(args) -> dict:
    """How the light clients run (run_light's keywords), from the command line."""
    return {"procs": args.light_procs, "busy_poll_ms": args.client_busy_poll_ms, "ws": args.ws, "ahead": args.ahead}


def oracle_summary(outs: list[list[int]], wall: float) -> dict:
    toks = sum(map(len, outs))
    return {"sessions": len(outs), "tokens": toks, "wall_s": round(wall, 2), "tokens_per_s": round(toks / wall, 1)}


def summary(res: list[dict], wall: float) -> dict:
    rounds = sum(r["rounds"] for r in res)
    base = oracle_summary([r["out"] for r in res], wall)
    lat = np.array([x for r in res for x in r.get("lat", [])]).reshape(-1, 3)
    p50 = np.percentile(lat, 50, axis=0).round(2).tolist() if len(lat) else [None] * 3
    return base | {"rounds": rounds, "tau": round(base["tokens"] / max(rounds, 1), 3),
                   "errors": sum(bool(r["error"]) for r in res),
                   "resyncs": sum(r.get("resyncs", 0) for r in res),
                   "stale_ahead": sum(r.get("stale", 0) for r in res),   # draft-ahead rounds answered 412
                   # where a round's time goes (p50): seen by the client, in the cloud's handler, in the engine
                   "round_ms_p50": dict(zip(("client", "handler", "engine"), p50))}


async def oracle_run(backend, sessions, n_new, plan_of) -> tuple[list[list[int]], float]:
    from common.protocol import SamplingParams
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[backend.run_oracle(s["prompt"], n_new, SamplingParams(), plan_of(s))
                                  for s in sessions])
    return [cut(o, n_new) for o in outs], time.perf_counter() - t0


async def replay(backend, url, ss, n_new, keep: bool = False, **light) -> dict:
    """Light clients over HTTP (run_light), with the engine's step counters for this run alone.
    keep: also each session's output, by session id, under "_outs" (not for the job file)."""
    await backend.engine_stats()     # start counting this run
    out, wall = await asyncio.to_thread(run_light, url, ss, n_new, **light)
    return summary(out, wall) | {"engine": await backend.engine_stats()} | (
        {"_outs": {r["sid"]: r["out"] for r in out}} if keep else {})


async def oracle(backend, ss, n_new, plan_cls, keep: bool = False) -> dict:
    """The same sessions with drafts made inside the scheduler by plan_cls (no wire)."""
    await backend.engine_stats()     # start counting this run
    outs, wall = await oracle_run(backend, ss, n_new, lambda x: plan_cls(x, backend.n_vocab))
    return oracle_summary(outs, wall) | {"engine": await backend.engine_stats()} | (
        {"_outs": {s["sid"]: o for s, o in zip(ss, outs)}} if keep else {})


async def replay_pair(backend, url, sessions: list[dict], s: int, tag: str, args,
                      keep: bool = False) -> tuple[dict, dict]:
    """s sessions cycled from the real edges' traces: light clients over HTTP, then the same engine
    fed oracle drafts of the same shape (TracePlan), back to back. --burn-cpus: the oracle once more
    with those CPUs kept busy (is ours' step slower for the load the clients and front ends put on
    the host?), as orc["loaded"]."""
    ss = [dict(sessions[i % len(sessions)], sid=f"{tag}-{i}") for i in range(s)]
    ours = await replay(backend, url, ss, args.max_tokens, keep, **light_kw(args))
    orc = await oracle(backend, ss, args.max_tokens, TracePlan, keep)
    if args.burn_cpus:
        burners = [mp.get_context("spawn").Process(target=burn, args=(c,), daemon=True) for c in cpu_list(args.burn_cpus)]
        for b in burners:
            b.start()
        await asyncio.sleep(1.0)
        orc["loaded"] = await oracle(backend, ss, args.max_tokens, TracePlan)
        for b in burners:
            b.terminate()
    return ours, orc


def step_line(run: dict) -> str:
    e = run.get("engine", {})
    return " ".join(str(e.get(k)) for k in ("ms_per_step", "idle_ms_per_step", "post_ms_per_step", "gc_ms_per_step",
                                            "edge_cycle_ms", "read_ms")) + f" gc {e.get('gc_runs')} steps {e.get('steps')}"


def burn(cpu: int) -> None:
    """Keep one CPU busy (a Python loop, as a busy-polling client or front end would) until killed."""
    os.sched_setaffinity(0, {cpu})
    while True:
        pass


class Every4Plan:
    """Oracle drafts from the session's own reference output, every 4th token wrong."""

    def __init__(self, s: dict, vocab: int):
        self.n0, self.ref, self.vocab = len(s["prompt"]), s["fallback"], vocab

    def __call__(self, n, tokens):
        return oracle_draft(self.ref, n - self.n0, K, self.vocab)


def oracle_draft(ref: list[int], pos: int, k: int, vocab: int) -> list[int]:
    """The target's own next k tokens, every 4th (by position) replaced: tau = 4 when exact."""
    return [ref[j] if (j + 1) % 4 else (ref[j] + 1) % vocab for j in range(pos, min(pos + k, len(ref)))]


def divergence(ours: list[int], ref: list[int], gaps: list, n: int) -> dict | None:
    """None when identical (to n tokens), else where they part and the reference's top-2 gap there."""
    a, b = cut(ours, n), cut(ref, n)
    if a == b:
        return None
    j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"position": j, "ref_top2_gap": gaps[j] if j < len(gaps) else None,
            "ours": a[j] if j < len(a) else None, "ref": b[j] if j < len(b) else None}


async def exactness_probes(backend, rows, sessions, ref, n_new: int, concurrency: int, edge_outs) -> dict:
    """Where outputs part from the reference without edges or wire, on the same engine as the edges:
    plain_staggered   target-only requests (no drafts), `concurrency` at a time as the real edges came
    oracle_staggered  drafts made in the scheduler with the real edges' per-round shape (TracePlan over
                      the reference's own tokens), `concurrency` at a time
    oracle_all        the same, all prompts at once (batched like the reference run)."""
    from common.protocol import SamplingParams
    sem = asyncio.Semaphore(concurrency)
    plans = [dict(s, fallback=r) for s, r in zip(sessions, ref["refs"])]

    async def plain(i, p):
        async with sem:
            return [t async for t in backend.agenerate(f"probe{i}", p["ids"], n_new, SamplingParams())]

    async def oracle_one(s, gate):
        async with gate:
            return await backend.run_oracle(s["prompt"], n_new, SamplingParams(), TracePlan(s, backend.n_vocab))

    out = {}
    runs = {"plain_staggered": [plain(i, p) for i, p in enumerate(rows)],
            "oracle_staggered": [oracle_one(s, sem) for s in plans],
            "oracle_all": [oracle_one(s, asyncio.Semaphore(len(plans))) for s in plans]}
    for name, coros in runs.items():
        got = await asyncio.gather(*coros)
        div = [dict(d, id=p["id"]) for o, r, g, p in zip(got, ref["refs"], ref["gaps"], rows)
               if (d := divergence(o, r, g, n_new)) is not None]
        same = [cut(o, n_new) == cut(e, n_new) for o, e in zip(got, edge_outs)]
        out[name] = {"identical": len(rows) - len(div), "prompts": len(rows), "divergences": div,
                     # token for token equal to the real edges' output (same engine, same arrival pattern)
                     "identical_to_edges": sum(same),
                     "differs_from_edges": [p["id"] for p, ok in zip(rows, same) if not ok]}
        log(f"exactness probe {name}: {len(rows) - len(div)}/{len(rows)} identical to the reference")
    return out


async def job_edges(args, work: Path) -> dict:
    model = real_dir(args, "target")
    ref = json.loads((work / "refs15.json").read_text())
    rows = prompts(args.prompts)
    backend, verifier, node, url, up = await start_tandem_cloud(model, args)
    res = {"engine_up_s": up}
    # 1. real edges
    t0 = time.perf_counter()
    edges = await asyncio.to_thread(run_real_edges, url, rows, args.max_tokens, args.edge_procs, args.edge_threads)
    res["real_edges_wall_s"] = round(time.perf_counter() - t0, 1)
    ident, div = [], []
    for e, r, g in zip(edges, ref["refs"], ref["gaps"]):
        a, b = cut(e["out"], args.max_tokens), cut(r, args.max_tokens)
        same = a == b
        ident.append(same)
        if not same:
            j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            div.append({"id": e["id"], "set": e["set"], "position": j, "ref_top2_gap": g[j] if j < len(g) else None,
                        "edge_token": a[j] if j < len(a) else None, "ref_token": b[j] if j < len(b) else None,
                        "error": e["error"]})
    res["lossless_prompts"] = len(rows)
    res["lossless_identical"] = int(sum(ident))
    res["lossless_divergences"] = div
    for name in ("humaneval", "mtbench"):
        sel = [e for e in edges if e["set"] == name]
        rounds = sum(e["stats"]["rounds"] for e in sel)
        acc = sum(e["stats"]["accepted"] for e in sel)
        drafted = sum(e["stats"]["drafted"] for e in sel)
        res[f"identical_{name}"] = f"{sum(i for i, e in zip(ident, edges) if e['set'] == name)}/{len(sel)}"
        res[f"tau_{name}"] = round((acc + rounds) / max(rounds, 1), 3)
        res[f"acceptance_rate_{name}"] = round(acc / max(drafted, 1), 3)
        res[f"draft_ms_per_round_{name}"] = round(float(np.mean([e["stats"]["draft_ms_per_round"] or 0 for e in sel])), 2)
    res["edge_errors"] = [e["error"] for e in edges if e["error"]]
    log(f"real edges: identical {res['lossless_identical']}/{len(rows)}, tau {res['tau_humaneval']}/{res['tau_mtbench']}")
    sessions = []
    for e, p in zip(edges, rows):
        tr = {str(pos): [d, ms] for pos, d, a, ms in e["trace"]}
        accd = {str(pos): [len(d), a] for pos, d, a, ms in e["trace"]}
        sessions.append({"prompt": p["ids"], "trace": tr, "accepted": accd, "fallback": e["out"]})
    (work / "traces15.json").write_text(json.dumps(sessions))
    (Path(args.out) / "traces15.json").write_text(json.dumps(sessions))      # committed: the replay job's input
    res["exactness_probes"] = await exactness_probes(backend, rows, sessions, ref, args.max_tokens, args.edge_procs,
                                                     [e["out"] for e in edges])
    # 2. trace-driven light clients (zero think time) vs the same engine fed oracle drafts of the same tau
    for s in (64, 256):
        res[f"replay_{s}"], res[f"oracle_{s}"] = await replay_pair(backend, url, sessions, s, f"c{s}", args)
        log(f"{s}: replay {res[f'replay_{s}']['tokens_per_s']} oracle {res[f'oracle_{s}']['tokens_per_s']}")
    # 3. with the recorded draft time and an emulated RTT (what a fleet of edges looks like)
    ss = [dict(sessions[i % len(sessions)], sid=f"t64-{i}") for i in range(64)]
    res["replay_timed_64"] = await replay(backend, url, ss, args.max_tokens, timed=True, **light_kw(args),
                                          rtt_ms=args.rtt_ms) | {
        "rtt_ms": args.rtt_ms}
    # 4. profile the engine thread's steps during a replay at 64 sessions
    res["profile_64"] = await profiled(backend, url, sessions, args.max_tokens, work, args.light_procs)
    res["cloud_stats"] = verifier.stats.snapshot()
    await node.close()
    return res


async def profiled(backend, url, sessions, n_new, work: Path, procs: int) -> dict:
    """cProfile of the engine thread's steps during a 64-session replay."""
    ss = [dict(sessions[i % len(sessions)], sid=f"p64-{i}") for i in range(64)]
    await backend.profile(True)
    res = await replay(backend, url, ss, n_new, procs=procs)
    table = await backend.profile(False)
    (work / "profile_64.txt").write_text(table)
    return res | {"top": table.splitlines()[:60]}


async def job_replay(args, work: Path) -> dict:
    """The edges job's trace-driven replay alone, from the traces that job left (traces15.json in
    --work, or the committed results/gpu_traces15.json): ours and the oracle in turn, --repeats pairs
    at 64 and 256 sessions, a ratio per pair (the median is the figure: single runs are noisy)."""
    model = real_dir(args, "target")
    traces = work / "traces15.json"
    sessions = json.loads((traces if traces.exists() else RESULTS / "gpu_traces15.json").read_text())
    backend, verifier, node, url, up = await start_tandem_cloud(model, args)
    res = {"engine_up_s": up, "runs": []}
    await replay(backend, url, [dict(sessions[i], sid=f"warm-{i}") for i in range(8)], 32,
                 **(light_kw(args) | {"ahead": False}))
    sizes = [int(x) for x in args.sessions.split(",")]
    outs = {}                            # session id -> output, every run (for the equality check)
    for rep in range(args.repeats):
        for s in sizes:
            ours, orc = await replay_pair(backend, url, sessions, s, f"r{rep}-{s}", args, keep=True)
            outs.update({("ours", k): v for k, v in ours.pop("_outs").items()})
            outs.update({("oracle", k): v for k, v in orc.pop("_outs").items()})
            res["runs"].append({"sessions": s, "ours": ours, "oracle": orc,
                                "ratio": round(ours["tokens_per_s"] / orc["tokens_per_s"], 3)})
            log(f"replay {rep} {s}: ours {ours['tokens_per_s']} oracle {orc['tokens_per_s']} "
                f"ratio {res['runs'][-1]['ratio']} round p50 {ours['round_ms_p50']}")
            log("  engine ms/step (step idle post gc | edge cycle, read): ours " + step_line(ours) + " | oracle "
                + step_line(orc) + (" | oracle, CPUs loaded " + step_line(orc["loaded"]) if "loaded" in orc else ""))
    for s in sizes:
        r = sorted(x["ratio"] for x in res["runs"] if x["sessions"] == s)
        res[f"oracle_ceiling_{s}"] = {"median": r[len(r) // 2], "all": r}
    try:                                 # the timed runs above stand whatever happens here
        res["equality"] = await equality_check(backend, sessions, outs, args.max_tokens, work)
    except Exception as e:  # noqa: BLE001 - recorded in the job file
        res["equality"] = {"error": f"{type(e).__name__}: {e}"}
    await node.close()
    return res


async def equality_check(backend, sessions: list[dict], outs: dict, n_new: int, work: Path) -> dict:
    """Greedy equality on the same engine: vLLM target-only (our cloud's agenerate path: no drafts, one
    plain request per prompt) for each trace's prompt, all at once and then 8 at a time; every replayed
    session (ours, over the wire) and every oracle session of every run is compared with it token for
    token (session i of a run replays trace i mod len(sessions)). Also against a plain engine's greedy
    references (refs15.json in --work, from the plain job run with the same mode), where present."""
    from common.protocol import SamplingParams

    async def target_only(tag: str, width: int) -> list[list[int]]:
        gate = asyncio.Semaphore(width)

        async def one(i, s):
            async with gate:
                return cut([t async for t in backend.agenerate(f"{tag}{i}", s["prompt"], n_new, SamplingParams())],
                           n_new)
        return await asyncio.gather(*[one(i, s) for i, s in enumerate(sessions)])

    ref_all = await target_only("eq-all-", len(sessions))
    ref_8 = await target_only("eq-8-", 8)
    plain_ref = work / "refs15.json"
    plain = json.loads(plain_ref.read_text()) if plain_ref.exists() else None
    res = {"prompts": len(sessions), "n_new": n_new,
           "target_only_all_vs_8_at_a_time": sum(a == b for a, b in zip(ref_all, ref_8))}
    if plain:
        res["target_only_vs_plain_engine"] = sum(a == cut(b, n_new) for a, b in zip(ref_all, plain["refs"]))
    for kind in ("ours", "oracle"):
        div = []
        keys = sorted(k for k in outs if k[0] == kind)
        for _, sid in keys:
            i = int(sid.rsplit("-", 1)[1]) % len(sessions)
            got = cut(outs[(kind, sid)], n_new)
            if got != ref_all[i]:
                d = divergence(got, ref_all[i], plain["gaps"][i] if plain else [], n_new)
                div.append(dict(d, sid=sid, trace=i))
        res[kind] = {"sessions": len(keys), "identical": len(keys) - len(div), "divergences": div[:50],
                     "prompts_with_a_divergence": len({d["trace"] for d in div})}
        log(f"equality {kind}: {len(keys) - len(div)}/{len(keys)} sessions identical to target-only on the same engine")
    return res


def job_smoke(args, work: Path) -> dict:
    return asyncio.run(_smoke(args, work))


async def _smoke(args, work: Path) -> dict:
    """Random 1.5B-shaped weights: the in-engine path must reproduce the same engine's plain output."""
    from common.protocol import SamplingParams
    model = shape_dir(work, "shape15", QWEN_15B)
    backend, verifier, node, url, up = await start_tandem_cloud(model, args, load_format="dummy")
    rows = prompts(8)
    plain = []
    for p in rows:
        plain.append(cut([t async for t in backend.agenerate("g", p["ids"], 32, SamplingParams())], 32))
    sessions = [{"prompt": p["ids"], "trace": {}, "fallback": r, "sid": f"s{i}"} for i, (p, r) in enumerate(zip(rows, plain))]
    out, wall = await asyncio.to_thread(run_light, url, sessions, 32, 2)
    orc, _ = await oracle_run(backend, sessions, 32, lambda x: Every4Plan(x, backend.n_vocab))
    res = {"engine_up_s": up, "plain": plain, "http_identical": sum(o["out"] == r for o, r in zip(out, plain)),
           "oracle_identical": sum(o == r for o, r in zip(orc, plain)), "http": summary(out, wall),
           "errors": [o["error"] for o in out if o["error"]], "engine": await backend.engine_stats()}
    log(f"smoke: {json.dumps({k: v for k, v in res.items() if k != 'plain'})}")
    await node.close()
    return res


async def _big(args, work: Path, spec: bool) -> dict:
    from common.protocol import SamplingParams
    model = shape_dir(work, "shape14b", QWEN_14B)
    rows = prompts(args.prompts)
    res = {}
    if not spec:
        from vllm import SamplingParams as VSP
        t0 = time.time()
        eng = plain_engine(model, args, load_format="dummy", max_model_len=2048)
        res["engine_up_s"] = round(time.time() - t0, 1)
        refs, _, _ = drive(eng, [(p["ids"], VSP(max_tokens=args.max_tokens, temperature=0.0, detokenize=False))
                                 for p in rows])
        (work / "refs14.json").write_text(json.dumps(refs))
        for s in (64, 256):
            res[f"plain_{s}"] = throughput(eng, [p["ids"] for p in rows], s, args.max_tokens)
            log(f"14B plain {s}: {res[f'plain_{s}']}")
        return res
    refs = json.loads((work / "refs14.json").read_text())
    backend, verifier, node, url, up = await start_tandem_cloud(model, args, load_format="dummy")
    res["engine_up_s"] = up
    base = [{"prompt": p["ids"], "fallback": r} for p, r in zip(rows, refs)]
    warm = [dict(b, trace={}, sid=f"warm-{i}") for i, b in enumerate(base[:8])]
    res["warmup"] = await replay(backend, url, warm, 16, procs=2)   # one-time kernel compiles off the clock
    for s in (64, 256):
        ss = []
        for i in range(s):
            b = base[i % len(base)]
            tr = {str(j): [oracle_draft(b["fallback"], j, K, backend.n_vocab), 0.0] for j in range(args.max_tokens)}
            ss.append(dict(b, trace=tr, sid=f"b{s}-{i}"))
        res[f"ours_{s}"] = await replay(backend, url, ss, args.max_tokens, **light_kw(args))
        res[f"oracle_{s}"] = await oracle(backend, ss, args.max_tokens, Every4Plan)
        log(f"14B {s}: ours {res[f'ours_{s}']['tokens_per_s']} oracle {res[f'oracle_{s}']['tokens_per_s']}")
    await node.close()
    return res


def job_anchor(args, work: Path) -> dict:
    """vLLM's own speculative decoding: the 0.5B as draft_model next to the 1.5B (co-located)."""
    from vllm import SamplingParams
    target, draft = real_dir(args, "target"), real_dir(args, "draft")
    t0 = time.time()
    try:
        eng = plain_engine(target, args, speculative_config={"method": "draft_model", "model": draft,
                                                             "num_speculative_tokens": K})
    except Exception as e:  # noqa: BLE001 - recorded in the report
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    res = {"engine_up_s": round(time.time() - t0, 1)}
    rows = prompts(args.prompts)
    ref = json.loads((work / "refs15.json").read_text())["refs"] if (work / "refs15.json").exists() else None
    outs, _, _ = drive(eng, [(p["ids"], SamplingParams(max_tokens=args.max_tokens, temperature=0.0, detokenize=False))
                             for p in rows])
    if ref:
        res["identical_to_plain"] = f"{sum(cut(a, 10**6) == cut(b, 10**6) for a, b in zip(outs, ref))}/{len(rows)}"
    for s in (1, 64):
        res[f"anchor_{s}"] = throughput(eng, [p["ids"] for p in rows], s, args.max_tokens)
        log(f"anchor {s}: {res[f'anchor_{s}']}")
    return res


async def job_baseline(args, work: Path) -> dict:
    """Request-per-round design: verify latency k=4 at a 1k context, with and without prefix reuse."""
    from cloud.backends.vllm_backend import VllmBackend
    model = real_dir(args, "target")
    backend = VllmBackend(None, vcfg(args, model_dir=model), 4096)
    rows = prompts(2)
    ctx = (rows[0]["ids"] * 20)[:1000]
    res = {}
    for reuse in (True, False):
        ms = []
        for rnd in range(12):
            toks = ctx + [rows[1]["ids"][rnd % len(rows[1]["ids"])]] * (rnd * 5)
            t = time.perf_counter()
            await backend.alogits(f"lat{reuse}", toks + [13] * 4, 5, reuse, 0)
            ms.append((time.perf_counter() - t) * 1e3)
        res[f"verify_ms_p50_{'reuse' if reuse else 'no_reuse'}"] = round(float(np.median(ms[2:])), 2)
    backend.close()
    return res


JOBS = {"smoke": job_smoke, "plain": job_plain, "edges": lambda a, w: asyncio.run(job_edges(a, w)),
        "big_plain": lambda a, w: asyncio.run(_big(a, w, False)), "big": lambda a, w: asyncio.run(_big(a, w, True)),
        "anchor": job_anchor, "baseline": lambda a, w: asyncio.run(job_baseline(a, w)),
        "replay": lambda a, w: asyncio.run(job_replay(a, w)), "invariance": job_invariance}


def stage_cache(args) -> None:
    """Point TANDEM_CACHE at the staged GGUFs and stamp them as verified (ablations/device.py; the
    replay job needs no draft model staged, so finding none is no error here)."""
    from ablations.device import stage_files
    stage_files(Path(args.gguf), Path(args.draft_gguf).parent)


def exact_vllm_alone(args) -> None:
    """--exact for the jobs that run vLLM alone (no cloud config, so make_backend does not run): the
    two settings make_backend applies for cloud.exact on the vLLM backend, before vLLM is imported."""
    os.environ["VLLM_BATCH_INVARIANT"] = "1"
    args.attention = args.attention or "TRITON_ATTN"


def run_job(args) -> int:
    stage_cache(args)
    if args.cloud_cpus:                              # the cloud's processes inherit it
        os.sched_setaffinity(0, cpu_list(args.cloud_cpus))
    if args.client_cpus:
        os.environ["LIGHT_CPUS"] = args.client_cpus
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    name = args.job + ("_bi" if os.environ.get("VLLM_BATCH_INVARIANT") == "1" else "") + (
        f"_gather{args.gather_ms:g}" if args.gather_ms is not None else "") + (
        f"_switch{args.switch_ms:g}" if args.switch_ms is not None else "") + (f"_tp{args.tp}" if args.tp > 1 else "") + (
        "_nopad" if args.no_pad else "") + ("_inproc" if args.in_process else "") + (
        f"_{args.attention.lower()}" if args.attention else "") + (f"_{args.execution}" if args.execution != "graphs" else "") + (
        f"_fe{args.frontends}" if args.frontends is not None else "") + (
        f"_busy{args.busy_poll_ms:g}" if args.busy_poll_ms is not None else "") + (
        f"_cbusy{args.client_busy_poll_ms:g}" if args.client_busy_poll_ms else "") + (
        f"_s{args.sessions.replace(',', '-')}" if args.job == "replay" and args.sessions != "64,256" else "") + (
        f"_cpus{args.cloud_cpus}" if args.cloud_cpus else "") + (
        f"_eng{args.engine_cpus.replace(',', '_')}" if args.engine_cpus else "") + ("_ws" if args.ws else "") + (
        "_ahead" if args.ahead else "") + ("_late" if args.late_answers else "") + (
        f"_lp{args.light_procs}" if args.light_procs != 8 else "") + (
        "_burn" if args.burn_cpus else "") + (f"_{args.variant}" if args.job == "invariance" else "") + (
        "_exact" if args.exact else "") + (f"_{args.tag}" if args.tag else "")
    if args.exact and args.job in ("plain", "big_plain", "anchor", "invariance"):
        exact_vllm_alone(args)
    t0 = time.time()
    try:
        res = JOBS[args.job](args, work)
    except Exception as e:  # noqa: BLE001 - the job's failure is a result too
        import traceback
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    res["job_s"] = round(time.time() - t0, 1)
    import torch
    import vllm
    res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    res["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
    res["execution"] = args.execution
    res["exact"] = args.exact
    res["vllm_batch_invariant_env"] = os.environ.get("VLLM_BATCH_INVARIANT")   # as the job left it (make_backend sets it)
    res["light_procs"] = args.light_procs
    res["attention_backend"] = args.attention
    res["pad_drafts"] = not args.no_pad
    res["frontends"] = args.frontends
    res["gather_ms"] = args.gather_ms
    res["busy_poll_ms"] = args.busy_poll_ms
    res["client_busy_poll_ms"] = args.client_busy_poll_ms
    res["cloud_cpus"], res["client_cpus"] = args.cloud_cpus, args.client_cpus
    res["engine_cpus"], res["burn_cpus"], res["early_answers"] = args.engine_cpus, args.burn_cpus, not args.late_answers
    (Path(args.out) / f"job_{name}.json").write_text(json.dumps(res, indent=1))
    (work / f"job_{name}.json").write_text(json.dumps(res, indent=1))
    log(f"job {name} done in {res['job_s']} s" + (f": ERROR {res['error']}" if "error" in res else ""))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "run", "job", "report", "report-exact"])
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--jobs", default="smoke")
    ap.add_argument("--job")
    ap.add_argument("--gguf", default="/tmp/stage/qwen/model.gguf")
    ap.add_argument("--draft-gguf", default="/tmp/stage/tandem/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    ap.add_argument("--cache", default="/tmp/tandem-cache")
    ap.add_argument("--work", default="/tmp/gpu_work")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--execution", default="graphs", choices=["eager", "graphs", "compiled"])
    ap.add_argument("--edge-procs", type=int, default=7)
    ap.add_argument("--edge-threads", type=int, default=2)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--batch-invariant", action="store_true")
    ap.add_argument("--exact", action="store_true", help="exact mode: cloud.exact=true for our cloud (make_backend "
                    "sets VLLM_BATCH_INVARIANT=1 and TRITON_ATTN); the same two settings for vLLM alone")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--no-pad", action="store_true", help="in-engine: do not pad drafts to k slots")
    ap.add_argument("--in-process", action="store_true", help="in-engine: engine thread in the HTTP process")
    ap.add_argument("--gather-ms", type=float, default=None, help="in-engine: cloud.vllm.gather_ms")
    ap.add_argument("--switch-ms", type=float, default=None, help="in-engine: cloud.vllm.switch_interval_ms")
    ap.add_argument("--attention", default=None, help="cloud.vllm.attention_backend (e.g. TRITON_ATTN)")
    ap.add_argument("--light-procs", type=int, default=8, help="processes for the trace-driven light clients")
    ap.add_argument("--frontends", type=int, default=None, help="in-engine: cloud.vllm.frontends (HTTP processes)")
    ap.add_argument("--busy-poll-ms", type=float, default=None, help="in-engine: cloud.vllm.busy_poll_ms")
    ap.add_argument("--client-busy-poll-ms", type=float, default=0.0,
                    help="light clients poll their sockets this long after each round instead of sleeping")
    ap.add_argument("--ws", action="store_true", help="light clients send rounds over the WebSocket channel (/v1/ws)")
    ap.add_argument("--ahead", action="store_true", help="light clients draft ahead (traces need 'guess': "
                    "ablations/trace_guesses.py)")
    ap.add_argument("--repeats", type=int, default=3, help="replay job: runs of each (ours, oracle) pair; "
                    "plain job: throughput runs per session count (the median run is the figure)")
    ap.add_argument("--sessions", default="64,256", help="replay job: session counts")
    ap.add_argument("--variant", default="default", choices=sorted(VARIANTS), help="invariance job: engine settings")
    ap.add_argument("--cloud-cpus", default=None, help="pin the cloud (engine + front ends) to these CPUs, e.g. 0-5")
    ap.add_argument("--engine-cpus", default=None, help="pin the engine process to these CPUs, the front ends off them")
    ap.add_argument("--client-cpus", default=None, help="pin the light clients to these CPUs, e.g. 6-15")
    ap.add_argument("--burn-cpus", default=None, help="replay: the oracle once more with these CPUs kept busy")
    ap.add_argument("--late-answers", action="store_true",
                    help="in-engine: cloud.vllm.early_answers off (answers after vLLM's output processing)")
    ap.add_argument("--tag", default=None, help="suffix for this run's job files (e.g. the commit)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare()
        return 0
    if args.command == "report":
        from ablations.gpu_report import report
        return report([Path(d) for d in args.dirs])
    if args.command == "report-exact":
        from ablations.gpu_report import exact_report
        return exact_report([Path(d) for d in args.dirs])
    if args.command == "job":
        return run_job(args)
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONUNBUFFERED="1")
    if args.batch_invariant:
        env["VLLM_BATCH_INVARIANT"] = "1"
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("run",)]
    passthrough = [a for i, a in enumerate(passthrough) if not (a == "--jobs" or (i and passthrough[i - 1] == "--jobs"))]
    passthrough = [a for a in passthrough if a != "--batch-invariant"]
    for job in args.jobs.split(","):
        log(f"--- job {job}")
        subprocess.run([sys.executable, "-m", "ablations.gpu_vllm", "job", "--job", job, *passthrough], env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
