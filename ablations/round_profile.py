"""Where a round's time goes on this CPU, and how well edge/draft_length.py's rate model prices it.

    flock /work/notes/measure.lock python -m ablations.round_profile --out ablations/results

Two parts, real models, one thread per model (as the `drafting` experiment runs them):
1. llama.cpp's decode of n tokens (n = 1..13) after a 400-token context, for the target and the draft:
   what one verify of a k-token draft (k + 1 positions) and one drafting step cost.
2. Edge-cloud answers (a cloud and an edge in this process, over loopback HTTP: RTT about 0), one row
   per drafting rule, draft-ahead, prompt lookup and parallel prefill off so that rounds follow one
   another: per round, its draft length k, the edge's draft ms, the cloud's compute ms, the round trip,
   and the time from the answer before to this answer (what the user waits for the round). What the
   round costs beyond drafting and the round trip is the edge's own overhead. The rate model's cost of
   a k-token round (t_first + (k - 1) t_draft + RTT + t_verify(k), from the edge's fitted figures at the end) is set
   beside what such rounds took.

Tuning split prompts (the held-out ones stay for the reports). Writes <out>/round_profile.{json,md,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from ablations.runner import _load, environment
from common.assets import model_file
from common.config import load_config
from common.llama_runtime import LlamaRunner
from common.prompts import humaneval
from common.protocol import SamplingParams
from edge.draft_length import drafting_ms

NAME = "round_profile"
ROWS = {"fixed_k4": {"switches.adaptive_draft": False, "draft.max_k": 4},
        "fixed_k8": {"switches.adaptive_draft": False, "draft.max_k": 8},
        "adaptive": {"switches.adaptive_draft": True}}
BASE = {"cloud.n_ctx": 2048, "draft.n_ctx": 2048, "cloud.n_threads": 1, "draft.n_threads": 1,
        "switches.draft_ahead": False, "switches.ngram_draft": False, "switches.parallel_prefill": False}


def decode_curve(path: Path, n_max: int = 13, repeats: int = 3) -> dict[int, float]:
    """Median ms of one llama_decode of n tokens (all of them with logits, as a verify needs) at position 400."""
    runner = LlamaRunner(path, 1024, 1)
    ctx = runner.tokenize("def fibonacci(n):\n    '''Return the n-th Fibonacci number.'''\n" * 40)[:400]
    runner.decode(ctx)
    times = defaultdict(list)
    for _ in range(repeats):
        for n in range(1, n_max + 1):
            runner.rollback(len(ctx))
            t = time.perf_counter()
            runner.decode(ctx[100:100 + n], n_logits=n)
            times[n].append((time.perf_counter() - t) * 1e3)
    return {n: round(float(np.median(v)), 1) for n, v in times.items()}


async def profile_row(overrides: dict, prompts, max_tokens: int) -> dict:
    """The rounds of each answer (the first, which carries both prefills, left out) and the edge's fitted figures."""
    from cloud.node import CloudNode
    from edge.generator import Mode
    from edge.node import EdgeNode
    cfg = load_config(overrides={**BASE, **overrides})
    cloud = await CloudNode.start(cfg, "127.0.0.1", 0)
    rounds = []
    try:
        async with EdgeNode(cfg, cloud.url) as edge:
            link_verify, calls = edge.link.verify, []

            async def verify(req):                  # the round trip as the edge's generator awaits it
                r, wall_ms = await link_verify(req)
                calls.append((len(req.draft), r.timing.compute_ms, wall_ms, time.perf_counter()))
                return r, wall_ms
            edge.link.verify = verify
            for p in prompts:
                calls.clear()
                trace = (await edge.generate(edge.encode(p.text), max_tokens, SamplingParams(), Mode.EDGE_CLOUD)).stats.trace
                for i in range(1, min(len(trace), len(calls))):   # round i: trace[i] and calls[i], one after the other
                    k, compute_ms, wall_ms, answered = calls[i]
                    rounds.append({"k": k, "committed": trace[i][2] + 1, "draft_ms": trace[i][3],
                                   "compute_ms": round(compute_ms, 2),
                                   "round_trip_ms": round(wall_ms, 2),
                                   "wait_ms": round((answered - calls[i - 1][3]) * 1e3, 2)})
            fitted = edge.drafting_stats()
            t_draft = edge.drafter.step_ms if edge.drafter.step_ms is not None else edge.drafter.first_ms
            fitted["model_cost_ms"] = {k: round(drafting_ms(k, t_draft, edge.drafter.first_ms) + (edge.link.rtt_ms or 0.0)
                                                + edge.generator.verify_cost(k), 1) for k in range(1, 13)}
            fitted["rtt_ms"] = edge.link.rtt_ms
    finally:
        await cloud.close()
    return {"rounds": rounds, "fitted": fitted}


def by_k(rounds: list[dict]) -> dict[int, dict]:
    out = {}
    for k in sorted({r["k"] for r in rounds}):
        rs = [r for r in rounds if r["k"] == k]
        med = lambda key: round(float(np.median([r[key] for r in rs])), 1)   # noqa: E731
        out[k] = {"rounds": len(rs), **{key: med(key) for key in ("draft_ms", "compute_ms", "round_trip_ms", "wait_ms")},
                  "overhead_ms": round(float(np.median([r["wait_ms"] - r["draft_ms"] - r["round_trip_ms"] for r in rs])), 1)}
    return out


def markdown(result: dict) -> str:
    m, curves = result["meta"], result["decode_ms"]
    lines = [f"# {NAME}", "", "**Where does a round's time go on this CPU, and does the rate model price it right?**", "",
             f"Command: `{m['command']}`", "", result["findings"], "",
             "**llama.cpp decode of n tokens, one thread (ms, median of 3)**", "",
             "| model | " + " | ".join(str(n) for n in curves["target"]) + " |",
             "|---|" + "---|" * len(curves["target"])]
    for name, curve in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.0f}" for v in curve.values()) + " |")
    lines += ["", "**Rounds by draft length k (medians; the first round of each answer left out)**", "",
              "| row | k | rounds | draft ms | cloud compute ms | round trip ms | user waits ms | edge overhead ms | "
              "rate model's cost ms |", "|---|---|---|---|---|---|---|---|---|"]
    for row, r in result["rows"].items():
        for k, s in r["by_k"].items():
            model = r["fitted"]["model_cost_ms"].get(str(k), r["fitted"]["model_cost_ms"].get(k))
            lines.append(f"| {row} | {k} | {s['rounds']} | {s['draft_ms']:.0f} | {s['compute_ms']:.0f} | "
                         f"{s['round_trip_ms']:.0f} | {s['wait_ms']:.0f} | {s['overhead_ms']:.0f} | {model} |")
    lines += ["", f"![{NAME}]({NAME}.png)", "", "## How it was measured", "",
              f"- Rows: " + "; ".join(f"`{k}`: {v}" for k, v in ROWS.items()) + f"; every row: {BASE}.",
              f"- {m['prompts']} HumanEval prompts of the tuning split, {m['max_tokens']} new tokens, greedy; cloud "
              "(llama_cpp backend) and edge in one process over loopback HTTP (RTT ≈ 0, no link emulator).",
              "- user waits: from the answer of the round before to this round's answer (drafting, the round trip, "
              "and the edge's own work between them); edge overhead = user waits − draft ms − round trip.",
              "- rate model's cost: edge/draft_length.py's t_first + (k − 1)·t_draft + RTT + t_verify(k), from the edge's fitted "
              "figures (`/stats` drafting) at the end of the row.",
              f"- Machine: {m['machine']}, {m['cpus']} CPUs; load {m['load_start']} at the start, {m['load_end']} at the end.",
              f"- Commit {m['commit']}, {m['date']}, {m['duration_s']} s.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, curve in result["decode_ms"].items():
        a.plot([int(n) for n in curve], list(curve.values()), "o-", label=name)
    a.set(xlabel="tokens in one llama_decode", ylabel="ms (1 thread)", title="llama.cpp decode cost on this CPU")
    a.axvline(5, color="grey", lw=0.8, ls=":")
    a.text(5.1, a.get_ylim()[1] * 0.92, "verify of k=4", color="grey", fontsize=8)
    a.grid(alpha=0.3)
    a.legend()
    colours = {"fixed_k4": "tab:blue", "fixed_k8": "tab:green", "adaptive": "tab:orange"}
    for row, r in result["rows"].items():
        ks = sorted({x["k"] for x in r["rounds"]})
        b.scatter([x["k"] + np.random.default_rng(0).uniform(-0.15, 0.15) for x in r["rounds"]],
                  [x["wait_ms"] for x in r["rounds"]], s=10, alpha=0.35, color=colours.get(row))
        cost = r["fitted"]["model_cost_ms"]
        b.plot(range(1, 13), [cost.get(str(k), cost.get(k)) for k in range(1, 13)], "--", color=colours.get(row),
               label=f"{row}: rate model's cost (k = {', '.join(map(str, ks))} drafted)")
    b.set(xlabel="draft length k", ylabel="ms per round", title="Rounds as the user waits for them (dots) and as priced")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def findings(result: dict) -> str:
    """The headline, from the figures."""
    parts = []
    for row, r in result["rows"].items():
        for k, s in r["by_k"].items():
            if s["rounds"] >= 5:
                model = r["fitted"]["model_cost_ms"].get(k, r["fitted"]["model_cost_ms"].get(str(k)))
                parts.append(f"{row} k={k}: waits {s['wait_ms']:.0f} ms, priced {model:.0f} "
                             f"({(model - s['wait_ms']) / s['wait_ms'] * 100:+.0f} %), overhead {s['overhead_ms']:.0f} ms")
    rates = "; ".join(f"{row} {r['tok_s']} tok/s at τ {r['tau']}" for row, r in result["rows"].items())
    return (f"Tokens per second over the rounds (answers' first rounds left out): {rates}.\n\n"
            "Rounds seen at least 5 times: " + "; ".join(parts) + ".")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", default="ablations/results")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    meta = environment("python -m ablations.round_profile " + " ".join(argv if argv is not None else sys.argv[1:]))
    meta.update(prompts=args.prompts, max_tokens=args.max_tokens)
    cfg = load_config()
    result = {"meta": meta, "decode_ms": {}, "rows": {}}
    bar = tqdm(total=2 + len(ROWS), desc=NAME, unit="part")
    for name in ("target", "draft"):
        result["decode_ms"][name] = decode_curve(model_file(cfg.models, name))
        bar.update()
    prompts = humaneval("tune")[:args.prompts]
    for row, over in ROWS.items():
        r = asyncio.run(profile_row(over, prompts, args.max_tokens))
        rounds = r["rounds"]
        result["rows"][row] = {**r, "by_k": by_k(rounds), "tau": round(np.mean([x["committed"] for x in rounds]), 2),
                               "tok_s": round(sum(x["committed"] for x in rounds) / sum(x["wait_ms"] for x in rounds) * 1e3, 2)}
        bar.update()
    bar.close()
    meta.update(duration_s=round(time.perf_counter() - t0, 1), load_end=_load())
    result["findings"] = findings(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import json
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{NAME}.md").write_text(markdown(result))
    plot(result, out / f"{NAME}.png")
    print(f"wrote {out / NAME}.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
