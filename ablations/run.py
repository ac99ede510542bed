"""Ablation runner: each row is the default config with some switches/keys changed, run on the same
prompts through the real edge -> HTTP -> cloud path. Writes JSON + Markdown + a plot.

  python -m ablations.run --suite cpu --prompts 20 --max-tokens 64      # the README table
  python -m ablations.run --suite switches --prompts 8                  # every ablation switch
  python -m ablations.run --suite confidence --split heldout            # strategies on held-out prompts
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cloud.node import CloudNode
from common.config import load_config
from common.prompts import dataset
from edge.generator import Mode
from edge.node import EdgeNode

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (mode, config overrides)
SUITES = {
    "cpu": {
        "edge-only (draft 0.5B alone)": (Mode.EDGE_ONLY, {}),
        "cloud-only (target 1.5B alone)": (Mode.CLOUD_ONLY, {}),
        "edge-cloud, fixed k=4": (Mode.EDGE_CLOUD, {"switches.confidence_gating": False}),
        "edge-cloud, max-prob gating (k<=4, t=0.5)": (Mode.EDGE_CLOUD, {}),
    },
    "switches": {
        "all on (default)": (None, {}),
        "confidence_gating off": (None, {"switches.confidence_gating": False}),
        "kv_cache off": (None, {"switches.kv_cache": False}),
        "draft_verify off (edge-only)": (None, {"switches.draft_verify": False}),
        "cloud_only on": (None, {"switches.cloud_only": True}),
    },
    "confidence": {
        f"{s}, t={t}": (Mode.EDGE_CLOUD, {"confidence.strategy": s, "confidence.threshold": t, "draft.max_k": 8})
        for s, t in [("max_prob", 0.5), ("entropy", 0.3), ("temperature", 0.3), ("top_k_agg", 0.8), ("ensemble", 0.5)]
    },
}

COLUMNS = [("tokens_per_s", "tok/s"), ("decode_tokens_per_s", "decode tok/s"), ("rounds_per_100_tokens", "rounds/100 tok"),
           ("acceptance_rate", "acceptance"), ("mean_accepted_length", "τ (tok/round)"),
           ("draft_ms_per_round", "draft ms/round"), ("compute_ms_per_round", "target ms/round"),
           ("overhead_ms_per_round", "overhead ms/round")]


def aggregate(results: list[dict]) -> dict:
    """Sum over prompts, then ratios (token-weighted, not a mean of per-prompt ratios)."""
    tot = {k: sum(r[k] or 0 for r in results) for k in ("tokens", "rounds", "drafted", "accepted", "total_ms")}
    ttft = [r["ttft_ms"] for r in results if r["ttft_ms"] is not None]
    rounds = tot["rounds"]
    per_round = lambda key: round(sum(r[key] * r["rounds"] for r in results if r[key] is not None) / rounds, 3) if rounds else None
    decode = [(r["tokens"] - 1, r["total_ms"] - r["ttft_ms"]) for r in results if r["ttft_ms"] is not None]
    return {
        **tot, "prompts": len(results),
        "tokens_per_s": round(tot["tokens"] / (tot["total_ms"] / 1e3), 2),
        "decode_tokens_per_s": round(sum(n for n, _ in decode) / (sum(ms for _, ms in decode) / 1e3), 2),
        "ttft_ms_p50": round(float(np.median(ttft)), 1) if ttft else None,
        "rounds_per_100_tokens": round(100 * rounds / tot["tokens"], 2) if rounds else None,
        "acceptance_rate": round(tot["accepted"] / tot["drafted"], 4) if tot["drafted"] else None,
        "mean_accepted_length": round((tot["accepted"] + rounds) / rounds, 3) if rounds else None,
        "draft_ms_per_round": per_round("draft_ms_per_round"),
        "compute_ms_per_round": per_round("compute_ms_per_round"),
        "overhead_ms_per_round": per_round("overhead_ms_per_round"),
        "errors": sum(1 for r in results if r["error"]),
    }


async def run_row(mode, overrides, prompts, max_tokens, base) -> list[dict]:
    cfg = load_config(overrides={**base, **overrides})
    needs_cloud = (mode or Mode.EDGE_CLOUD) is not Mode.EDGE_ONLY and not (
        mode is None and not cfg.switches.draft_verify and not cfg.switches.cloud_only)
    cloud = await CloudNode.start(cfg, "127.0.0.1", 0) if needs_cloud else None
    try:
        async with EdgeNode(cfg, cloud.url if cloud else None) as edge:
            out = []
            for p in tqdm(prompts, desc="  prompts", leave=False):
                res = await edge.generate(edge.encode(p.text), max_tokens, edge.sampling(0.0), mode)
                out.append({"id": p.id, **res.stats.as_dict()})
            return out
    finally:
        if cloud:
            await cloud.close()


def write_report(name: str, meta: dict, rows: dict[str, dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    fmt = lambda v: "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
    lines = [f"# Ablation: {name}", "", f"Command: `{meta['command']}`", "",
             f"{meta['prompts']} {meta['dataset']} prompts ({meta['split']}), greedy, {meta['max_tokens']} new tokens, "
             f"{meta['machine']}; {meta['when']}.", "",
             "| configuration | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for label, row in rows.items():
        agg = row["aggregate"]
        lines.append(f"| {label} | " + " | ".join(fmt(agg[k]) for k, _ in COLUMNS) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(name, rows, stem.with_suffix(".png"))
    return stem


def plot(name: str, rows: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(rows)
    agg = [rows[k]["aggregate"] for k in labels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(labels) + 2.2))
    panels = [("decode_tokens_per_s", "decode tokens/s (higher is better)"),
              ("mean_accepted_length", "τ: tokens per verify round"),
              ("overhead_ms_per_round", "non-model overhead per round (ms)")]
    for ax, (key, title) in zip(axes, panels):
        vals = [a[key] or 0 for a in agg]
        bars = ax.barh(labels, vals, color=["#4C72B0" if v else "#cccccc" for v in vals])
        ax.bar_label(bars, labels=[f"{v:.2f}" if v else "n/a" for v in vals], padding=3, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.margins(x=0.25)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"Tandem ablation: {name}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=list(SUITES), default="cpu")
    ap.add_argument("--dataset", choices=["humaneval", "mtbench"], default="humaneval")
    ap.add_argument("--split", choices=["all", "tune", "heldout"], default="all")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--name", default=None, help="report file stem (default: SUITE)")
    args = ap.parse_args(argv)
    prompts = dataset(args.dataset, args.split)[:args.prompts]
    base = {"cloud.n_ctx": 2048, "draft.n_ctx": 2048}
    rows = {}
    for label, (mode, overrides) in SUITES[args.suite].items():
        print(f"== {label}", file=sys.stderr)
        t0 = time.time()
        per_prompt = asyncio.run(run_row(mode, overrides, prompts, args.max_tokens, base))
        rows[label] = {"mode": mode.value if mode else None, "overrides": overrides,
                       "aggregate": aggregate(per_prompt), "per_prompt": per_prompt}
        print(f"   {rows[label]['aggregate']} ({time.time() - t0:.0f} s)", file=sys.stderr)
    meta = {"command": "python -m ablations.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "dataset": args.dataset, "split": args.split, "prompts": len(prompts), "max_tokens": args.max_tokens,
            "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores, llama.cpp (CPU) for both models",
            "when": time.strftime("%Y-%m-%d")}
    stem = write_report(args.name or args.suite, meta, rows)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
