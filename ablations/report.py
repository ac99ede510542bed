"""An experiment's result (its JSON) -> Markdown and plots.

  python -m ablations report rtt_sweep --out ablations/results     # re-render rtt_sweep.{md,png}

The JSON is the record (ablations/runner.py writes it); the Markdown and the PNG are drawn from it
alone, so they can be re-drawn at any time without running anything.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

LABELS = {
    "per_user_tok_s": "tok/s per user", "ttft_ms_p50": "TTFT p50 (ms)", "ttft_ms_p99": "TTFT p99 (ms)",
    "tpot_ms_p50": "TPOT p50 (ms)", "tpot_ms_p99": "TPOT p99 (ms)", "itl_ms_p50": "ITL p50 (ms)",
    "e2el_ms_p50": "E2EL p50 (ms)", "output_throughput": "output tok/s", "tau": "τ (tok/round)",
    "acceptance": "acceptance", "rounds_per_100_tokens": "rounds/100 tok",
    "compute_ms_per_token": "cloud compute ms/tok", "draft_ms_per_round": "draft ms/round",
    "verify_ms_p50": "verify ms p50", "bound_round_ms": "bound: ms/round", "bound_tok_s": "bound: tok/s",
    "bound_tpot_ms": "bound: TPOT (ms)", "completed": "completed", "failed": "failed",
}
BOUND_OF = {"per_user_tok_s": "bound_tok_s", "tpot_ms_p50": "bound_tpot_ms"}
MODE_COLORS = {"edge_cloud": "#4C72B0", "cloud_only": "#DD8452", "edge_only": "#55A868", "local_target": "#C44E52"}
DATASET_STYLES = ["-", "--", ":", "-."]
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974"]


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _rtt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:g} ms"


def _has_vs_rtt(result: dict) -> bool:
    return any(p.get("kind") == "vs_rtt" for p in result["experiment"].get("plots", [])) and \
        len({r.get("rtt_ms") for r in result["rows"]}) > 1


def _flat_table(rows: list[dict], metrics: list[str]) -> list[str]:
    head = ["row", "mode", "link", "dataset", *[LABELS.get(m, m) for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"], r["mode"], "none (no cloud)" if r.get("measured_once") else r.get("link") or "–", r["dataset"]]
        lines.append("| " + " | ".join(cells + [fmt(r.get(m)) for m in metrics]) + " |")
    return lines


def _pivot_tables(rows: list[dict], metrics: list[str]) -> list[str]:
    """One table per metric: (row, dataset) down, link RTT across."""
    rtts = sorted({r["rtt_ms"] for r in rows if r.get("rtt_ms") is not None})
    by = defaultdict(dict)
    for r in rows:
        by[(r["row"], r["dataset"])][r.get("rtt_ms")] = r
    out = []
    for m in metrics:
        out += [f"**{LABELS.get(m, m)}**", "", "| row | dataset | " + " | ".join(_rtt(x) for x in rtts) + " |",
                "|---|---|" + "---|" * len(rtts)]
        for (row, ds), cells in by.items():
            if all(c.get(m) is None for c in cells.values()):
                continue
            out.append(f"| {row} | {ds} | " + " | ".join(fmt(cells.get(x, {}).get(m)) for x in rtts) + " |")
        out.append("")
    return out


def markdown(result: dict) -> str:
    meta, exp, rows = result["meta"], result["experiment"], result["rows"]
    w = exp["workload"]
    lines = [f"# {exp['name']}", "", f"**{exp['question']}**", "", f"Command: `{meta['command']}`", ""]
    lines += [meta.get("real", ""), ""]
    failed = [c for c in result.get("cells", []) if c.get("error")]
    if failed:
        lines += [f"**{len(failed)} of {len(result['cells'])} cells failed**: " +
                  "; ".join(f"{c['row']} @ {c.get('link') or 'no link'}: {c['error'].splitlines()[0]}" for c in failed), ""]
    lossy = [r for r in rows if r.get("failed")]
    if lossy:
        lines += ["**Failed requests**: " + "; ".join(f"{r['row']} @ {r.get('link') or 'no link'} {r['dataset']}: "
                                                      f"{r['failed']}" for r in lossy) + " (see the JSON's errors)", ""]
    metrics = exp.get("table") or ["per_user_tok_s", "ttft_ms_p50", "tpot_ms_p50", "tau"]
    if _has_vs_rtt(result):
        lines += _pivot_tables(rows, metrics)
    else:
        lines += _flat_table(rows, metrics) + [""]
    same = defaultdict(lambda: [0, 0])
    for r in rows:
        if r.get("same_text_as_cloud_only"):
            same[r["row"]][0] += r["same_text_as_cloud_only"][0]
            same[r["row"]][1] += r["same_text_as_cloud_only"][1]
    if same:
        lines += ["Greedy answers with the same text as the target alone's (the cloud_only row's, same link, "
                  "dataset and prompt): " + "; ".join(f"{k} {a}/{b}" for k, (a, b) in same.items()) + ".", ""]
    if meta.get("png"):
        lines += [f"![{exp['name']}]({meta['png']})", ""]
    if exp.get("notes"):
        lines += [exp["notes"].strip(), ""]
    once = sorted({r["row"] for r in rows if r.get("measured_once")})
    goodput = f", goodput SLOs {' '.join(w['goodput'])}" if w.get("goodput") else ""
    users = "one request at a time" if w.get("max_concurrency") == 1 else f"max concurrency {w.get('max_concurrency')}"
    lines += ["## How it was measured", "",
              f"- Workload: {w['num_prompts']} {w['split']} prompts from each of {', '.join(w['datasets'])}, "
              f"{w['max_tokens']} new tokens at most, temperature {w['temperature']}, {users}"
              f", request rate {w['request_rate']}/s (burstiness {w['burstiness']}){goodput}; "
              f"{'one unmeasured warm-up request per cell; ' if w.get('warmup') else ''}"
              f"{exp['repeats']} repeat(s) (figures are the mean over repeats).",
              f"- Links: {', '.join(exp['links'])} (ablations/linkemu.py, a user-space proxy between edge and cloud"
              + (f"; its calibration: {meta['linkemu_calibration']}" if meta.get("linkemu_calibration") else "") + ").",
              ]
    if once:
        lines.append(f"- {', '.join(once)}: no cloud, so no link; measured once and shown at every link.")
    lines += ["- Matrix: " + "; ".join(f"`{k}`: " + (", ".join(f"{a}={json.dumps(b)}" for a, b in v.items()) or "defaults")
                                        for k, v in exp["matrix"].items())
              + (f"; every row: {', '.join(f'{a}={json.dumps(b)}' for a, b in exp['base'].items())}" if exp.get("base") else ""),
              "- Definitions (as `vllm bench serve`): TTFT from the request's send to its first token; TPOT = "
              "(E2EL − TTFT) / (output tokens − 1) per request; tok/s per user = output tokens / E2EL per request "
              "(median over requests); τ = tokens committed per verify round (accepted drafts + the target's "
              "token). Bound (edge_cloud only), per request from its own figures: every round costs at least "
              "k·t_draft + RTT + t_verify (the edge's draft ms of the round, its KV sync included; the link's RTT; "
              "the cloud's compute ms of the round), one after the other, so tok/s ≤ tokens / Σ rounds' cost and "
              "TPOT ≥ (Σ rounds' cost − TTFT) / (tokens − 1); shown as medians over requests, beside the measured "
              "medians. `bound: ms/round` is the mean round's k·t_draft + RTT + t_verify.",
              f"- Machine: {meta['machine']}, {meta['cpus']} CPUs; load average {meta.get('load_start')} at the start, "
              f"{meta.get('load_end')} at the end (other work shares this machine).",
              f"- Commit {meta['commit']}, {meta['date']}, {fmt(meta.get('duration_s'))} s in all; "
              + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()) + ".",
              f"- Per-cell figures and the servers' /stats are in the JSON beside this file, each benchmark's "
              f"output in {result['experiment']['name']}-logs.tar.gz (<cell>/bench_<dataset>.json)"
              + (f"; the rows were derived again from them by `{meta['rows_derived_by']['command']}` (commit "
                 f"{meta['rows_derived_by']['commit']})" if meta.get("rows_derived_by") else "") + ".", ""]
    return "\n".join(lines)


def _series(rows: list[dict], key) -> dict:
    out = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return out


COLS = {"bars": 4, "vs_rtt": 2}     # panels per figure row


def plot(result: dict, path: Path) -> Optional[Path]:
    """Draw the experiment's `plots`: each spec's metrics as panels, up to COLS[kind] a row."""
    specs = result["experiment"].get("plots") or []
    rows = [r for r in result["rows"] if not r.get("error")]
    if not specs or not rows:
        return None
    try:
        import matplotlib
    except ImportError:                  # a machine without it (the GPU device): `report NAME` draws it elsewhere
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r["row"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    panel_rows = []                                   # [(spec, [metrics of this figure row])]
    for spec in specs:
        n = COLS[spec["kind"]]
        panel_rows += [(spec, spec["metrics"][i:i + n]) for i in range(0, len(spec["metrics"]), n)]
    ncols = max(len(m) for _, m in panel_rows)
    bar_h = max(2.8, 0.45 * len(labels) * len(datasets) + 1.2)
    height = [bar_h if spec["kind"] == "bars" else 3.8 for spec, _ in panel_rows]
    width = 4.3 if ncols > 2 else 6.5
    fig, axes = plt.subplots(len(panel_rows), ncols, figsize=(width * ncols, sum(height) + 1.4), squeeze=False,
                             gridspec_kw={"height_ratios": height})
    legend = {}
    for i, (spec, metrics) in enumerate(panel_rows):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(metrics):
                ax.axis("off")
                continue
            if spec["kind"] == "bars":
                _bars(ax, rows, labels, datasets, metrics[j])
            else:
                _vs_rtt(ax, rows, labels, datasets, metrics[j], spec.get("bound", False))
                for h, name in zip(*ax.get_legend_handles_labels()):
                    legend.setdefault(name, h)
            ax.set_title(LABELS.get(metrics[j], metrics[j]), fontsize=10)
    w = result["experiment"]["workload"]
    fig.suptitle(f"{result['experiment']['name']}: {result['experiment']['question']}\n"
                 f"{w['num_prompts']} held-out prompts per dataset, {w['max_tokens']} tokens, one user at a time; "
                 f"{result['meta']['machine']}", fontsize=10)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, len(legend)), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.07 if legend else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, rows, labels, datasets, metric) -> None:
    import numpy as np
    height = 0.8 / len(datasets)
    y = np.arange(len(labels))
    for k, ds in enumerate(datasets):
        vals = []
        for label in labels:
            r = next((r for r in rows if r["row"] == label and r["dataset"] == ds), {})
            vals.append(r.get(metric))
        bars = ax.barh(y + k * height, [v or 0 for v in vals], height, label=ds, color=PALETTE[k % len(PALETTE)])
        ax.bar_label(bars, labels=[fmt(v) if v is not None else "n/a" for v in vals], padding=2, fontsize=7)
    ax.set_yticks(y + height * (len(datasets) - 1) / 2, labels, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _vs_rtt(ax, rows, labels, datasets, metric, bound) -> None:
    for li, label in enumerate(labels):
        for k, ds in enumerate(datasets):
            pts = sorted((r["rtt_ms"], r.get(metric), r.get(BOUND_OF.get(metric, ""), None), r["mode"])
                         for r in rows if r["row"] == label and r["dataset"] == ds and r.get("rtt_ms") is not None)
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            color = MODE_COLORS.get(pts[0][3], PALETTE[li % len(PALETTE)]) if len(labels) <= len(MODE_COLORS) else PALETTE[li % len(PALETTE)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], DATASET_STYLES[k % 4], marker="o", ms=3.5,
                    color=color, label=f"{label} ({ds})")
            if bound and metric in BOUND_OF and all(p[2] is not None for p in pts):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], DATASET_STYLES[k % 4], color=color, alpha=0.3,
                        lw=5, label="per-round bound k·t_draft + RTT + t_verify (pale, wide)" if k == 0 else
                        "_bound")
    rtts = sorted({r["rtt_ms"] for r in rows if r.get("rtt_ms") is not None})
    ax.set_xscale("log")
    ax.set_xticks(rtts, [f"{x:g}" for x in rtts])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("link RTT (ms)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def render(result: dict, out: Path) -> list[Path]:
    """Write <name>.md and <name>.png into `out` from the result dict."""
    out.mkdir(parents=True, exist_ok=True)
    name = result["experiment"]["name"]
    png = plot(result, out / f"{name}.png")
    result["meta"]["png"] = png.name if png else None
    md = out / f"{name}.md"
    md.write_text(markdown(result))
    return [md] + ([png] if png else [])


def write(result: dict, out: Path) -> list[Path]:
    """The JSON (the record) and what is drawn from it."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{result['experiment']['name']}.json"
    files = render(result, out)
    js.write_text(dumps(result))
    return [js] + files


def dumps(result: dict) -> str:
    """Strict JSON; meta, experiment and rows indented to read, the raw cells one line each (compact)."""
    result = _finite(result)
    enc = lambda v, indent=None: json.dumps(v, indent=indent, default=str, allow_nan=False)
    parts = []
    for key, value in result.items():
        if key == "cells":
            value = [_without_bench(c) for c in value]
            body = "[\n" + ",\n".join("  " + enc(c) for c in value) + "\n ]" if value else "[]"
        else:
            body = enc(value, 1).replace("\n", "\n ")
        parts.append(f" {enc(key)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _without_bench(cell: dict) -> dict:
    """A cell as the JSON keeps it: its figures and /stats, not the benchmark's output (the logs archive
    beside the JSON keeps that whole: <cell>/bench_<dataset>.json; runner.attach_bench reads it back)."""
    if not isinstance(cell, dict) or not isinstance(cell.get("datasets"), dict):
        return cell
    return {**cell, "datasets": {ds: {k: v for k, v in d.items() if k != "bench"} if isinstance(d, dict) else d
                                 for ds, d in cell["datasets"].items()}}


def _finite(obj):
    """Strict JSON: an infinite float (request_rate inf) is written as the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def load(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no result file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    for key in ("meta", "experiment", "rows"):
        if key not in result:
            raise ValueError(f"{path}: not an experiment result (no '{key}')")
    return result
