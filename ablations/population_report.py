"""Reports of the population and goodput experiments (ablations/population.py): <name>.json, .md, .png."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ablations.bench import RTT_CLASS_BOUNDS_MS, RTT_CLASSES

POLICY_COLORS = {"fifo": "#1f77b4", "health": "#d62728"}
MORE_COLORS = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


def _color(policy: str, order: list[str]):
    extra = [p for p in order if p not in POLICY_COLORS]
    return POLICY_COLORS.get(policy) or MORE_COLORS[extra.index(policy) % len(MORE_COLORS)]


def _num(v, fmt="{:.0f}"):
    return "—" if v is None else fmt.format(v)


def _strict(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_strict(v) for v in x]
    return x


def write(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = result["experiment"]["name"]
    kind = result["experiment"]["kind"]
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(_strict(result), allow_nan=False, separators=(",", ":")))
    paths[1].write_text(population_md(result) if kind == "population" else goodput_md(result))
    png = out / f"{name}.png"
    try:
        (population_png if kind == "population" else goodput_png)(result, png)
        paths.append(png)
    except Exception as e:  # noqa: BLE001 - a plot that fails must not lose the JSON/MD
        print(f"plot failed: {type(e).__name__}: {e}")
    return paths


def _bounds_text() -> str:
    parts, lo = [], 0.0
    for name, hi in RTT_CLASS_BOUNDS_MS:
        parts.append(f"{name} {lo:g}–{hi:g} ms" if math.isfinite(hi) else f"{name} ≥ {lo:g} ms")
        lo = hi
    return ", ".join(parts)


def _meta_lines(result: dict) -> list[str]:
    m = result["meta"]
    return [f"- Command: `{m.get('command')}` (commit {m.get('commit')}, {m.get('date')}, {m.get('duration_s')} s)",
            f"- Machine: {m.get('machine')}, {m.get('cpus')} CPUs; load average at start {m.get('load_start')}, "
            f"at end {m.get('load_end')}",
            f"- {m.get('real')}", ""]


# ---- population ----------------------------------------------------------------------------------------
def population_md(result: dict) -> str:
    exp, pol = result["experiment"], result.get("policies", {})
    w = exp["population"]
    lines = [f"# {exp['name']}", "", exp["question"], ""]
    if exp.get("device_command"):
        lines += ["Device command:", "", "```", exp["device_command"].strip(), "```", ""]
    lines += _meta_lines(result)
    lines += [f"{w['users']} users, Poisson arrivals at {w['request_rate']:g}/s (seed {w['seed']}), each asking one held-out "
              f"prompt for {w['max_tokens']} tokens; RTTs from seed 000's mixture (50 % N(20,10), 40 % N(200,30), "
              f"9 % N(700,80), 1 % N(2000,400) ms, clipped at 1 ms), the same arrivals and user → RTT assignment "
              f"under both policies. RTT classes: {_bounds_text()}.", ""]
    if "worst_class_slowdown" in result:
        d = result.get("worst_class_slowdown_detail") or {}
        lines += [f"**Worst class slowdown** (p99 TPOT under health priority ÷ under FIFO, the largest over the classes): "
                  f"**{_num(result['worst_class_slowdown'], '{:.2f}')}** ({d.get('class')}); per class: "
                  + ", ".join(f"{c} {v:.2f}" for c, v in (d.get("per_class") or {}).items()), ""]
    for label, d in (result.get("slowdown_vs_fifo") or {}).items():
        if label != "health" or d.get("versus", "fifo") != "fifo":
            row = exp["matrix"][label]
            what = [f"{k}={v}" for k, v in row["overrides"].items()]
            what += [f"replayed {k}={v}" for k in ("parallel_prefill", "draft_ahead") if (v := row.get(k)) is not None]
            ratio = d.get("effective_tok_s_ratio")
            lines += [f"Policy {label} ({', '.join(what)}): worst class slowdown vs {d.get('versus', 'fifo')} "
                      f"**{_num(d.get('value'), '{:.2f}')}** ({d.get('class')}); per class: "
                      + ", ".join(f"{c} {v:.2f}" for c, v in (d.get("per_class") or {}).items())
                      + (f"; effective tok/s ×{ratio:.2f}" if ratio is not None else ""), ""]
    lines += ["| policy | effective tok/s | completed | failed | makespan s | replayed edges | replayed τ | "
              "ahead kept / dropped |", "|---|---|---|---|---|---|---|---|"]
    for p, s in pol.items():
        rf = (result.get("cells") or {}).get(p, {}).get("replay_features") or {}
        rp = s.get("replayed") or {}
        lines.append(f"| {p} | {_num(s.get('effective_tok_s'), '{:.2f}')} | {s.get('completed')} | {s.get('failed')} | "
                     f"{_num(s.get('makespan_s'), '{:.1f}')} | {' + '.join(k for k, v in rf.items() if v) or '—'} | "
                     f"{_num(rp.get('tau'), '{:.2f}')} | {rp.get('ahead_kept', '—')} / {rp.get('ahead_dropped', '—')} |")
    lines += ["", "| class | users | policy | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |",
              "|---|---|---|---|---|---|---|"]
    for c in RTT_CLASSES:
        for p, s in pol.items():
            r = s["per_class"].get(c, {})
            lines.append(f"| {c} | {r.get('users')} | {p} | {_num(r.get('ttft_ms_p50'))} | {_num(r.get('ttft_ms_p99'))} | "
                         f"{_num(r.get('tpot_ms_p50'))} | {_num(r.get('tpot_ms_p99'))} |")
    real = []
    for label, cell in (result.get("cells") or {}).items():
        if cell.get("error"):
            lines += ["", f"Cell {label} failed: `{cell['error'][:1500]}`"]
        for u in cell.get("users") or []:
            if u.get("real") and label == next(iter(result["cells"])):
                real.append(f"{u['uid'].split('-', 1)[1]} ({u['id']}, RTT {u['rtt_ms']:.0f} ms, {u['rtt_class']})")
    lines += ["", f"Real users (real edge processes): {', '.join(real) or 'none'}; every other user was replayed.", ""]
    for label, cell in (result.get("cells") or {}).items():
        if "cloud_stats" in cell:
            lines.append(f"- {label}: cloud start {cell.get('startup_s')} s, run {cell.get('wall_s')} s, load at start "
                         f"{cell.get('load_at_start')}, at end {cell.get('load_at_end')}")
    if exp.get("notes"):
        lines += ["", exp["notes"].strip()]
    lines += ["", f"![{exp['name']}]({exp['name']}.png)", ""]
    return "\n".join(lines)


def population_png(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pol = result.get("policies") or {}
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    (a_cloud, a_client, a_gap, a_eff), (a_ttft, a_tpot, a_slow, a_text) = axes
    cum = {}
    order = list(pol)
    for p, s in pol.items():
        tl = s["timeline"]
        t, w = np.array(tl["t"]) + tl["window_s"] / 2, tl["window_s"]
        color = _color(p, order)
        a_cloud.plot(t, np.array(tl["cloud_tokens"]) / w, label=p, color=color)
        a_client.plot(np.array(tl["t"]) + w, np.cumsum(tl["client_tokens"]), label=p, color=color)
        a_eff.plot(t, np.array(tl["client_tokens"]) / w, label=p, color=color)
        cum[p] = (np.array(tl["t"]) + w, np.cumsum(tl["client_tokens"]), np.cumsum(tl["cloud_tokens"]))
    a_cloud.set(title="Tokens the cloud generated (the GPU's view)", xlabel="time since the first arrival (s)",
                ylabel="tokens/s")
    a_client.set(title="Tokens delivered at the clients (the users' view)", xlabel="time (s)", ylabel="tokens, cumulative")
    a_eff.set(title="Effective throughput (delivered at the clients)", xlabel="time (s)", ylabel="tokens/s")
    sl = result.get("slowdown_vs_fifo") or {}
    if not sl and result.get("worst_class_slowdown_detail"):
        sl = {"health": result["worst_class_slowdown_detail"]}
    pairs = [(p, d.get("versus", "fifo")) for p, d in sl.items()] or [(p, "fifo") for p in cum if p != "fifo"]
    for p, base in pairs:                        # each policy against the FIFO row it is compared with
        if p not in cum or base not in cum:
            continue
        (tf, cf, gf), (th, ch, gh) = cum[base], cum[p]
        grid = np.union1d(tf, th)
        a_gap.plot(grid, np.interp(grid, th, ch) - np.interp(grid, tf, cf), color=_color(p, order),
                   label=f"{p} − {base}, delivered at the clients")
        a_gap.plot(grid, np.interp(grid, th, gh) - np.interp(grid, tf, gf), color=_color(p, order), ls=":",
                   label=f"{p} − {base}, generated at the cloud")
        a_gap.axhline(0, color="gray", lw=0.5)
    a_gap.set(title="Gap between the policies (− FIFO)", xlabel="time (s)", ylabel="tokens, cumulative")
    for ax in (a_cloud, a_client, a_eff, a_gap):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
        ax.grid(alpha=0.3)
    x = np.arange(len(RTT_CLASSES))
    bw = 0.8 / max(len(pol), 1)
    for ax, metric, title in ((a_ttft, "ttft", "TTFT per RTT class"), (a_tpot, "tpot", "TPOT per RTT class")):
        for i, (p, s) in enumerate(pol.items()):
            p50 = [s["per_class"][c][f"{metric}_ms_p50"] or 0 for c in RTT_CLASSES]
            p99 = [s["per_class"][c][f"{metric}_ms_p99"] or 0 for c in RTT_CLASSES]
            at = x + (i - (len(pol) - 1) / 2) * bw
            ax.bar(at, p50, bw, color=_color(p, order), alpha=0.8, label=f"{p} p50")
            ax.scatter(at, p99, marker="_", s=300 * bw / 0.4, color="k", zorder=3, label="p99" if i == 0 else None)
        ax.set_xticks(x, [f"{c}\n({pol[next(iter(pol))]['per_class'][c]['users']} users)" for c in RTT_CLASSES]
                      if pol else RTT_CLASSES, fontsize=8)
        ax.set(title=title, ylabel="ms")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    n = max(len(sl), 1)
    for i, (p, d) in enumerate(sl.items()):
        per = d.get("per_class") or {}
        at = np.array([RTT_CLASSES.index(c) for c in per]) + (i - (n - 1) / 2) * (0.8 / n)
        a_slow.bar(at, list(per.values()), 0.8 / n, color=_color(p, order), label=f"{p} (worst: {d.get('class')})",
                   edgecolor=["k" if c == d.get("class") else "none" for c in per], linewidth=1.5)
    a_slow.set_xticks(x, RTT_CLASSES, fontsize=8)
    a_slow.axhline(1.0, color="k", lw=0.8)
    if sl:
        a_slow.legend(fontsize=8)
    a_slow.set(title="p99 TPOT ÷ FIFO's, per class (worst outlined)", ylabel="slowdown ×")
    a_slow.grid(alpha=0.3, axis="y")
    a_text.axis("off")
    m = result["meta"]
    a_text.text(0, 1, "\n".join([
        f"{result['experiment']['name']}: worst class slowdown"
        + (f" {_num(result.get('worst_class_slowdown'), '{:.2f}')}" if result.get("worst_class_slowdown") is not None
           else "".join(f"\n  {p} vs {d.get('versus', 'fifo')}: {_num(d.get('value'), '{:.2f}')} ({d.get('class')})" for p, d in sl.items())),
        *[f"{p}: {_num(s.get('effective_tok_s'), '{:.2f}')} tok/s effective, {s.get('completed')} done" for p, s in pol.items()],
        f"load at start {m.get('load_start')}", f"commit {m.get('commit')}", f"{m.get('date')}"]),
        va="top", fontsize=10, family="monospace", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- goodput -------------------------------------------------------------------------------------------
def goodput_md(result: dict) -> str:
    exp = result["experiment"]
    g = exp["goodput"]
    p = f"p{g['percentile']:g}"
    lines = [f"# {exp['name']}", "", exp["question"], ""]
    if exp.get("device_command"):
        lines += ["Device command:", "", "```", exp["device_command"].strip(), "```", ""]
    lines += _meta_lines(result)
    slos = g["slo_tpot_ms"]
    lines += [f"users_at_slo: the most concurrent users of a level (levels {g['levels']}) at which the {p} TTFT ≤ "
              f"{g['slo_ttft_ms']:g} ms and the {p} TPOT ≤ {slos[0]:g} ms, every lower level meeting them too"
              + (f"; also with TPOT ≤ {', '.join(f'{s:g}' for s in slos[1:])} ms" if len(slos) > 1 else "")
              + ". Engine tok/s: all users' tokens ÷ the level's span at 64 and 256 users.", "",
              "| model | dataset | edge | system | users_at_slo | " + " | ".join(f"users at TPOT ≤ {s:g}" for s in slos[1:])
              + " | engine tok/s 64 | engine tok/s 256 |",
              "|---|---|---|---|---|" + "---|" * (len(slos) - 1) + "---|---|"]
    for r in result.get("rows") or []:
        lines.append(f"| {r['model']} | {r['dataset']} | {r['edge'] or '—'} | {r['system']} | {r['users_at_slo']} | "
                     + " | ".join(str(r.get(f"users_at_slo_tpot{s:g}")) for s in slos[1:])
                     + f" | {_num(r.get('engine_tok_s_64'), '{:.0f}')} | {_num(r.get('engine_tok_s_256'), '{:.0f}')} |")
    lines += ["", f"Per level ({p} and p50 in ms, tok/s over all users):", "",
              f"| model | dataset | edge | system | users | {p} TTFT | {p} TPOT | TTFT p50 | TPOT p50 | tok/s | failed | "
              "τ | ahead kept / dropped |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("rows") or []:
        for f in r["levels"]:
            rp = f.get("replayed") or {}
            lines.append(f"| {r['model']} | {r['dataset']} | {r['edge'] or '—'} | {r['system']} | {f['users']} | "
                         f"{_num(f.get(f'{p}_ttft_ms'))} | {_num(f.get(f'{p}_tpot_ms'))} | {_num(f.get('ttft_ms_p50'))} | "
                         f"{_num(f.get('tpot_ms_p50'))} | {_num(f.get('tok_s'), '{:.1f}')} | {f.get('failed')} | "
                         f"{_num(rp.get('tau'), '{:.2f}')} | {rp.get('ahead_kept', '—')} / {rp.get('ahead_dropped', '—')} |")
    for label, cell in (result.get("cells") or {}).items():
        if cell.get("error"):
            lines += ["", f"Cell {label} failed: `{cell['error'][:1500]}`"]
        elif cell.get("refs"):
            rf = cell.get("replay_features")
            feats = "" if rf is None else f"replayed Tandem edges with {' + '.join(k for k, v in rf.items() if v) or 'neither'}" \
                " of parallel_prefill / draft_ahead; "
            lines += ["", f"- {label}: {feats}engine/cloud start {cell.get('startup_s')} s, cell {cell.get('wall_s')} s; the "
                      "target's greedy answers here identical to the recorded ones: "
                      + ", ".join(f"{ds} {v['identical_to_recorded']}/{v['of']}" for ds, v in cell['refs'].items())]
    if exp.get("notes"):
        lines += ["", exp["notes"].strip()]
    lines += ["", f"![{exp['name']}]({exp['name']}.png)", ""]
    return "\n".join(lines)


def goodput_png(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = result["experiment"]["goodput"]
    p = f"p{g['percentile']:g}"
    rows = result.get("rows") or []
    panels = sorted({(r["model"], r["dataset"]) for r in rows})
    if not panels:
        return
    levels = sorted({f["users"] for r in rows for f in r["levels"]})
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8), squeeze=False)
    for j, (model, ds) in enumerate(panels):
        for r in rows:
            if (r["model"], r["dataset"]) != (model, ds):
                continue
            label = f"{r['system']}" + (f" ({r['edge']})" if r["edge"] else "")
            n = [levels.index(f["users"]) for f in r["levels"]]
            nan = float("nan")
            axes[0][j].plot(n, [nan if f.get(f"{p}_tpot_ms") is None else f[f"{p}_tpot_ms"] for f in r["levels"]],
                            marker="o", label=label)
            axes[1][j].plot(n, [nan if f.get(f"{p}_ttft_ms") is None else f[f"{p}_ttft_ms"] for f in r["levels"]],
                            marker="o", label=label)
        for s in g["slo_tpot_ms"]:
            axes[0][j].axhline(s, color="gray", ls="--", lw=0.8)
        axes[1][j].axhline(g["slo_ttft_ms"], color="gray", ls="--", lw=0.8)
        axes[0][j].set(title=f"{model}, {ds}: {p} TPOT (missing: users failed)", xlabel="concurrent users", ylabel="ms")
        axes[1][j].set(title=f"{model}, {ds}: {p} TTFT", xlabel="concurrent users", ylabel="ms")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks(range(len(levels)), [str(x) for x in levels])
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())
