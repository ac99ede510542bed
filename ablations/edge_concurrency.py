"""How the edge serves several users at once: batched drafting against one draft at a time.

  python -m ablations.edge_concurrency --out ablations/results

Edge and an embedded CPU cloud (llama.cpp, one round at a time) on this machine, greedy. For 1, 2, 4
and 8 concurrent users, each user asks one HumanEval and one MT-Bench prompt (different prompts per
user), with `switches.batched_drafting` on (continuous batching: one llama_decode per step for every
drafting session) and off (one session's draft at a time). Writes edge_concurrency.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import asyncio
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cloud.node import CloudNode
from common.config import load_config
from common.prompts import humaneval, mtbench
from edge.generator import Mode
from edge.node import EdgeNode

USERS = (1, 2, 4, 8)


async def cell(edge, prompts, users: int, max_tokens: int) -> dict:
    """`users` users at once, each with its own prompt; returns the cell's figures."""
    t0 = time.perf_counter()
    steps0, drafted0 = edge.drafter.steps, edge.drafter.batched_tokens
    results = await asyncio.gather(*(edge.generate(edge.encode(p.text), max_tokens, edge.sampling(0.0),
                                                   Mode.EDGE_CLOUD) for p in prompts[:users]))
    wall = time.perf_counter() - t0
    stats = [r.stats.as_dict() for r in results]
    assert not any(s["error"] for s in stats), [s["error"] for s in stats]
    tokens = sum(s["tokens"] for s in stats)
    drafted = sum(s["drafted"] for s in stats)
    steps = edge.drafter.steps - steps0
    return {"users": users, "tokens": tokens, "wall_s": round(wall, 2),
            "aggregate_tok_s": round(tokens / wall, 2),
            "per_user_tok_s": round(float(np.mean([s["tokens_per_s"] for s in stats])), 2),
            "ttft_ms_p50": round(float(np.median([s["ttft_ms"] for s in stats])), 1),
            "draft_tok_s": round(drafted / wall, 2),
            "tokens_per_decode_step": round((edge.drafter.batched_tokens - drafted0) / max(steps, 1), 2),
            "tau": round(float(np.mean([s["mean_accepted_length"] for s in stats])), 2)}


async def sweep(batched: bool, max_tokens: int, datasets: dict) -> list[dict]:
    # one llama.cpp thread per model: the edge drafts while the cloud verifies, and two all-core thread
    # pools on 2 cores spin against each other (llama.cpp's barriers busy-wait)
    cfg = load_config(overrides={"switches.batched_drafting": batched, "edge.max_sessions": max(USERS),
                                 "draft.n_ctx": 1024, "cloud.n_ctx": 1024, "cloud.n_seq": max(USERS),
                                 "draft.n_threads": 1, "cloud.n_threads": 1, "edge.request_timeout_s": 600})
    cloud = await CloudNode.start(cfg, "127.0.0.1", 0)
    rows = []
    try:
        async with EdgeNode(cfg, cloud.url) as edge:
            await edge.generate(edge.encode("Hi"), 4, edge.sampling(0.0), Mode.EDGE_CLOUD)     # warm-up
            for users in tqdm(USERS, desc=f"batched={batched}"):
                for name, prompts in datasets.items():
                    rows.append({"batched": batched, "dataset": name, **await cell(edge, prompts, users, max_tokens)})
    finally:
        await cloud.close()
    return rows


def report(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # one row per (users, batched): the two datasets' cells summed (tokens, wall) or averaged (per user)
    merged = []
    for batched in (True, False):
        for users in USERS:
            cells = [r for r in rows if r["batched"] == batched and r["users"] == users]
            merged.append({"users": users, "batched": batched,
                           "aggregate_tok_s": round(sum(c["tokens"] for c in cells) / sum(c["wall_s"] for c in cells), 2),
                           "per_user_tok_s": round(float(np.mean([c["per_user_tok_s"] for c in cells])), 2),
                           "ttft_ms_p50": round(float(np.median([c["ttft_ms_p50"] for c in cells])), 1),
                           "draft_tok_s": round(float(np.mean([c["draft_tok_s"] for c in cells])), 2),
                           "tokens_per_decode_step": round(float(np.mean([c["tokens_per_decode_step"] for c in cells])), 2),
                           "tau": round(float(np.mean([c["tau"] for c in cells])), 2)})
    (out / "edge_concurrency.json").write_text(json.dumps({"meta": meta, "rows": merged, "cells": rows}, indent=1))
    cols = ["users", "batched", "aggregate_tok_s", "per_user_tok_s", "ttft_ms_p50", "draft_tok_s",
            "tokens_per_decode_step", "tau"]
    lines = ["# Edge concurrency: batched drafting vs one draft at a time", "",
             f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['machine']}, {meta['date']}; load average "
             f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after).", "",
             f"Edge and an embedded CPU cloud (llama.cpp target, one round at a time) on the same "
             f"{meta['cpus']} CPUs (one llama.cpp thread each), greedy, {meta['max_tokens']} new tokens; each user asks one HumanEval and one "
             "MT-Bench prompt. Rows average the two datasets (aggregate tok/s: all tokens over all wall time).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in merged]
    (out / "edge_concurrency.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for batched, style in ((True, "o-"), (False, "s--")):
        sel = [r for r in merged if r["batched"] == batched]
        label = "batched drafting" if batched else "one draft at a time"
        for ax, (key, title) in zip(axes, (("aggregate_tok_s", "all users: tokens/s"), ("per_user_tok_s", "per user: tokens/s"),
                                           ("ttft_ms_p50", "time to first token, p50 (ms)"))):
            ax.plot([r["users"] for r in sel], [r[key] for r in sel], style, label=label)
            ax.set_xlabel("concurrent users")
            ax.set_xscale("log", base=2)
            ax.set_title(title)
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Tandem edge + embedded CPU cloud on {meta['cpus']} CPUs, greedy (load average "
                 f"{meta['load_before'][0]:.1f}-{meta['load_after'][0]:.1f}: other jobs shared the machine)")
    fig.tight_layout()
    fig.savefig(out / "edge_concurrency.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for edge_concurrency.{json,md,png}")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    datasets = {"humaneval": humaneval("heldout")[:max(USERS)], "mtbench": mtbench("heldout")[:max(USERS)]}
    rows, load_before = [], os.getloadavg()
    for batched in (True, False):
        rows += asyncio.run(sweep(batched, args.max_tokens, datasets))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python -m ablations.edge_concurrency " + " ".join(argv or sys.argv[1:]), "commit": commit,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": len(os.sched_getaffinity(0)),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "max_tokens": args.max_tokens,
            "load_before": load_before, "load_after": os.getloadavg()}
    report(rows, meta, Path(args.out))
    print(f"wrote {args.out}/edge_concurrency.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
