"""What the network-aware prompt (switches.network_context_prompt) does to answer length, per user RTT class.

    flock /work/notes/measure.lock python -m ablations.network_context --out ablations/results

One real edge (`start_edge.py`, llama.cpp) per switch setting, started as a process as the experiment
runner starts it, in edge-only mode (switches.draft_verify=false): what is measured is how many tokens
the model answers with, not how fast, and with greedy decoding Tandem's edge-cloud answer is the
target's own, so `--model target` (the edge runs the target GGUF alone) gives the length a Tandem user
gets; `--model draft` the draft model's (an edge-only user's). The clients are ablations/bench.py
streaming the edge's OpenAI API; every user sends `X-Client-RTT` with its class's RTT (the header only
tells the edge the RTT: no delay is emulated, since length, not latency, is measured). The same
held-out MT-Bench prompts (open-ended: length can change) go to every class, switch off and on.

Writes <out>/network_context.{json,md,png}: completion tokens per (switch, RTT class): mean, median,
how many answers hit max_tokens; and per prompt the length with the switch on over off.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ablations.bench import BenchRequest, load_requests, run_benchmark
from ablations.processes import Stack, start_edge
from ablations.runner import START_TIMEOUT_S, _load, environment
from common.config import load_config
from edge.network_context import SYSTEM_INSTRUCTION, network_block, status_word

NAME = "network_context"


def run(rtts: list[float], num_prompts: int, max_tokens: int, model: str, concurrency: int, out: Path,
        command: str, name: str = NAME) -> dict:
    base = load_requests("mtbench", num_prompts, "heldout", max_tokens, seed=0)
    cfg = load_config()
    gguf = cfg.models.target if model == "target" else cfg.models.draft
    set_args = ["--set", "switches.draft_verify=false", "--set", f"models.draft={gguf}",
                "--set", "draft.n_ctx=2048", "--set", f"edge.max_sessions={concurrency}",
                "--set", "draft.n_threads=1"]   # one thread: spinning barriers on a shared 2-core box cost far more
    meta = environment(command)
    meta["real"] = (f"One edge process (start_edge.py, llama.cpp, {gguf}) per switch setting, edge-only; the "
                    f"clients were ablations/bench.py streaming /v1/chat/completions over loopback HTTP, each "
                    f"sending X-Client-RTT with its class's RTT (no delay emulated: answer length is measured, "
                    f"not speed). Greedy decoding.")
    result = {"meta": meta, "config": {"name": name, "rtts_ms": rtts, "num_prompts": num_prompts, "max_tokens": max_tokens,
                                       "model": model, "gguf": gguf, "dataset": "mtbench (held-out split)",
                                       "max_concurrency": concurrency, "temperature": 0.0,
                                       "system_instruction": SYSTEM_INSTRUCTION,
                                       "blocks": {str(r): network_block(r) for r in rtts}},
              "requests": [], "rows": []}
    t0 = time.perf_counter()
    for switch in (False, True):
        reqs, rtt_of = [], {}
        # off, the prompt does not depend on the RTT (byte for byte: tests/test_network_context.py), so
        # each prompt runs once (with the first class's header) and stands for every class
        for rtt in rtts if switch else rtts[:1]:
            for p in base:
                rid = f"{p.id}@{rtt:g}ms"
                rtt_of[rid] = rtt
                reqs.append(BenchRequest(prompt=p.prompt, id=rid, dataset="mtbench", max_tokens=max_tokens,
                                         rtt_class=f"rtt_{rtt:g}ms"))
        log_dir = Path("/tmp") / f"{name}-logs" / f"switch_{'on' if switch else 'off'}"
        with Stack(log_dir) as stack:
            edge = start_edge(stack, None, set_args + ["--set", f"switches.network_context_prompt={str(switch).lower()}"],
                              START_TIMEOUT_S)
            load = _load()
            bench = asyncio.run(run_benchmark(
                edge.url, reqs, max_concurrency=concurrency, temperature=0.0, seed=0,
                headers_for=lambda r: {"X-Client-RTT": f"{rtt_of[r.id]:g}"}, progress=True))
        finishes = {r["id"]: r.get("finish_reason") for r in (bench.get("tandem") or {}).get("requests") or []}
        for i, r in enumerate(reqs):
            result["requests"].append({
                "switch": switch, "rtt_ms": rtt_of[r.id], "prompt_id": r.id.split("@")[0], "id": r.id,
                "completion_tokens": bench["output_lens"][i], "finish_reason": finishes.get(r.id),
                "error": bench["errors"][i] or None, "text": bench["generated_texts"][i]})
        result["meta"].setdefault("load_at_start", {})["on" if switch else "off"] = load
        result["meta"].setdefault("bench_duration_s", {})["on" if switch else "off"] = round(bench["duration"], 1)
        result["meta"]["duration_s"] = round(time.perf_counter() - t0, 1)
        result["meta"]["load_end"] = _load()
        result["meta"]["complete"] = switch
        result["rows"] = rows(result["requests"], rtts, max_tokens)
        write(result, out)             # after each setting: an interrupted run keeps what it measured
    return result


def rows(requests: list[dict], rtts: list[float], max_tokens: int) -> list[dict]:
    """Per (switch, RTT class); off was run once per prompt and stands for every class (rtt_ms None)."""
    out = []
    off = {r["prompt_id"]: r["completion_tokens"] for r in requests if not r["switch"] and not r["error"]}
    for switch in (False, True):
        for rtt in rtts if switch else [None]:
            mine = [r for r in requests if r["switch"] == switch and (rtt is None or r["rtt_ms"] == rtt)]
            rs = [r for r in mine if not r["error"]]
            n = [r["completion_tokens"] for r in rs]
            ratio = [r["completion_tokens"] / off[r["prompt_id"]] for r in rs if switch and off.get(r["prompt_id"])]
            out.append({"switch": "on" if switch else "off", "rtt_ms": rtt,
                        "status": status_word(rtt) if rtt is not None else "(no block)",
                        "answers": len(n), "failed": len(mine) - len(rs),
                        "mean_completion_tokens": round(float(np.mean(n)), 1) if n else None,
                        "median_completion_tokens": float(np.median(n)) if n else None,
                        "at_max_tokens": sum(1 for r in rs if r["completion_tokens"] >= max_tokens),
                        "median_ratio_on_off": round(float(np.median(ratio)), 3) if switch and ratio else None})
    return out


def write(result: dict, out: Path) -> None:
    name = result["config"].get("name", NAME)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    c, m = result["config"], result["meta"]
    lines = [f"# {name}: what the network-aware prompt does to answer length per user RTT class", "",
             f"`{m['command']}` at commit {m['commit']}, {m['date']}, {m['machine']}; load average at start "
             f"{m.get('load_at_start')}, at end {m.get('load_end')}; {m.get('duration_s')} s.", "",
             m["real"], "", *([m["note"], ""] if m.get("note") else []),
             f"{c['num_prompts']} held-out MT-Bench prompts, the same ones for every class, max_tokens "
             f"{c['max_tokens']}, model {c['gguf']} ({c['model']}), up to {c['max_concurrency']} requests at once.", "",
             "| switch | user RTT (ms) | status | answers | mean tokens | median tokens | at max_tokens | median on/off per prompt |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rtt = "any" if r["rtt_ms"] is None else f"{r['rtt_ms']:g}"
        lines.append(f"| {r['switch']} | {rtt} | {r['status']} | {r['answers']} | {r['mean_completion_tokens']} "
                     f"| {r['median_completion_tokens']} | {r['at_max_tokens']} | {r['median_ratio_on_off'] or '-'} |")
    if result.get("findings"):
        lines += ["", "**What it shows.** " + result["findings"]]
    lines += ["", "Switch off, the prompt does not depend on the RTT (tests/test_network_context.py: byte for byte), so "
              "each prompt ran once and its answer stands for every class. 'median on/off per prompt': each "
              "prompt's answer length with the switch on over its length off, the median over prompts. Answers "
              "that hit max_tokens are cut there, so a mean over them understates the length off.",
              "", f"The system instruction (first in every prompt, the same bytes for every user):", "",
              f"> {c['system_instruction']}", "", f"![answer length per RTT class]({name}.png)", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    _plot(result, out / f"{name}.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rtts = result["config"]["rtts_ms"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(rtts))
    for j, sw in enumerate(("off", "on")):
        rs = {r["rtt_ms"]: r for r in result["rows"] if r["switch"] == sw}
        if sw == "off" and None in rs:
            rs = {t: rs[None] for t in rtts}            # run once, stands for every class
        ax.bar(x + (j - 0.5) * 0.38, [(rs.get(t) or {}).get("mean_completion_tokens") or 0 for t in rtts], 0.36,
               label=f"network_context_prompt {sw} (mean)")
        ax.plot(x + (j - 0.5) * 0.38, [(rs.get(t) or {}).get("median_completion_tokens") or 0 for t in rtts], "k_", ms=14,
                label="median" if j else None)
    ax.set_xticks(x, [f"{t:g} ms\n{status_word(t)}" for t in rtts])
    ax.set_xlabel("user RTT (X-Client-RTT)")
    ax.set_ylabel("completion tokens")
    ax.axhline(result["config"]["max_tokens"], color="grey", lw=0.8, ls=":")
    ax.set_title(f"Answer length, {result['config']['num_prompts']} MT-Bench prompts, {result['config']['model']} model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtts", default="20,200,700", help="user RTT classes, ms (default 20,200,700)")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--model", choices=("draft", "target"), default="target",
                    help="the GGUF the edge answers with alone (target: the answer Tandem gives, greedy)")
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/tandem-results"))
    ap.add_argument("--name", default=NAME, help=f"the report's file name (default {NAME})")
    args = ap.parse_args(argv)
    rtts = [float(x) for x in args.rtts.split(",") if x.strip()]
    command = "python -m ablations.network_context " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(rtts, args.num_prompts, args.max_tokens, args.model, args.max_concurrency, args.out, command,
                 args.name)
    print((args.out / f"{args.name}.md").read_text())
    return 0 if not any(r["error"] for r in result["requests"]) else 1


if __name__ == "__main__":
    sys.exit(main())
