"""Merge the GPU jobs' job_*.json (ablations/gpu_vllm.py) into results/gpu_vllm.json and .md.

  python -m ablations.gpu_vllm report ablations/results/gpu_vllm-logs.tar.xz

The job files and device logs of the sessions reported there are kept in one archive,
results/gpu_vllm-logs.tar.xz (gpu_jobs/, gpu_logs/); the report reads them from it.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARCHIVE = RESULTS / "gpu_vllm-logs.tar.xz"     # gpu_jobs/ (job files) and gpu_logs/ (device logs)
REPORT_COMMAND = "python -m ablations.gpu_vllm report ablations/results/gpu_vllm-logs.tar.xz"


def unpack(archive: Path) -> Path:
    """The archive's gpu_jobs/ and gpu_logs/, in a fresh temporary folder (returned)."""
    import tarfile
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="gpu_vllm-logs-"))
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def _sources(dirs: list[Path]) -> list[Path]:
    """Job-file folders; an archive (.tar.xz) stands for its gpu_jobs/, and its gpu_logs/ become LOGS'
    root."""
    global LOGS
    out = []
    for d in dirs:
        if d.name.endswith(".tar.xz"):
            root = unpack(d)
            LOGS = root / "gpu_logs" / WS
            out.append(root / "gpu_jobs")
        else:
            out.append(d)
    return out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _tps(job: dict, key: str):
    return (job.get(key) or {}).get("tokens_per_s")


CUR = "1c31b49"          # this session's code for the 1.5B runs and the first 14B run (default settings)
BIG = "big_2f82f19"      # this session's 14B run with a warm-up replay before the clock (default settings)
BI = "edges_bi_triton_attn_5f06a52"   # batch-invariant run with the token-for-token exactness probes
PREV = "afee465"         # the last session

H200 = "9ead854"          # this session (H200): busy polling + the engine thread reading its pipes, gather fixed
H200_FIRST = "ea21a34"    # the same design before the held-round timestamp fix (1.5B edges, plain, replays)
# replay jobs of this session: (job, what changed); each holds several (ours, oracle) pairs back to back
H200_REPLAYS = [("replay_busy0_ea21a34", "no polling (`--busy-poll-ms 0`)", "busy0"),
                ("replay_ea21a34", "polling 10 ms (default)", "busy"),
                ("replay_ea21a34_r5", "polling 10 ms (default), 5 pairs", "busy"),
                ("replay_cbusy10_ea21a34", "polling 10 ms, light clients polling too", "client"),
                ("replay_fe8_ea21a34", "polling 10 ms, 8 front ends", "fe8"),
                (f"replay_{H200}", "polling, held rounds stamped when sent (`9ead854`)", "busy"),
                (f"replay_{H200}_lp16", "same, 16 light-client processes", "lp16"),
                (f"replay_gather2_{H200}", "same, gather window 2 ms", "gather2"),
                ("replay_s1-8-64-256_b5de959", "polling; second machine; 1-256 sessions", "busy"),
                ("replay_busy0_s1-8-64-256_b5de959", "no polling; second machine; 1-256 sessions", "busy0"),
                ("replay_cpus0-5_pin", "polling; cloud on CPUs 0-5, clients on 6-15", "pin"),
                ("replay_nopin", "polling; no pinning (same machine, next)", "busy")]

STEPS = [  # the 14B at 64 sessions, one change at a time (job files in gpu_jobs/ and gpu_jobs/steps/)
    ("big_nopad", "previous session: drafts as gated (mixed lengths: no CUDA graph), engine thread in the HTTP process, fixed 1 ms gather", "35639cc"),
    ("big_gather10_nopad", "same, 10 ms gather", "35639cc"),
    ("steps/1_pad_inproc_gatherv0", "+ drafts padded to k: every spec step replays one CUDA graph", "611982f"),
    ("steps/2_pad_inproc_gatherv1", "+ gather by expected arrival (v1), GIL switch interval 0.5 ms", "3fa2155 (in-process)"),
    ("steps/2b_pad_inproc_gatherv1_switch5", "same, Python's default 5 ms switch interval", "3fa2155 (in-process)"),
    ("steps/2c_pad_inproc_gatherv1_gather25", "same, 25 ms gather window", "3fa2155 (in-process)"),
    ("steps/3_pad_proc_gatherv1", "+ engine in a child process (HTTP front end alone in the parent)", "3fa2155"),
    ("steps/3b_pad_proc_gatherv1_gather1", "same, 1 ms gather window", "3fa2155"),
    ("big_6ba7fa9", "+ the gather window opens when the engine is free (light clients spawned inside the timed window)", "6ba7fa9"),
    ("big_afee465", "+ light clients timed from a start barrier, 8 client processes; accepted pads stay in their request; "
                    "a live session's round crosses the engine pipe as (length, draft) (last session)", "afee465"),
    ("big_1c31b49", "+ gather window = one measured engine step (new default), 4 HTTP front-end processes, held rounds "
                    "posted without a task (this session; vLLM's rejection-sampler kernel JIT-compiled inside this timed run)", "1c31b49"),
    ("big_1c31b49_repeat", "same code, again on the same machine (compiled kernels cached)", "1c31b49"),
    ("big_2f82f19", "same code + an untimed warm-up replay before the clock (the compile moves there)", "2f82f19"),
]


def headline(edges: dict, plain: dict, big: dict, big_plain: dict) -> dict:
    """tau, acceptance and the capacity ratios from one device's edges/plain/big/big_plain jobs."""
    return {
        "tau": {s: edges.get(f"tau_{s}") for s in ("humaneval", "mtbench")},
        "acceptance_rate": {s: edges.get(f"acceptance_rate_{s}") for s in ("humaneval", "mtbench")},
        "capacity_ratio": _ratio(_tps(edges, "replay_64"), _tps(plain, "plain_64")),
        "capacity_ratio_256": _ratio(_tps(edges, "replay_256"), _tps(plain, "plain_256")),
        "capacity_ratio_14b": _ratio(_tps(big, "ours_64"), _tps(big_plain, "plain_64")),
        "capacity_ratio_14b_256": _ratio(_tps(big, "ours_256"), _tps(big_plain, "plain_256")),
        "oracle_ratio_14b": _ratio(_tps(big, "oracle_64"), _tps(big_plain, "plain_64")),
    }


def _load(dirs: list[Path]) -> dict:
    jobs = {}
    for d in dirs:
        for f in sorted(d.glob("job_*.json")):
            jobs[f.stem[4:]] = json.loads(f.read_text())
        for f in sorted(d.glob("steps/*.json")):
            jobs[f"steps/{f.stem}"] = json.loads(f.read_text())
    return jobs


def report(dirs: list[Path]) -> int:
    jobs = _load(_sources(dirs))
    plain, edges, big, big_plain = (jobs.get(k, {}) for k in (f"plain_{CUR}", f"edges_{CUR}", BIG, f"big_plain_{CUR}"))
    bi = jobs.get("edges_bi_nopad", {})
    bit, pbit = jobs.get(BI, {}), jobs.get(f"plain_bi_triton_attn_{CUR}", {})
    probes = (bit.get("exactness_probes") or {}).get("plain_staggered", {})
    res = {
        "device": edges.get("device"), "versions": edges.get("versions"), "execution": edges.get("execution"),
        "pad_drafts": edges.get("pad_drafts"), "engine_process": True,
        "lossless_prompts": edges.get("lossless_prompts"), "lossless_identical": edges.get("lossless_identical"),
        "lossless_identical_batch_invariant": bit.get("lossless_identical"),
        # the same real edges' outputs vs vLLM target-only greedy on the same engine (our cloud's /v1/generate
        # path), the prompts arriving as the edges' did (7 at a time): token for token
        "lossless_identical_batch_invariant_same_engine": probes.get("identical_to_edges"),
        "lossless_identical_batch_invariant_flash_attn_unpadded_previous_session": bi.get("lossless_identical"),
        "batch_invariant_cost": {  # VLLM_BATCH_INVARIANT=1 + TRITON_ATTN ÷ default kernels, same session
            f"{name}_{s}": _ratio(_tps(a, f"{key}_{s}"), _tps(b, f"{key}_{s}"))
            for name, a, b, key in (("plain", pbit, plain, "plain"), ("ours", jobs.get(f"edges_bi_triton_attn_{CUR}", {}), edges, "replay"),
                                    ("oracle", jobs.get(f"edges_bi_triton_attn_{CUR}", {}), edges, "oracle")) for s in (64, 256)},
        **headline(edges, plain, big, big_plain),
        "capacity_ratio_14b_runs": {k: _ratio(_tps(jobs.get(k, {}), "ours_64"), _tps(big_plain, "plain_64"))
                                    for k in ("big_1c31b49", "big_1c31b49_repeat", BIG)},
        "frontends_1p5b": {n: {s: {"ours": _tps(jobs.get(k, {}), f"replay_{s}"), "oracle": _tps(jobs.get(k, {}), f"oracle_{s}"),
                                   "ceiling": _ratio(_tps(jobs.get(k, {}), f"replay_{s}"), _tps(jobs.get(k, {}), f"oracle_{s}"))}
                               for s in (64, 256)}
                           for n, k in ((1, "edges_fe1_5f06a52"), (4, f"edges_{CUR}"), (8, "edges_fe8_5f06a52"))},
        # gather window tuned for the 14B's 33 ms step (cloud.vllm.gather_ms 30; the default is 10), ÷ the plain
        # run of the same device call
        "capacity_ratio_14b_gather30_last_session": _ratio(_tps(jobs.get("big_gather30", {}), "ours_64"),
                                              _tps(jobs.get("big_plain_gathercall", {}), "plain_64")),
        "capacity_ratio_14b_gather30_repeat_last_session": _ratio(_tps(jobs.get("big_gather30_repeat", {}), "ours_64"),
                                                     _tps(jobs.get("big_plain_gathercall", {}), "plain_64")),
        "oracle_ceiling_ratio_14b_gather30_last_session": _ratio(_tps(jobs.get("big_gather30", {}), "ours_64"),
                                                    _tps(jobs.get("big_gather30", {}), "oracle_64")),
        "oracle_ceiling_ratio": _ratio(_tps(edges, "replay_64"), _tps(edges, "oracle_64")),
        "oracle_ceiling_ratio_256": _ratio(_tps(edges, "replay_256"), _tps(edges, "oracle_256")),
        "oracle_ceiling_ratio_14b": _ratio(_tps(big, "ours_64"), _tps(big, "oracle_64")),
        "verify_ms_p50": {k[len("verify_ms_p50_"):]: v for k, v in jobs.get("baseline", {}).items()
                          if k.startswith("verify_ms_p50_")},
        "anchor_draft_model": {k: v for k, v in jobs.get("anchor", {}).items() if k.startswith(("anchor_", "identical", "error"))},
        "tp2": {k: jobs.get("smoke_tp2_nopad", {}).get(k) for k in ("device", "http_identical", "oracle_identical", "errors")},
        "steps_14b_64": [{"job": k, "change": c, "commit": h, "ours_ratio": _ratio(_tps(jobs.get(k, {}), "ours_64"), _tps(big_plain, "plain_64")),
                          "oracle_ratio": _ratio(_tps(jobs.get(k, {}), "oracle_64"), _tps(big_plain, "plain_64")),
                          "steps": (jobs.get(k, {}).get("ours_64") or {}).get("engine", {}).get("steps")} for k, c, h in STEPS],
        "h200_early": h200_early(jobs),
        "h200_ws": h200_ws(jobs),
        "h200": h200(jobs),
        "jobs": jobs,
    }
    # the headline keys carry the latest measurement; the H100 session's own values move under h100_session
    keys = ("oracle_ceiling_ratio", "oracle_ceiling_ratio_256", "capacity_ratio_14b", "capacity_ratio_14b_256")
    res["h100_session"] = {k: res[k] for k in keys} | {"device": res["device"]}
    latest = res["h200_early"]
    res.update({k: latest[k] for k in keys}, headline_from="h200_early (the latest session, H200, code b1bbdd9)",
               oracle_ceiling_pairs_64=latest["oracle_ceiling_pairs_64"], headline_device=latest["device"])
    res = {k: res[k] for k in ("headline_from", "headline_device", *keys, "oracle_ceiling_pairs_64")} | res
    (RESULTS / "gpu_vllm.md").write_text(markdown(res))
    # the figures; the job files themselves stay in the archive (the report reads them from there)
    (RESULTS / "gpu_vllm.json").write_text(json.dumps({k: v for k, v in res.items() if k != "jobs"} | {
        "jobs": f"the job files: gpu_jobs/ in {ARCHIVE.name}", "report_command": REPORT_COMMAND}, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "jobs"}, indent=1))
    return 0


def _median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def h200(jobs: dict) -> dict:
    """This session's numbers (H200, current design)."""
    e, p = jobs.get(f"edges_{H200_FIRST}", {}), jobs.get(f"plain_{H200_FIRST}", {})
    b, bp = jobs.get(f"big_{H200}", {}), jobs.get(f"big_plain_{H200_FIRST}", {})
    bi, pbi = jobs.get(f"edges_bi_triton_attn_{H200}", {}), jobs.get(f"plain_bi_triton_attn_{H200}", {})
    pairs: dict = {}
    for job, _, group in H200_REPLAYS:
        for run in jobs.get(job, {}).get("runs", []):
            pairs.setdefault(group, {}).setdefault(run["sessions"], []).append(run["ratio"])
    if e:                                               # the edges job's own pair (polling, default settings)
        for s in (64, 256):
            pairs.setdefault("busy", {}).setdefault(s, []).append(_ratio(_tps(e, f"replay_{s}"), _tps(e, f"oracle_{s}")))
    probes = (bi.get("exactness_probes") or {}).get("plain_staggered", {})
    return {
        "device": e.get("device"), "versions": e.get("versions"),
        "lossless_prompts": e.get("lossless_prompts"), "lossless_identical": e.get("lossless_identical"),
        "lossless_identical_batch_invariant": bi.get("lossless_identical"),
        "lossless_identical_batch_invariant_same_engine": probes.get("identical_to_edges"),
        **headline(e, p, b, bp),
        "oracle_ceiling_ratio_14b": _ratio(_tps(b, "ours_64"), _tps(b, "oracle_64")),
        "capacity_ratio_14b_before_fix": _ratio(_tps(jobs.get(f"big_{H200_FIRST}", {}), "ours_64"), _tps(bp, "plain_64")),
        "batch_invariant_ceiling": {s: _ratio(_tps(bi, f"replay_{s}"), _tps(bi, f"oracle_{s}")) for s in (64, 256)},
        # ours ÷ oracle, one value per back-to-back pair; the median over all pairs of a setting is the figure
        "oracle_ceiling_pairs": pairs,
        "oracle_ceiling_ratio": _median(pairs.get("busy", {}).get(64, [])),
        "oracle_ceiling_ratio_256": _median(pairs.get("busy", {}).get(256, [])),
        "oracle_ceiling_ratio_no_polling": _median(pairs.get("busy0", {}).get(64, [])),
    }


def h200_markdown(j: dict, h: dict) -> str:
    e, p = j.get(f"edges_{H200_FIRST}", {}), j.get(f"plain_{H200_FIRST}", {})
    b, bp = j.get(f"big_{H200}", {}), j.get(f"big_plain_{H200_FIRST}", {})
    rows = []
    for job, what, _ in H200_REPLAYS:
        runs = j.get(job, {}).get("runs", [])
        for s in sorted({r["sessions"] for r in runs}):
            rs = [r for r in runs if r["sessions"] == s]
            ratios = [r["ratio"] for r in rs]
            steps = [(r["ours"]["engine"]["ms_per_step"], r["oracle"]["engine"]["ms_per_step"]) for r in rs]
            walls = [r["ours"]["wall_s"] - r["ours"]["engine"]["step_s"] for r in rs]
            rows.append(f"| {what} | {s} | **{_median(ratios)}** | {', '.join(map(str, ratios))} | "
                        f"{_median([a for a, _ in steps])} / {_median([o for _, o in steps])} | "
                        f"{round(1e3 * _median(walls) / max(rs[0]['ours']['engine']['steps'], 1), 2)} |")
    pairs = h["oracle_ceiling_pairs"]
    big_rows = "\n".join(
        f"| {name} | {_tps(job, 'ours_64')} | {_ratio(_tps(job, 'ours_64'), _tps(bp, 'plain_64'))} | "
        f"{((job.get('ours_64') or {}).get('engine') or {}).get('steps')} | {_tps(job, 'oracle_64')} | "
        f"{_tps(job, 'ours_256')} ({_ratio(_tps(job, 'ours_256'), _tps(bp, 'plain_256'))}) |"
        for name, job in ((f"`{H200_FIRST}`: held rounds stamped when the engine thread read them", j.get(f"big_{H200_FIRST}", {})),
                          (f"`{H200}`: stamped when the front end sent them", b)))
    return f"""## Two sessions before: NVIDIA H200, busy polling, the engine thread reading its own pipes
Device: {h['device']}, vLLM {(h['versions'] or {}).get('vllm')}, torch {(h['versions'] or {}).get('torch')}.
No H100 was free, so every number in this section is from an H200. Do not compare them with the
H100 sections below. The H200 steps the 1.5B faster (an oracle step at 64 sessions: about 4.9 ms here,
6.3 ms on the H100), so the same wire cost is a bigger share of each step.

What changed (commits `{H200_FIRST}`, `{H200}`):
* **Busy polling** (`cloud.vllm.busy_poll_ms`, default 10). For 10 ms after any activity, the front
  ends and the engine thread poll their sockets and pipes instead of sleeping in epoll/select.
  `python -m ablations.wake_probe` on this H200 machine: a loopback aiohttp round trip whose
  server pauses 3 ms costs 690 µs beyond the pause with both sides sleeping, and 249 µs with both
  polling. A pipe ping-pong with the same pause: 337 µs against 158 µs.
* **The engine thread reads the pipes** itself between steps (`EnginePort`). A held round goes
  from the pipe to the board on the thread that steps the engine, and a step's answers leave in one
  write per pipe. No other thread is involved.
* **Held rounds are stamped when the front end sends them.** At first (`{H200_FIRST}`) they were
  stamped when the engine thread read them, which happens after a step. A draft that arrived during a
  step then looked one step late. The gather's turnaround estimates grew, it stopped waiting for those
  sessions, and the 14B split into cohorts: 131 steps instead of 36, 0.67× plain. Stamping at the
  front end (`{H200}`) fixed it.

### Headline numbers, H200 (current design)
| metric | value |
|---|---|
| lossless_identical, real edges vs a separate plain engine (default kernels) | {h['lossless_identical']} / {h['lossless_prompts']} |
| same, batch-invariant + TRITON_ATTN | {h['lossless_identical_batch_invariant']} / {h['lossless_prompts']} |
| **real edges vs vLLM target-only on the same engine, 7 at a time (batch-invariant, token for token)** | **{h['lossless_identical_batch_invariant_same_engine']} / {h['lossless_prompts']}** |
| tau (HumanEval / MT-Bench) | {h['tau']['humaneval']} / {h['tau']['mtbench']} |
| acceptance_rate (HumanEval / MT-Bench) | {h['acceptance_rate']['humaneval']} / {h['acceptance_rate']['mtbench']} |
| capacity_ratio (1.5B, 64; 256) | {h['capacity_ratio']}; {h['capacity_ratio_256']} (plain {_tps(p, 'plain_64')} / {_tps(p, 'plain_256')} tok/s) |
| **capacity_ratio_14b (64; 256)** | **{h['capacity_ratio_14b']}**; {h['capacity_ratio_14b_256']} (14B oracle ÷ plain: {h['oracle_ratio_14b']}; ours ÷ oracle {h['oracle_ceiling_ratio_14b']}) |
| **oracle_ceiling_ratio (1.5B, 64): median of {len(pairs.get('busy', {}).get(64, []))} back-to-back pairs** | **{h['oracle_ceiling_ratio']}** (256: {h['oracle_ceiling_ratio_256']}) |
| same without polling (`--busy-poll-ms 0`) | {h['oracle_ceiling_ratio_no_polling']} ({len(pairs.get('busy0', {}).get(64, []))} pairs) |
| batch-invariant + TRITON_ATTN: ours ÷ oracle (64; 256) | {h['batch_invariant_ceiling'][64]}; {h['batch_invariant_ceiling'][256]} |

### The 1.5B oracle ceiling on the H200, pair by pair
Each replay job starts our cloud once and then runs ours (light clients over HTTP) and the oracle
(no wire) back to back, several times. A single pair moves by ±0.08: the oracle alone ranged from
8.3k to 10.9k tok/s at 64 sessions. So the figure is the median over pairs. "ms per step" is the
median engine step for ours / oracle. "idle ms per step" is ours' wall time minus its step time,
per step. The oracle's idle is about 0.2 ms per step.

| setting | sessions | median | pairs | ms per step ours / oracle | idle ms per step (ours) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Reading it:
* On the first machine, polling moved the 64-session median from 0.59 to 0.72–0.76. On the second
  machine the same comparison came out even (0.68 with polling, 0.70 without). The pairs are that noisy.
* Neither more front ends (8), more light-client processes (16), a shorter gather window (2 ms), the
  light clients polling too, nor pinning the cloud and the clients to separate CPUs moved the
  median beyond that noise.
* The steps themselves explain part of the gap. Ours' engine steps take 0.3–0.8 ms longer than the
  oracle's on the same engine, with the same batch shape. While ours steps, 12 processes (front ends
  and clients) are busy on the same 16 cores; while the oracle steps, none are.
* The rest is the wire. The engine statistics (`started` in the job files) show that at 64 sessions
  about 124 of 129 steps start because every live session's draft is in. A step waits for the
  slowest draft of the cohort. With one session (no cohort) the median is 0.77–0.81; with 8 it is
  0.67–0.74. Even one session's round trip (edge → front end → engine → front end → edge, two
  aiohttp hops and two pipe hops, all Python) costs about 1.1 ms against a 4 ms step.

### Where the bar stands (H200)
* **capacity_ratio_14b: met, {h['capacity_ratio_14b']}** (ours ÷ oracle {h['oracle_ceiling_ratio_14b']}).
* **lossless: {h['lossless_identical_batch_invariant_same_engine']}/64 token for token** against vLLM target-only on the same engine with the
  same arrival pattern (batch-invariant kernels). Against a separate engine given all prompts at once:
  {h['lossless_identical_batch_invariant']}/64, which vLLM target-only does not reproduce either (same as on the H100).
* **oracle_ceiling_ratio (1.5B, 64): missed, {h['oracle_ceiling_ratio']}** (median of {len(pairs.get('busy', {}).get(64, []))} pairs). With batch-invariant
  kernels, whose steps are slower (about 9 ms on the H100), the one pair measured gave {h['batch_invariant_ceiling'][64]}.

### The 14B on the H200
| run | ours, 64 | ÷ plain | engine steps | oracle, 64 | ours, 256 (÷ plain) |
|---|---|---|---|---|---|
{big_rows}

Plain vLLM on this H200: {_tps(bp, 'plain_64')} tok/s at 64 sessions, {_tps(bp, 'plain_256')} at 256.

### Commands (this session, H200; logs in `gpu_logs/*_<commit>.log`)
```
python -m ablations.gpu_vllm run --jobs plain,edges --tag ea21a34 --out $OUT      # also writes traces15.json (committed: results/gpu_traces15.json)
python -m ablations.gpu_vllm run --jobs replay --busy-poll-ms 0 --tag ea21a34 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --tag ea21a34 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --client-busy-poll-ms 10 --tag ea21a34 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --frontends 8 --repeats 5 --tag ea21a34 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --repeats 5 --tag ea21a34_r5 --out $OUT
python -m ablations.gpu_vllm run --jobs big_plain,big --tag ea21a34 --out $OUT
python -m ablations.gpu_vllm run --jobs big --tag 9ead854 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --repeats 5 --tag 9ead854 --out $OUT
python -m ablations.gpu_vllm run --jobs plain,edges --batch-invariant --attention TRITON_ATTN --work /tmp/gpu_bi --tag 9ead854 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --light-procs 16 --repeats 5 --tag 9ead854_lp16 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --gather-ms 2 --repeats 5 --tag 9ead854 --out $OUT
# a second H200 machine (code b5de959 / cfea154; the replay job reads the committed traces, no draft model staged)
python -m ablations.gpu_vllm run --jobs replay --repeats 5 --sessions 1,8,64,256 --tag b5de959 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --busy-poll-ms 0 --repeats 5 --sessions 1,8,64,256 --tag b5de959 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --repeats 5 --cloud-cpus 0-5 --client-cpus 6-15 --tag pin --out $OUT
python -m ablations.gpu_vllm run --jobs replay --repeats 5 --tag nopin --out $OUT
```

# Earlier sessions (H100)

"""


# --- the fourth H200 session: early answers, the engine-step decomposition, polling clients ----------
EARLY = "7c"               # job-file tags 7c1..7c6 (code b1bbdd9)
# (label, group, job files): every job runs ours and the oracle back to back, --repeats pairs
EARLY_REPLAYS = [
    ("engine on 0-2, answers after vLLM's output processing (as before)", "late_eng02",
     ["replay_s64_eng0-2_ws_late_burn_7c1", "replay_s64_eng0-2_ws_late_7c2"]),
    ("engine on 0-2, early answers", "early_eng02", ["replay_s64_eng0-2_ws_7c1", "replay_eng0-2_ws_7c2"]),
    ("engine on 0,1, early answers, 12 light-client processes", "early_lp12", ["replay_s64_eng0-1_ws_lp12_7c3"]),
    ("engine on 0,1, early answers, 6 front ends", "early_fe6", ["replay_fe6_s64_eng0-1_ws_7c3"]),
    ("engine on 0,1, answers after output processing, clients poll", "late_cb", ["replay_cbusy10_s64_eng0-1_ws_late_7c6"]),
    ("**engine on 0,1, early answers, clients poll**", "early_cb",
     ["replay_cbusy10_s64_eng0-1_ws_7c3", "replay_cbusy10_eng0-1_ws_7c4", "replay_cbusy10_s64_eng0-1_ws_7c6"]),
    ("engine on 0,1, early answers, clients poll, 6 front ends", "early_cb_fe6", ["replay_fe6_cbusy10_s64_eng0-1_ws_7c4"]),
]
EARLY_STATS = ("ms_per_step", "idle_ms_per_step", "post_ms_per_step", "gc_ms_per_step", "edge_cycle_ms", "read_ms")


def h200_early(jobs: dict) -> dict:
    rows, pairs = [], {}
    for label, group, names in EARLY_REPLAYS:
        runs = [r for n in names for r in jobs.get(n, {}).get("runs", [])]
        for s in sorted({r["sessions"] for r in runs}):
            rs = [r for r in runs if r["sessions"] == s]
            pairs.setdefault(group, {})[s] = [r["ratio"] for r in rs]
            rows.append({"setting": label, "sessions": s, "median": round(statistics.median(r["ratio"] for r in rs), 3),
                         "pairs": len(rs), "min": min(r["ratio"] for r in rs), "max": max(r["ratio"] for r in rs),
                         "ours": {k: _median([r["ours"]["engine"].get(k) for r in rs]) for k in EARLY_STATS},
                         "oracle_step_ms": _median([r["oracle"]["engine"]["ms_per_step"] for r in rs])})
    burn = [r for r in jobs.get("replay_s64_eng0-2_ws_late_burn_7c1", {}).get("runs", []) if "loaded" in r["oracle"]]
    big, big_plain, smoke = (jobs.get(f"{k}_cbusy10_eng0-1_ws_7c5", {}) for k in ("big", "big_plain", "smoke"))
    final = pairs.get("early_cb", {})
    return {"device": big.get("device"),
            "oracle_ceiling_ratio": round(statistics.median(final[64]), 3), "oracle_ceiling_pairs_64": len(final[64]),
            "oracle_ceiling_ratio_256": round(statistics.median(final[256]), 3),
            "oracle_ceiling_at_least_0_8": f"{sum(x >= 0.8 for x in final[64])} of {len(final[64])} pairs",
            "replays": rows, "pairs": pairs,
            "oracle_under_cpu_load": {"burn_cpus": jobs.get("replay_s64_eng0-2_ws_late_burn_7c1", {}).get("burn_cpus"),
                                      "oracle_step_ms": [r["oracle"]["engine"]["ms_per_step"] for r in burn],
                                      "loaded_step_ms": [r["oracle"]["loaded"]["engine"]["ms_per_step"] for r in burn]},
            "capacity_ratio_14b": _ratio(_tps(big, "ours_64"), _tps(big_plain, "plain_64")),
            "capacity_ratio_14b_256": _ratio(_tps(big, "ours_256"), _tps(big_plain, "plain_256")),
            "plain_14b": [_tps(big_plain, "plain_64"), _tps(big_plain, "plain_256")],
            "ours_14b": [_tps(big, "ours_64"), _tps(big, "ours_256")],
            "smoke_identical": [smoke.get("http_identical"), smoke.get("oracle_identical"), len(smoke.get("plain", []))],
            "real_edges_bi": _real_edges(jobs.get("edges_bi_triton_attn_7c7", {}))}


def _real_edges(e: dict) -> dict:
    """A real-edge run's exactness and acceptance (the edges job)."""
    probes = e.get("exactness_probes") or {}
    return {"lossless_prompts": e.get("lossless_prompts"), "lossless_identical": e.get("lossless_identical"),
            "identical_to_target_only_same_engine": (probes.get("plain_staggered") or {}).get("identical_to_edges"),
            "differs_from_target_only_same_engine": (probes.get("plain_staggered") or {}).get("differs_from_edges"),
            "identical_to_oracle_same_engine": (probes.get("oracle_staggered") or {}).get("identical_to_edges"),
            "tau": [e.get("tau_humaneval"), e.get("tau_mtbench")],
            "acceptance_rate": [e.get("acceptance_rate_humaneval"), e.get("acceptance_rate_mtbench")],
            "device": e.get("device")}


def h200_early_markdown(w: dict) -> str:
    rows = "\n".join(f"| {r['setting']} | {r['sessions']} | **{r['median']}** | {r['pairs']} | {r['min']}–{r['max']} | "
                     + " | ".join(str(r["ours"][k]) for k in EARLY_STATS) + f" | {r['oracle_step_ms']} |" for r in w["replays"])
    load, e = w["oracle_under_cpu_load"], w["real_edges_bi"]
    return f"""## Latest session: NVIDIA H200, early answers and where an engine step's time goes
Code b1bbdd9, one H200 machine (16 cores, no SMT), vLLM 0.26.0, every run over the WebSocket channel. Job
files `gpu_jobs/*_7c[1-6]*.json`, logs `gpu_logs/7c/`.

What is new:
* **Early answers** (`cloud.vllm.early_answers`, on by default): our scheduler subclass overrides
  `update_from_output`. After vLLM's own update (new tokens appended, stop conditions checked), it hands
  the step's new tokens to the DraftBoard and the answers are written to the front ends at once. Before,
  they waited for vLLM's output processing and the engine loop. The tokens are the same ones vLLM then
  returns.
* **Engine statistics** per step: the time after a step until its answers are written ("post"), the
  garbage collector's time, and per edge round the time from its answer to its next draft's posting
  ("edge cycle": answer out, the edge, the draft back), of which the last hop, front end to engine ("read").
* **`--burn-cpus`**: the oracle once more with the other CPUs kept busy by spinning processes.

### Headline (latest session)
* **oracle_ceiling_ratio (1.5B, 64 sessions): {w['oracle_ceiling_ratio']}**, the median of
  {w['oracle_ceiling_pairs_64']} back-to-back pairs in three device calls ({w['oracle_ceiling_at_least_0_8']} at 0.8 or above). Settings: early answers,
  WebSocket, engine alone on CPUs 0,1, and the harness's light clients polling their sockets for 10 ms
  after each round (`--client-busy-poll-ms 10`, as our front ends do) instead of sleeping in epoll.
  At 256 sessions: {w['oracle_ceiling_ratio_256']}. The pairs spread widely (table), so it is at the bar,
  not clear of it.
* **capacity_ratio_14b: {w['capacity_ratio_14b']}** with early answers (ours {w['ours_14b'][0]} tok/s, plain
  {w['plain_14b'][0]} in the same call); at 256: {w['capacity_ratio_14b_256']}.
* The smoke job (random 1.5B shape, early answers): {w['smoke_identical'][0]}/{w['smoke_identical'][2]} sessions over
  the WebSocket and {w['smoke_identical'][1]}/{w['smoke_identical'][2]} oracle sessions are token for token the
  same engine's plain greedy output.

### Real edges on this code (batch-invariant kernels)
`plain,edges --batch-invariant --attention TRITON_ATTN`: 64 prompts (32 HumanEval, 32 MT-Bench), 128 new
tokens, real llama.cpp 0.5B edges on the device's CPU (7 processes) over HTTP to our cloud.
* Greedy output identical, token for token, to vLLM target-only greedy on the same engine (our cloud's
  target-only path, the prompts arriving 7 at a time as the edges' did): **{e['identical_to_target_only_same_engine']}
  of {e['lossless_prompts']}** (differs: {', '.join(e['differs_from_target_only_same_engine'] or []) or 'none'}).
  Identical to the same engine fed oracle drafts of the edges' shape: {e['identical_to_oracle_same_engine']} of {e['lossless_prompts']}.
* Against a separate plain engine given all 64 prompts at once: {e['lossless_identical']} of {e['lossless_prompts']}, as in the
  earlier batch-invariant runs. vLLM's own target-only requests on our engine do not reproduce that reference
  either (the earlier sessions' sections show the near-ties where they part).
* τ {e['tau'][0]} (HumanEval) and {e['tau'][1]} (MT-Bench); acceptance {e['acceptance_rate'][0]} and {e['acceptance_rate'][1]}.

### The 1.5B oracle ceiling by setting
Engine columns are ours' medians, in ms: step, idle per step, post per step, GC per step, edge cycle per
round, read per round. The last column is the oracle's step.

| setting (all WebSocket) | sessions | median ratio | pairs | range | step | idle | post | GC | edge cycle | read | oracle step |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Reading it:
* **Early answers cut the idle time per step**, from 1.75 to 1.06 ms (engine on 0-2) and from 1.35 to
  0.81 ms (clients polling). "post" falls from about 0.2 to 0.02 ms. With the same settings back to back (clients polling), the median went from 0.76 (16 pairs) to
  0.82 (16 pairs).
* **Polling clients** add about 0.02–0.04 to the median. A client process that sleeps in epoll takes a
  while to wake on this VM (`common/busy_poll.py`), and at zero think time the step waits for the
  slowest one. This is a property of the harness: each replayed edge stands for a device of its own.
* **The step-time gap is not CPU contention.** The oracle with CPUs {load['burn_cpus']} kept busy stepped at
  {', '.join(map(str, load['loaded_step_ms']))} ms against {', '.join(map(str, load['oracle_step_ms']))} ms unloaded
  (the same pairs). Ours' and the oracle's step times both vary by ±10 % from run to run. That spread,
  not a fixed gap, is most of the noise in the pairs.
* **GC is not it either**: 0.01–0.04 ms per step, a few young-generation collections per run.
* What is left is the wire. An edge cycle takes 1.0–1.2 ms per round. About 0.4–0.6 ms of it is the
  last hop, from the front end's send to the engine thread's read: the engine reads its pipes only
  between steps, and the front end writes once per event-loop tick.
* More front ends (6) and more client processes (12) did not help.

### Commands (latest session)
```
python -m ablations.gpu_vllm run --jobs replay --sessions 64 --repeats 4 --ws --engine-cpus 0-2 --late-answers --burn-cpus 3-15 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --sessions 64 --repeats 4 --ws --engine-cpus 0-2 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --sessions 64,256 --repeats 10 --ws --engine-cpus 0-2 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --sessions 64 --repeats 10 --ws --engine-cpus 0-2 --late-answers --out $OUT
python -m ablations.gpu_vllm run --jobs replay --sessions 64 --repeats 10 --ws --engine-cpus 0-1 [--frontends 6 | --light-procs 12 | --client-busy-poll-ms 10] --out $OUT
python -m ablations.gpu_vllm run --jobs replay --sessions 64,256 --repeats 16 --ws --engine-cpus 0-1 --client-busy-poll-ms 10 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --sessions 64 --repeats 16 --ws --engine-cpus 0-1 --client-busy-poll-ms 10 --frontends 6 --out $OUT
python -m ablations.gpu_vllm run --jobs smoke,big_plain,big --ws --engine-cpus 0-1 --client-busy-poll-ms 10 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --sessions 64 --repeats 16 --ws --engine-cpus 0-1 --client-busy-poll-ms 10 [--late-answers] --out $OUT
# a second H200 machine, draft model and llama-cpp-python staged too (.stage_d01..09)
python -m ablations.gpu_vllm run --jobs plain,edges --batch-invariant --attention TRITON_ATTN --work /tmp/gpu_bi --out $OUT
```

"""


# --- the third H200 session: the WebSocket channel, the engine on its own CPUs, draft-ahead -----------
WS = "7b1"                 # job-file tag of that session (code 51da04e..8d6a533)
LOGS = RESULTS / "gpu_logs" / WS          # where the logs are unpacked (_sources sets it from the archive)
# replay settings: (label, group, job file or None, logs whose "replay N S: ... ratio R" lines hold pairs
# whose job file did not come back from the device: a comma in its name)
WS_REPLAYS = [("POST /v1/verify (as before)", "http", f"replay_s64_http_{WS}", []),
              ("WebSocket", "ws", f"replay_s64_ws_{WS}", []),
              ("WebSocket, no polling", "ws_busy0", f"replay_busy0_s64_ws_{WS}", []),
              ("WebSocket, engine alone on CPUs 0,1", "ws_eng", None, ["22_run_ws_eng.log", "23_run_ws_eng01.log"]),
              ("WebSocket, engine alone on CPUs 0-2", "ws_eng", f"replay_eng0-2_ws_{WS}", []),
              ("WebSocket + draft-ahead", "ws_ahead", f"replay_ws_ahead_{WS}", []),
              ("WebSocket, engine on 0,1, 8 front ends", "ws_eng_fe8", f"replay_fe8_s64_eng0_1_ws_{WS}_frontends8", []),
              ("WebSocket, engine on 0,1, 16 light-client processes", "ws_eng_lp16",
               f"replay_s64_eng0_1_ws_{WS}_lightprocs16", []),
              ("WebSocket, engine on 0,1, no polling", "ws_eng_busy0", f"replay_busy0_s64_eng0_1_ws_{WS}_busypollms0", [])]
WS_BIG = [("POST, no pinning", f"big_{WS}"), ("WebSocket", f"big_ws_{WS}"), ("POST, engine on 0,1", f"big_eng0_1_{WS}"),
          ("WebSocket, engine on 0,1", f"big_eng0_1_ws_{WS}_again")]


def _log_pairs(name: str) -> list[dict]:
    """(sessions, ratio) of each 'replay N S: ours A oracle B ratio R' line of a committed log."""
    import re
    out = []
    for line in (LOGS / name).read_text().splitlines():
        m = re.search(r"replay \d+ (\d+): ours ([\d.]+) oracle ([\d.]+) ratio ([\d.]+)", line)
        if m:
            out.append({"sessions": int(m[1]), "ratio": float(m[4]), "ours_tps": float(m[2]), "oracle_tps": float(m[3])})
    return out


def _log_value(name: str, pattern: str):
    import re
    m = re.search(pattern, (LOGS / name).read_text())
    return float(m[1]) if m else None


def h200_ws(jobs: dict) -> dict:
    pairs: dict = {}
    rows = []
    for label, group, job, logs in WS_REPLAYS:
        runs = jobs.get(job, {}).get("runs", []) if job else [r for n in logs for r in _log_pairs(n)]
        for s in sorted({r["sessions"] for r in runs}):
            rs = [r for r in runs if r["sessions"] == s]
            pairs.setdefault(group, {}).setdefault(s, []).extend(r["ratio"] for r in rs)
            eng = [(r["ours"]["engine"], r["oracle"]["engine"], r["ours"]) for r in rs if "ours" in r]
            rows.append({"setting": label, "sessions": s, "median": _median([r["ratio"] for r in rs]),
                         "pairs": [r["ratio"] for r in rs],
                         "step_ms": [_median([o["ms_per_step"] for o, _, _ in eng]), _median([q["ms_per_step"] for _, q, _ in eng])]
                         if eng else None,
                         "idle_ms_per_step": _median([round(1e3 * (w["wall_s"] - o["step_s"]) / max(o["steps"], 1), 2)
                                                      for o, _, w in eng]) if eng else None,
                         "stale_ahead": _median([w.get("stale_ahead") for _, _, w in eng]) if eng else None})
    plain64 = _log_value("23_run_big.log", r"14B plain 64: .*'tokens_per_s': ([\d.]+)")
    plain256 = _log_value("23_run_big.log", r"14B plain 256: .*'tokens_per_s': ([\d.]+)")
    big = [{"setting": label, "ours_64": _tps(jobs.get(k, {}), "ours_64"), "oracle_64": _tps(jobs.get(k, {}), "oracle_64"),
            "capacity_ratio_14b": _ratio(_tps(jobs.get(k, {}), "ours_64"), plain64),
            "capacity_ratio_14b_256": _ratio(_tps(jobs.get(k, {}), "ours_256"), plain256),
            "steps": ((jobs.get(k, {}).get("ours_64") or {}).get("engine") or {}).get("steps")} for label, k in WS_BIG]
    return {"oracle_ceiling_ratio": _median(pairs.get("ws_eng", {}).get(64, [])),
            "oracle_ceiling_ratio_256": _median(pairs.get("ws_eng", {}).get(256, [])),
            "oracle_ceiling_ratio_http_same_machine": _median(pairs.get("http", {}).get(64, [])),
            "oracle_ceiling_pairs": pairs, "replays": rows, "plain_14b": [plain64, plain256], "big_14b": big,
            "capacity_ratio_14b": _median([b["capacity_ratio_14b"] for b in big]),
            "big_14b_outlier": _ratio(_log_value("23_run_big.log", r"14B 64: ours ([\d.]+)"), plain64)}


def h200_ws_markdown(w: dict) -> str:
    rows = "\n".join(f"| {r['setting']} | {r['sessions']} | **{r['median']}** | {', '.join(map(str, r['pairs']))} | "
                     f"{' / '.join(map(str, r['step_ms'])) if r['step_ms'] else '(log only)'} | "
                     f"{r['idle_ms_per_step'] if r['idle_ms_per_step'] is not None else ''} | "
                     f"{r['stale_ahead'] or ''} |" for r in w["replays"])
    big = "\n".join(f"| {b['setting']} | {b['ours_64']} | **{b['capacity_ratio_14b']}** | {b['steps']} | {b['oracle_64']} | "
                    f"{b['capacity_ratio_14b_256']} |" for b in w["big_14b"])
    n = len(w["oracle_ceiling_pairs"].get("ws_eng", {}).get(64, []))
    return f"""## The session before: NVIDIA H200, a WebSocket verify channel, the engine on its own CPUs, draft-ahead
Code 51da04e..8d6a533, one H200 machine (16 cores, no SMT), vLLM 0.26.0. Job files `gpu_jobs/*_{WS}*.json`,
logs `gpu_logs/{WS}/`.

What is new:
* **`GET /v1/ws`**: verify rounds over one WebSocket per edge, with the same typed messages as
  `POST /v1/verify` (errors carry `status`). On the 2-CPU box, `python -m ablations.frontend_cost`
  puts the HTTP processes' CPU per round at 166–184 µs against 250–305 µs for the POST, and the
  simulated engine busy at 0.50 instead of 0.43 (`results/frontend_cost.md`). On the H200 the idle time
  per engine step at 64 sessions fell from 2.1–2.4 ms to 1.3–1.5 ms.
* **The engine process alone on its CPUs** (`--engine-cpus`). Ours' steps were slower than the oracle's
  on the same engine because the front ends and the harness's clients shared its cores.
* **Draft-ahead** (protocol `guess`): round r+1 sent while round r is in flight, verified only if r
  accepts its whole draft with the guessed next token, else 412. The board promotes it on the engine
  thread, with no wire in between. The drafter's guesses for the committed traces
  (`python -m ablations.trace_guesses`): 59 % of rounds would hit.

### Headline (that session)
* **oracle_ceiling_ratio (1.5B, 64): {w['oracle_ceiling_ratio']}**, the median of {n} pairs (WebSocket, engine alone on its CPUs);
  at 256: {w['oracle_ceiling_ratio_256']}. POST on the same machine: {w['oracle_ceiling_ratio_http_same_machine']}. **Still short of 0.8.**
* **capacity_ratio_14b: {w['capacity_ratio_14b']}** (median of the four runs below; plain {w['plain_14b'][0]} / {w['plain_14b'][1]} tok/s at 64 / 256).
  One earlier run in the same call gave {w['big_14b_outlier']} (log `23_run_big.log`, its job file did not come back). It was not reproduced in the
  four runs after it, including the same settings.

### The 1.5B oracle ceiling, pair by pair
"ms per step" is the median engine step for ours / oracle. "idle" is ours' wall time minus its step time,
per step. "stale" counts draft-ahead rounds answered 412 (a run has about 2,400 rounds at 64 sessions).

| setting | sessions | median | pairs | ms per step ours / oracle | idle ms per step | stale |
|---|---|---|---|---|---|---|
{rows}

Reading it:
* The WebSocket takes about 0.9 ms of idle out of each step (2.3 to 1.4 ms). Pinning the engine to its
  own CPUs did not close the step-time gap (ours 5.7 ms against the oracle's 4.9 ms, pinned to 0-2).
  The medians rise from 0.72 (POST) to 0.74 (WebSocket) and 0.77 (WebSocket, pinned), but the pairs
  spread from 0.69 to 0.92, so only the idle time is a clear gain.
* Draft-ahead does not pay at zero think time. At 64 sessions some session misses in every step, so
  the step still waits for a round trip, and the 412s add traffic. At 256 it made things worse. It is
  meant for edges far from the cloud, where a hit saves a whole RTT. This replay does not measure that.
* More front ends (8), more client processes (16) and no polling did not help.

### The 14B (64 sessions; plain from the same machine)
| run | ours, 64 | ÷ plain | engine steps | oracle, 64 | ours ÷ plain, 256 |
|---|---|---|---|---|---|
{big}

### Commands (that session; `--ws`, `--ahead`, `--engine-cpus` were new)
```
python -m ablations.trace_guesses ablations/results/gpu_traces15.json     # here, CPU: the drafter's guesses
python -m ablations.gpu_vllm run --jobs replay --repeats 4 --sessions 64 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --ws --repeats 4 --sessions 64 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --ws --ahead --repeats 4 --sessions 64,256 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --ws --busy-poll-ms 0 --repeats 4 --sessions 64 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --ws --engine-cpus 0,1 --repeats 4 (then 8) --sessions 64 --out $OUT
python -m ablations.gpu_vllm run --jobs replay --ws --engine-cpus 0-2 --repeats 6 --sessions 64,256 --out $OUT
python -m ablations.gpu_vllm run --jobs big_plain,big --ws --engine-cpus 0,1 --out $OUT
python -m ablations.gpu_vllm run --jobs big [--ws] [--engine-cpus 0,1] --out $OUT
python -m ablations.gpu_vllm run --jobs replay --ws --engine-cpus 0,1 [--frontends 8 | --light-procs 16 | --busy-poll-ms 0] --repeats 4 --sessions 64 --out $OUT
```

"""


def markdown(r: dict) -> str:
    h1 = r["h100_session"]
    j = r["jobs"]
    e, p, bp, b = j.get(f"edges_{CUR}", {}), j.get(f"plain_{CUR}", {}), j.get(f"big_plain_{CUR}", {}), j.get(BIG, {})
    e0, p0, e1, p1 = j.get("edges_nopad", {}), j.get("plain_nopad", {}), j.get("edges_6ba7fa9", {}), j.get("plain_6ba7fa9", {})
    e2, p2 = j.get(f"edges_{PREV}", {}), j.get(f"plain_{PREV}", {})
    bit, pbit, bi = j.get(BI, {}), j.get(f"plain_bi_triton_attn_{CUR}", {}), j.get("edges_bi_nopad", {})
    bit1 = j.get(f"edges_bi_triton_attn_{CUR}", {})
    rows = []

    def eng(job, key, field):
        return ((job.get(key) or {}).get("engine") or {}).get(field)

    def row(name, job, key, base=None):
        x = job.get(key) or {}
        t, lat = x.get("tokens_per_s"), x.get("round_ms_p50") or {}
        rows.append(f"| {name} | {t} | {_ratio(t, base) if base else ''} | {x.get('tau', '')} | "
                    f"{eng(job, key, 'steps') or ''} | {eng(job, key, 'ms_per_step') or ''} | "
                    f"{' / '.join(str(lat.get(k)) for k in ('client', 'handler', 'engine')) if lat else ''} |")
    for s in (64, 256):
        row(f"1.5B plain vLLM, {s} sessions", p, f"plain_{s}")
        row(f"1.5B ours (real-edge drafts replayed over HTTP), {s}", e, f"replay_{s}", _tps(p, f"plain_{s}"))
        row(f"1.5B same engine, oracle drafts of the same shape (no wire), {s}", e, f"oracle_{s}", _tps(p, f"plain_{s}"))
    row("1.5B ours with recorded draft time + 20 ms RTT, 64", e, "replay_timed_64", _tps(p, "plain_64"))
    for s in (64, 256):
        row(f"1.5B plain vLLM, batch-invariant + TRITON_ATTN, {s}", pbit, f"plain_{s}")
        row(f"1.5B ours, batch-invariant + TRITON_ATTN, {s}", bit1, f"replay_{s}", _tps(pbit, f"plain_{s}"))
        row(f"1.5B oracle, batch-invariant + TRITON_ATTN, {s}", bit1, f"oracle_{s}", _tps(pbit, f"plain_{s}"))
    for s in (64, 256):
        row(f"14B plain vLLM, {s}", bp, f"plain_{s}")
        row(f"14B ours, {s} (warm-up first, `{BIG[4:]}`)", b, f"ours_{s}", _tps(bp, f"plain_{s}"))
        row(f"14B oracle, {s}", b, f"oracle_{s}", _tps(bp, f"plain_{s}"))
    a = j.get("anchor", {})
    rows.append(f"| 1.5B + vLLM draft_model 0.5B (co-located anchor; an earlier session), 1 | {_tps(a, 'anchor_1')} | | | | | |")
    rows.append(f"| 1.5B + vLLM draft_model 0.5B, 64 (÷ that session's plain) | {_tps(a, 'anchor_64')} | "
                f"{_ratio(_tps(a, 'anchor_64'), _tps(p0, 'plain_64'))} | | | | |")
    hist = []
    for s in (64, 256):
        cells = []
        for ej, pj in ((e0, p0), (e1, p1), (e2, p2), (e, p)):
            cells.append(f"{_tps(ej, f'replay_{s}')} ({_ratio(_tps(ej, f'replay_{s}'), _tps(ej, f'oracle_{s}'))}; "
                         f"{_ratio(_tps(ej, f'replay_{s}'), _tps(pj, f'plain_{s}'))}) | {eng(ej, f'replay_{s}', 'ms_per_step')}")
        hist.append(f"| {s} | " + " | ".join(cells) + " |")
    bpg = j.get("big_plain_gathercall", {})
    gather = "\n".join(
        f"| {g} | {_tps(j.get(k, {}), 'ours_64')} | {_ratio(_tps(j.get(k, {}), 'ours_64'), _tps(bpg, 'plain_64'))} | "
        f"{eng(j.get(k, {}), 'ours_64', 'steps')} | {eng(j.get(k, {}), 'ours_64', 'ms_per_step')} | "
        f"{_ratio(_tps(j.get(k, {}), 'ours_64'), _tps(j.get(k, {}), 'oracle_64'))} | "
        f"{_tps(j.get(k, {}), 'ours_256')} ({_ratio(_tps(j.get(k, {}), 'ours_256'), _tps(bpg, 'plain_256'))}) |"
        for g, k in (("10 (then the default)", f"big_{PREV}"), ("20", "big_gather20"), ("30", "big_gather30"),
                     ("30, repeated", "big_gather30_repeat"), ("50", "big_gather50")))
    big_runs = "\n".join(
        f"| `{k[4:]}` | {_tps(j.get(k, {}), 'ours_64')} | {_ratio(_tps(j.get(k, {}), 'ours_64'), _tps(bp, 'plain_64'))} | "
        f"{eng(j.get(k, {}), 'ours_64', 'steps')} | {eng(j.get(k, {}), 'ours_64', 'ms_per_step')} | "
        f"{_ratio(_tps(j.get(k, {}), 'ours_64'), _tps(j.get(k, {}), 'oracle_64'))} | "
        f"{_tps(j.get(k, {}), 'ours_256')} ({_ratio(_tps(j.get(k, {}), 'ours_256'), _tps(bp, 'plain_256'))}) | {note} |"
        for k, note in (("big_1c31b49", "vLLM's rejection-sampler Triton kernel JIT-compiled inside the timed 64-session run (log: `jit_monitor` warning)"),
                        ("big_1c31b49_repeat", "same code, next run on the same machine (compiled kernel cached on disk)"),
                        (BIG, "an untimed 8-session warm-up replay first: the compile happens there")))
    fe = "\n".join(
        f"| {n} | `{k.rsplit('_', 1)[1]}` | " + " | ".join(
            f"{_tps(j.get(k, {}), f'replay_{s}')} / {_tps(j.get(k, {}), f'oracle_{s}')} = "
            f"**{_ratio(_tps(j.get(k, {}), f'replay_{s}'), _tps(j.get(k, {}), f'oracle_{s}'))}** | "
            f"{((j.get(k, {}).get(f'replay_{s}') or {}).get('round_ms_p50') or {}).get('client')} / "
            f"{eng(j.get(k, {}), f'replay_{s}', 'ms_per_step')}" for s in (64, 256)) + " |"
        for n, k in ((1, "edges_fe1_5f06a52"), (4, f"edges_{CUR}"), (8, "edges_fe8_5f06a52")))

    def probe_rows(job, label):
        out, pr = [], job.get("exactness_probes") or {}
        out.append(f"| {label} | real edges (our cloud) | {job.get('lossless_identical')}/64 | 64/64 (itself) |")
        for k, what in (("plain_staggered", "vLLM target-only, no drafts, 7 at a time (as the edges came)"),
                        ("oracle_staggered", "oracle drafts with the edges' accept pattern, 7 at a time"),
                        ("oracle_all", "oracle drafts with the edges' accept pattern, all 64 at once")):
            x = pr.get(k, {})
            te = x.get("identical_to_edges")
            out.append(f"| {label} | {what} | {x.get('identical')}/{x.get('prompts')} | "
                       f"{f'{te}/64' if te is not None else 'not recorded in this run'} |")
        return out
    probes = "\n".join(probe_rows(e, f"default kernels (`{CUR}`)") + probe_rows(bit, f"batch-invariant + TRITON_ATTN (`{BI.rsplit('_', 1)[1]}`)"))
    steps = "\n".join(f"| {x['change']} | `{x['commit']}` | {x['ours_ratio']} | {x['oracle_ratio']} | {x['steps']} |"
                       for x in r["steps_14b_64"])

    def divtable(job):
        return "\n".join(f"| {d['id']} | {d['position']} | {d['ref_top2_gap']} | {d['ref_token']} | {d['edge_token']} |"
                         for d in job.get("lossless_divergences", []))
    gaps = [d["ref_top2_gap"] for x in (e, bit) for d in x.get("lossless_divergences", []) if d["ref_top2_gap"] is not None]
    lat64 = (e.get("replay_64") or {}).get("round_ms_p50", {})
    c = r["batch_invariant_cost"]
    fr = r["frontends_1p5b"]
    runs14 = r["capacity_ratio_14b_runs"]
    return f"""# vLLM cloud on a GPU: in-engine design vs vLLM alone (issue 3)

Produced by `{REPORT_COMMAND}` from the job files that
`python -m ablations.gpu_vllm run --jobs ...` wrote on the device (job files and logs suffixed with the
code's commit; the `gpu_jobs/` and `gpu_logs/` named below are inside `gpu_vllm-logs.tar.xz`). The three H200 sessions come first (latest first); the sections after them are the
earlier sessions' H100 runs. The JSON's headline keys (`oracle_ceiling_ratio`, `capacity_ratio_14b`, ...)
carry the latest session's values; the H100 session's own are under `h100_session`.

{h200_early_markdown(r['h200_early'])}
{h200_ws_markdown(r['h200_ws'])}
{h200_markdown(j, r['h200'])}
Produced by `{REPORT_COMMAND}` from the job files that
`python -m ablations.gpu_vllm run --jobs ...` wrote on the device (commands at the end; the device logs
of this session's runs are in `gpu_logs/`, suffixed with the code's commit). Device: {r['device']},
vLLM {r['versions']['vllm']}, torch {r['versions']['torch']}. Engines run with CUDA graphs and no
torch.compile (`execution: graphs` = `compilation_config={{"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}`).
The in-engine design runs with the defaults: drafts padded to k (`cloud.vllm.pad_drafts`), the engine
in a child process (`cloud.vllm.engine_process`), 4 HTTP front-end processes on one port
(`cloud.vllm.frontends`), gathering by expected draft arrival with a window of one measured engine
step (`cloud.vllm.gather_ms: null`). Target: Qwen2.5-Coder-1.5B-Instruct Q4_K_M dequantized to bf16 on
the device; 14B: the Qwen2.5-14B shape with random weights (`load_format="dummy"`). 128 new tokens per
session, greedy, k = 4. Raw numbers: `gpu_vllm.json` and `gpu_jobs/`: job files are suffixed with the
commit of the code that produced them (`*_nopad` = `35639cc`; unsuffixed = earlier sessions: anchor,
baseline, smoke, TP=2). Each throughput row is one run. The 1.5B plain runs last under 2 s and move a
lot between sessions (64 sessions: {_tps(p0, 'plain_64')}, {_tps(p1, 'plain_64')}, {_tps(p2, 'plain_64')}, then {_tps(p, 'plain_64')} tok/s), so
the 1.5B capacity ratios carry that noise; the oracle ceiling compares two runs on one engine, seconds apart.

## What was real and what was replayed
* **Real edges** (lossless, tau, acceptance): 64 prompts (32 HumanEval, 32 MT-Bench first turns),
  each through our edge code (`edge/generator.py`: llama.cpp 0.5B drafter with confidence gating,
  aiohttp client) in 7 processes x 2 threads on the device's CPU, over HTTP on loopback to our cloud
  (aiohttp front ends + Verifier; `VllmEngineBackend` in the engine process: one long-lived vLLM
  request per session, drafts entering through the `EdgeDraftScheduler` scheduler_cls, vLLM's
  rejection sampler verifying).
* **Trace-driven edges** (capacity): light clients ({e.get('light_procs')} processes) replay the real
  edges' recorded drafts by output position over the same HTTP API, each session on its own keep-alive
  connection (as an edge device; it re-syncs after a 409 like the edge), with no think time (the
  engine is the bottleneck to measure) and, in one row, with each round's recorded draft time plus a
  20 ms emulated RTT. The clock starts when every client process has passed a start barrier.
* **Oracle** rows: the same engine and scheduler, drafts produced inside the scheduler at step time
  with the same per-round length and accepted count as the real trace (1.5B) or the 14B's own greedy
  output with every 4th token wrong (14B, as in the issue's probe); no HTTP, no parking.

## Headline numbers
| metric | value |
|---|---|
| lossless_identical / lossless_prompts: real edges vs a separate plain vLLM engine, all prompts batched at once (default kernels) | {r['lossless_identical']} / {r['lossless_prompts']} (HumanEval {e.get('identical_humaneval')}, MT-Bench {e.get('identical_mtbench')}) |
| same, `VLLM_BATCH_INVARIANT=1` and `attention_backend: TRITON_ATTN` | {r['lossless_identical_batch_invariant']} / {bit.get('lossless_prompts')} (HumanEval {bit.get('identical_humaneval')}, MT-Bench {bit.get('identical_mtbench')}) |
| **real edges vs vLLM target-only on the same engine, prompts arriving as the edges' did, batch-invariant + TRITON_ATTN (token for token)** | **{r['lossless_identical_batch_invariant_same_engine']} / 64** |
| vLLM target-only on our engine, 7 at a time, vs the separate reference (batch-invariant) | {(bit.get('exactness_probes') or {}).get('plain_staggered', {}).get('identical')} / 64 (the same prompts as the real edges) |
| our engine, oracle drafts, all 64 prompts at once, vs the real edges' output (batch-invariant) | {(bit.get('exactness_probes') or {}).get('oracle_all', {}).get('identical_to_edges')} / 64 |
| tau (HumanEval / MT-Bench) | {r['tau']['humaneval']} / {r['tau']['mtbench']} |
| acceptance_rate (HumanEval / MT-Bench) | {r['acceptance_rate']['humaneval']} / {r['acceptance_rate']['mtbench']} |
| capacity_ratio (1.5B, 64 sessions; 256) | {r['capacity_ratio']}; {r['capacity_ratio_256']} |
| **capacity_ratio_14b, default settings (64 sessions; 256)** | **{h1['capacity_ratio_14b']}**; {h1['capacity_ratio_14b_256']} (other runs of the same code at 64: {runs14['big_1c31b49']}, {runs14['big_1c31b49_repeat']}) |
| 14B oracle drafts in our engine ÷ plain (64) | {r['oracle_ratio_14b']} |
| oracle_ceiling_ratio (1.5B, 64; 256) | {h1['oracle_ceiling_ratio']}; {h1['oracle_ceiling_ratio_256']} |
| oracle_ceiling_ratio, 14B (64) | {r['oracle_ceiling_ratio_14b']} (other runs: {_ratio(_tps(j.get('big_1c31b49', {}), 'ours_64'), _tps(j.get('big_1c31b49', {}), 'oracle_64'))}, {_ratio(_tps(j.get('big_1c31b49_repeat', {}), 'ours_64'), _tps(j.get('big_1c31b49_repeat', {}), 'oracle_64'))}) |
| cost of batch-invariant kernels + TRITON_ATTN (tokens/s ÷ default; 64 / 256 sessions) | plain vLLM {c['plain_64']} / {c['plain_256']}; ours {c['ours_64']} / {c['ours_256']}; oracle {c['oracle_64']} / {c['oracle_256']} |
| verify_ms_p50, k=4 at 1k context, request-per-round design (reuse / no reuse; an earlier session) | {r['verify_ms_p50'].get('reuse')} / {r['verify_ms_p50'].get('no_reuse')} |
| TP=2 ({r['tp2']['device']}; an earlier session) | in-engine design ran: {r['tp2']['http_identical']}/8 HTTP sessions and {r['tp2']['oracle_identical']}/8 oracle sessions identical to plain (random-weight 1.5B shape) |

## Throughput (engine tokens/s)
"round ms" = p50 of one verify round as seen by the client / in the cloud's handler / inside the engine
(from the draft's arrival at the board to its result).

| run | tokens/s | ÷ plain | tau | engine steps | ms per step | round ms p50 |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

### HTTP front-end processes (1.5B, real-edge drafts replayed)
`cloud.vllm.frontends` processes serve the port (SO_REUSEPORT), each with its own pipe to the engine
process. Cells: ours / oracle = ceiling, then client round p50 ms / engine ms per step. The 4-process
row is the run in the table above; 1 and 8 ran minutes later on the same machine (`--frontends N`).

| front ends | code | 64 sessions | round / step ms | 256 sessions | round / step ms |
|---|---|---|---|---|---|
{fe}

### Exactness: where outputs part from the reference
The reference is a separate plain vLLM engine (no speculative config) given all 64 prompts at once.
The probes run on our cloud's engine right after the real edges, with no wire: "identical" counts
prompts equal to the reference (128 tokens); the last column counts prompts equal token for token to
the real edges' output.

| kernels | run | = reference | = real edges |
|---|---|---|---|
{probes}

With batch-invariant kernels the edge-cloud output is the target's own greedy output, token for token,
for all 64 prompts, when "the target's own" is vLLM target-only greedy on the same engine with the
prompts arriving as the edges' did. The 10 prompts that differ from the separate reference differ
there for vLLM itself: target-only requests on our engine, 7 at a time, differ from it on exactly
those prompts, and on one engine the outputs depend on how the prompts arrive (oracle drafts for all
64 at once agree with the 7-at-a-time outputs on {(bit.get('exactness_probes') or {}).get('oracle_all', {}).get('identical_to_edges')}/64), so no speculative system on vLLM
can match that reference better than vLLM matches itself. Every divergence, either kernel set,
is at a position where the reference's top-1/top-2 logprob gap is at most {max(gaps) if gaps else None}
(bf16 resolution there is 0.0625–0.125). With default kernels the probes show the same effect plus
the step shape (1 + k query tokens per request) rounding differently from one-token decode steps.

### The 14B at 64 sessions: this session's runs
÷ plain against this session's 14B plain run ({_tps(bp, 'plain_64')} tok/s at 64, {_tps(bp, 'plain_256')} at 256; earlier
sessions measured 4028.2, 4030.1 and 4034.8 at 64). Default settings (window = one measured step).

| run | ours, 64 | ÷ plain | engine steps | ms per step | ÷ oracle (same run) | ours, 256 (÷ plain) | note |
|---|---|---|---|---|---|---|---|
{big_runs}

### The 14B at 64 sessions, one change at a time
Ratios against this session's 14B plain run.

| change | commit | ours ÷ plain | oracle ÷ plain | engine steps (ours) |
|---|---|---|---|---|
{steps}

### The 14B: a fixed gather window (last session, `{PREV}`)
`python -m ablations.gpu_vllm run --jobs big --gather-ms G`, on one machine right after a `big_plain` run
({_tps(bpg, 'plain_64')} tok/s at 64, {_tps(bpg, 'plain_256')} at 256, the base here). The window is now one measured
step by default (about 31–36 ms on the 14B, 6 ms on the 1.5B), which is where this sweep peaked.

| gather_ms | ours, 64 | ÷ plain | engine steps | ms per step | ÷ oracle (same run) | ours, 256 (÷ plain) |
|---|---|---|---|---|---|---|
{gather}

### The 1.5B over four sessions
Each cell: ours tokens/s (÷ oracle of the same session; ÷ plain of the same session) | ms per engine step.

| sessions | `35639cc` (unpadded, engine in the HTTP process) | ms/step | `6ba7fa9` | ms/step | `{PREV}` | ms/step | `{CUR}` (this session) | ms/step |
|---|---|---|---|---|---|---|---|---|
""" + "\n".join(hist) + f"""

## Where the bar stands, and why
The bar: lossless ≥ 90 %, oracle_ceiling_ratio ≥ 0.8, capacity_ratio_14b ≥ 1.0.

* **capacity_ratio_14b: met with the default settings**, {h1['capacity_ratio_14b']} (the warmed run), {runs14['big_1c31b49']} and
  {runs14['big_1c31b49_repeat']} in the other two runs of the same code. The window of one measured step replaces the
  fixed 30 ms of the last session. At 256 sessions ours stays below plain ({h1['capacity_ratio_14b_256']}).
* **lossless: {r['lossless_identical_batch_invariant_same_engine']}/64 token for token against vLLM target-only on the same engine**
  (batch-invariant kernels + TRITON_ATTN); {r['lossless_identical_batch_invariant']}/64 against a separate engine given all
  prompts at once, which vLLM's own target-only output does not reproduce either (see Exactness).
  With default kernels: {r['lossless_identical']}/64, every divergence a near-tie.
* **oracle_ceiling_ratio (1.5B): not met, {h1['oracle_ceiling_ratio']} at 64 sessions** (last session 0.608), {h1['oracle_ceiling_ratio_256']} at
  256. The front ends were the limit: one HTTP process gives {fr[1][64]['ceiling']} / {fr[1][256]['ceiling']}, four give
  {fr[4][64]['ceiling']} / {fr[4][256]['ceiling']}, eight {fr[8][64]['ceiling']} / {fr[8][256]['ceiling']} (64 / 256 sessions). With four, the
  client's round ({lat64.get('client')} ms p50) is almost all engine-side ({lat64.get('engine')} ms from the draft's arrival at the
  board to its result, against a {eng(e, 'replay_64', 'ms_per_step')} ms step): a draft that arrives during a step
  waits for it to end, then for its own step. The oracle never waits: its drafts exist at schedule
  time. What is left is the wire's half step, not Python.

Divergences from the separate reference, default kernels (position = first differing output token; gap = reference top-1 minus top-2 logprob there):

| prompt | position | ref top-2 gap | ref token | ours |
|---|---|---|---|---|
{divtable(e)}

Divergences from the separate reference, `VLLM_BATCH_INVARIANT=1` + TRITON_ATTN (the same 10 prompts, positions and tokens as vLLM target-only on our engine):

| prompt | position | ref top-2 gap | ref token | ours |
|---|---|---|---|---|
{divtable(bit)}

## Commands (device calls, back to back on one warm machine)
Staging, per `shared/device/README.md`: `bash .vllm_g1/stash.sh`; `bash .vllm_g2/install.sh`; the
draft GGUF + llama-cpp-python wheel + diskcache wheel as `.stage_d01..09` and the target GGUF as
`.stage_01..18` (`split_files.py`), then `python3 -m pip install --no-deps --target /tmp/site /tmp/stage/wheels/*.whl`.
With `PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1` (and torch's lib folder on
`LD_LIBRARY_PATH` for llama.cpp's libgomp):
```
# this session (H100), in order on one machine; logs in gpu_logs/*_<commit>.log
python -m ablations.gpu_vllm run --jobs big_plain,big --tag 1c31b49 --out $OUT      # code 1c31b49
python -m ablations.gpu_vllm run --jobs plain,edges --tag 1c31b49 --out $OUT        # + profile_64_1c31b49.txt
python -m ablations.gpu_vllm run --jobs plain,edges --batch-invariant --attention TRITON_ATTN --work /tmp/gpu_bi --tag 1c31b49 --out $OUT
python -m ablations.gpu_vllm run --jobs edges --batch-invariant --attention TRITON_ATTN --work /tmp/gpu_bi --out $OUT   # code 5f06a52
python -m ablations.gpu_vllm run --jobs edges --frontends 1 --out $OUT               # code 5f06a52
python -m ablations.gpu_vllm run --jobs edges --frontends 8 --out $OUT               # code 5f06a52
python -m ablations.gpu_vllm run --jobs big --tag repeat --out $OUT                  # code 5f06a52 (big unchanged since 1c31b49)
python -m ablations.gpu_vllm run --jobs big --tag 2f82f19 --out $OUT                 # code 2f82f19 (warm-up)
# the last session (H100, code afee465): files *_afee465, big_gather*, big_plain_gathercall
python -m ablations.gpu_vllm run --jobs big_plain,big --out $OUT
python -m ablations.gpu_vllm run --jobs plain,edges --out $OUT
python -m ablations.gpu_vllm run --jobs plain,edges --batch-invariant --attention TRITON_ATTN --work /tmp/gpu_bi --out $OUT
python -m ablations.gpu_vllm run --jobs big_plain --out $OUT                         # job_big_plain_gathercall
python -m ablations.gpu_vllm run --jobs big --gather-ms G --out $OUT                 # G = 20, 30, 50, 30 again
# two sessions before (H100): steps/1..3b, then (6ba7fa9) the files suffixed _6ba7fa9
python -m ablations.gpu_vllm run --jobs smoke,big_plain,big --out $OUT               # steps/1 (611982f)
python -m ablations.gpu_vllm run --jobs big_plain,big --out $OUT                     # steps/2 (in-process)
python -m ablations.gpu_vllm run --jobs big --switch-ms 5 --out $OUT                 # steps/2b
python -m ablations.gpu_vllm run --jobs big --gather-ms 25 --out $OUT                # steps/2c
python -m ablations.gpu_vllm run --jobs smoke,big_plain,big --out $OUT               # steps/3, job_smoke (3fa2155)
python -m ablations.gpu_vllm run --jobs big --gather-ms 1 --out $OUT                 # steps/3b
python -m ablations.gpu_vllm run --jobs big_plain,big --out $OUT                     # job_big*_6ba7fa9
python -m ablations.gpu_vllm run --jobs plain,edges --out $OUT                       # job_plain/edges_6ba7fa9
# earlier (files *_nopad, anchor, baseline, plain_bi, edges_bi_nopad)
python -m ablations.gpu_vllm run --jobs anchor,baseline --out $OUT
python -m ablations.gpu_vllm run --jobs plain,edges --batch-invariant --work /tmp/gpu_bi --out $OUT
python -m ablations.gpu_vllm run --jobs smoke --tp 2 --out $OUT        # on nvidia-h200-x2
```
The 5f06a52 runs were started with `--tag $(git log -1 --format=%h)`, which on the device's copy of the
tree printed a stale commit; their files were renamed to the commit whose code ran. Device time this
session: about 13 minutes as counted (25 held), staging included.
"""


# ---- exact mode on the vLLM backend (issue 17): results/gpu_exact.{json,md} ----------------------
EXACT_SESSION = {        # the session that made the numbers (issue 17)
    "machine": "device kind nvidia-h200: one NVIDIA H200 (143771 MiB, driver 580.159.04, CUDA 13.0), "
               "16 CPU cores (Intel Xeon, no SMT), 128 GiB",
    "date": "2026-11-30, 08:21-08:39 UTC",
    "code": "branch main at 04ac50d plus the working tree's uncommitted issue-17 changes of that moment (cloud.exact in "
            "common/config.py and cloud/backends/base.py make_backend, by the engineer on issue 17) and this "
            "harness's --exact (ablations/gpu_vllm.py, committed with this report)",
    "device_time_s": 1074,
    "staging": "twice (the machine goes back 30 s after a call): .vllm_g1 (vLLM 0.26.0 trimmed wheel, part 1), "
               ".stage_01..18 (the 1.5B target GGUF from ~/.cache/tandem + the gguf 0.19.0 wheel, split_files.py), "
               ".vllm_g2 (install) - about 2.5 min of device time each, start included",
}
EXACT_COMMANDS = [
    "# here: build and split (shared/device/README.md); everything carried is in .git/info/exclude",
    "python3 ../shared/device/build_vllm_groups.py --out . --no-moe",
    "python3 -m pip download --no-deps --only-binary=:all: gguf==0.19.0 -d /tmp/gguf_whl",
    "python3 ../shared/device/split_files.py --out . --clean qwen/model.gguf=$HOME/.cache/tandem/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\",
    "    wheels/gguf-0.19.0-py3-none-any.whl=/tmp/gguf_whl/gguf-0.19.0-py3-none-any.whl",
    "# device, machine 1: carry .vllm_g1: bash .vllm_g1/stash.sh; carry .stage_NN: bash .stage_NN/append.sh (NN = 01..18); then",
    "# carry .vllm_g2:",
    "bash .vllm_g2/install.sh && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/stage/wheels/*.whl",
    "export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1",
    "python3 -u -m ablations.gpu_vllm run --jobs plain --repeats 5 --work /tmp/gw_def --tag x17 --out $OUT > $OUT/plain_default.log 2>&1",
    "python3 -u -m ablations.gpu_vllm run --jobs plain --exact --repeats 5 --work /tmp/gw_exact --tag x17 --out $OUT > $OUT/plain_exact.log 2>&1",
    "# next call, same machine:",
    "A=\"--jobs replay --sessions 64,256 --repeats 5 --ws --engine-cpus 0-1 --client-busy-poll-ms 10 --tag x17 --out $OUT\"",
    "python3 -u -m ablations.gpu_vllm run $A --work /tmp/gw_def > $OUT/replay_default.log 2>&1",
    "python3 -u -m ablations.gpu_vllm run $A --exact --work /tmp/gw_exact > $OUT/replay_exact.log 2>&1",
    "# device, machine 2 (staged again the same way), one call after install:",
    "for v in '--exact --variant default' '--exact --variant no_prefix_cache' '--exact --execution eager' \\",
    "         '--exact --variant no_chunked_prefill' '--variant default'; do",
    "  python3 -u -m ablations.gpu_vllm run --jobs invariance --tag x17 --out $OUT $v >> $OUT/invariance.log 2>&1; done",
    "# here:",
    "python -m ablations.gpu_vllm report-exact /work/.device/20 /work/.device/21 /work/.device/41   # the three calls' $OUT, as they came back",
]
EXACT_NOTES = [
    "## Reading it",
    "",
    "* **Cost.** With exact mode on, Tandem serves about 0.7 of its default tokens/s at 64 and 256 sessions; the",
    "  same engine fed the same drafts without the wire (oracle) about 0.65. Plain vLLM streaming loses more at",
    "  64 sessions (about 0.58) than at 256 (about 0.83), and a single stream (one run) at about 0.42. The cost",
    "  is the two settings together, batch-invariant kernels and TRITON_ATTN in place of FlashAttention (not",
    "  separated here):",
    "  Tandem's median engine step at 64 sessions goes from 6.4 to 9.5 ms, at 256 from 9.9 to 14.5 ms.",
    "  τ differs a little between the modes (2.79 default, 2.98 exact at 64 sessions): the drafts are the same",
    "  recorded ones, but the greedy outputs they are checked against differ at near-ties. A higher τ favours",
    "  exact mode slightly in these ratios.",
    "* **Exact mode does not make Tandem's greedy output equal vLLM target-only on this engine.** 1353 of 1600",
    "  replayed sessions (17 of the 64 prompts part somewhere in some run) against 1200 of 1600 (23 prompts) in",
    "  default mode. The oracle, without wire or edge code, parts the same way (1360/1600), so the cause is in",
    "  the engine's numerics, not in our protocol. Where they part, the plain engine's top-2 logprob gap is 0 to",
    "  0.125 (bf16 steps): near-ties.",
    "* **Why (the invariance probe).** vLLM alone, batch-invariant (`VLLM_BATCH_INVARIANT=1`, TRITON_ATTN), gives",
    "  the same greedy output for all 64 prompts at once, again, and one at a time (16/16): batch size does not",
    "  matter. But requests admitted while others decode (8 at a time, so a new request's prefill shares a",
    "  step with other requests' one-token decodes) part from it on 11 of 64 prompts, at the same prompts and",
    "  positions with CUDA graphs or eager and with or without prefix caching (12 of 64 without chunked",
    "  prefill). So in vLLM 0.26.0 on this machine, batch invariance holds across batch sizes but a decode",
    "  token's numbers change when its step also carries a multi-token query. Our reading (not isolated",
    "  further): the computation depends on the step's query lengths, and Tandem's verify steps always carry",
    "  1 + k query tokens per session where target-only decodes one, so a near-tie can round the other way.",
    "  The in-engine target-only runs agree: all at once vs 8 at a time, 53/64 identical in exact mode",
    "  (51/64 in default mode). Without batch invariance (last row of the probe) even one at a time",
    "  parts from all at once (15/16).",
    "* What exact mode on vLLM does give: the same output whatever the batch size when every step has the same",
    "  shape (one at a time = all at once, 16/16, against 15/16 without); repeating a run gave the same output in",
    "  both modes. It does not give issue 17's bit-for-bit equality with target-only. That needs the",
    "  verification forward to take the decode path's numerics (e.g. verify each draft token as a one-token",
    "  step, as the CPU backends' exact mode does), or an attention kernel invariant to query length.",
    "",
    "## What was and was not measured",
    "",
    "* Measured: the 1.5B target only (Qwen2.5-Coder-1.5B-Instruct Q4_K_M dequantized to bf16), greedy, 128 new",
    "  tokens, 64 prompts (32 HumanEval, 32 MT-Bench first turns: `results/gpu_prompts.json`). Tandem = our",
    "  cloud (`CloudNode`: engine process + 4 HTTP front ends, WebSocket verify channel) fed by light clients",
    "  replaying the real edges' recorded drafts (`results/gpu_traces15.json`, k up to 4) with no think time:",
    "  a capacity test of the cloud, not an end-to-end edge run. 64 and 256 sessions (the 64 traces cycled),",
    "  5 runs each, default and exact on two engines started one after the other on the same machine.",
    "* Plain vLLM: `LLMEngine` alone, all sessions added at once, 5 runs per session count (each under 2 s:",
    "  noisy; 64 sessions moved between 10.8k and 14.2k tok/s in default mode).",
    "* Not measured: real llama.cpp edges (no draft model staged), sampling, the 14B or any model other than",
    "  the 1.5B, RTT, the llama.cpp and torch backends' exact mode (CPU). The equality check compares against",
    "  vLLM target-only on the same engine and against a separate plain engine (its all-at-once references,",
    "  which the in-engine all-at-once target-only output matched 64/64 in both modes).",
]


def _exact_jobs(jobs: dict) -> dict:
    """{plain|replay: {default|exact: job}} from one session's job files (names from gpu_vllm.run_job)."""
    out = {"plain": {}, "replay": {}}
    for name, job in jobs.items():
        kind = name.split("_", 1)[0]
        if kind in out and "error" not in job:
            out[kind]["exact" if job.get("exact") else "default"] = job | {"job": name}
    return out


def _replay_row(job: dict, s: int) -> dict:
    runs = [r for r in job.get("runs", []) if r["sessions"] == s]
    return {"ours": _median([r["ours"]["tokens_per_s"] for r in runs]),
            "oracle": _median([r["oracle"]["tokens_per_s"] for r in runs]),
            "ours_runs": [r["ours"]["tokens_per_s"] for r in runs],
            "oracle_runs": [r["oracle"]["tokens_per_s"] for r in runs],
            "tau": _median([r["ours"]["tau"] for r in runs]),
            "ms_per_step": _median([r["ours"]["engine"].get("ms_per_step") for r in runs]),
            "oracle_ms_per_step": _median([r["oracle"]["engine"].get("ms_per_step") for r in runs]),
            "errors": sum(r["ours"]["errors"] for r in runs)}


def _invariance(jobs: dict) -> list[dict]:
    """The invariance jobs: per engine setting, identical counts against its own all-at-once run and
    against the batch-invariant default engine's all-at-once run (outputs not kept in the report)."""
    inv = {k: v for k, v in jobs.items() if k.startswith("invariance") and "outs" in v}
    base = next((v["outs"]["all"] for v in inv.values() if v.get("exact") and v["variant"] == "default"
                 and v.get("execution") == "graphs"), None)
    rows = []
    for name, v in sorted(inv.items()):
        o = v["outs"]
        rows.append({"job": name, "exact": v.get("exact"), "variant": v["variant"], "execution": v.get("execution"),
                     "attention_backend": v.get("attention_backend"),
                     **{k: v[k] for k in ("all_again_identical_to_all", "w8_identical_to_all", "w1_identical_to_all")},
                     "w8_parts_at": [[i, next(x for x in range(max(len(a), len(b))) if x >= min(len(a), len(b)) or a[x] != b[x])]
                                     for i, (a, b) in enumerate(zip(o["w8"], o["all"])) if a != b],
                     "all_identical_to_exact_default": f"{sum(a == b for a, b in zip(o['all'], base))}/{len(o['all'])}"
                     if base else None})
    return rows


def exact_report(dirs: list[Path]) -> int:
    jobs = _load(dirs)
    j = _exact_jobs(jobs)
    p, r = j["plain"], j["replay"]
    res = {"device": (r.get("exact") or p.get("exact") or {}).get("device"), **EXACT_SESSION,
           "versions": (r.get("exact") or {}).get("versions"), "plain": {}, "tandem": {}, "equality": {}, "jobs": {}}
    for mode in ("default", "exact"):
        if mode in p:
            res["plain"][mode] = {f"{s}": p[mode][f"plain_{s}"]["tokens_per_s"] for s in (64, 256)} | {
                "1": p[mode]["single_stream"]["tokens_per_s"],
                "runs": {f"{s}": p[mode].get(f"plain_{s}_runs") for s in (64, 256)}}
        if mode in r:
            sizes = sorted({x["sessions"] for x in r[mode].get("runs", [])})
            res["tandem"][mode] = {f"{s}": _replay_row(r[mode], s) for s in sizes}
            res["equality"][mode] = r[mode].get("equality")
        for kind in ("plain", "replay"):
            if mode in j[kind]:
                res["jobs"][j[kind][mode]["job"]] = j[kind][mode]
    res["exact_cost"] = {  # tokens/s in exact mode ÷ default, same machine, same prompts (and drafts)
        **{f"plain_{s}": _ratio(res["plain"].get("exact", {}).get(s), res["plain"].get("default", {}).get(s))
           for s in ("1", "64", "256")},
        **{f"tandem_{s}": _ratio((res["tandem"].get("exact", {}).get(s) or {}).get("ours"),
                                 (res["tandem"].get("default", {}).get(s) or {}).get("ours")) for s in ("64", "256")},
        **{f"oracle_{s}": _ratio((res["tandem"].get("exact", {}).get(s) or {}).get("oracle"),
                                 (res["tandem"].get("default", {}).get(s) or {}).get("oracle")) for s in ("64", "256")}}
    res["invariance"] = _invariance(jobs)
    res["jobs"].update({k: {x: y for x, y in v.items() if x != "outs"} for k, v in jobs.items() if k.startswith("invariance")})
    res["notes"], res["commands"] = EXACT_NOTES, EXACT_COMMANDS
    res = {k: res[k] for k in ("device", "exact_cost")} | res
    (RESULTS / "gpu_exact.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "gpu_exact.md").write_text(exact_markdown(res))
    print(json.dumps({k: res[k] for k in ("device", "exact_cost", "plain")}, indent=1))
    return 0


def exact_markdown(res: dict) -> str:
    pl, td, eq, c = res["plain"], res["tandem"], res["equality"], res["exact_cost"]
    L = ["# Exact mode on the vLLM backend: what it costs (issue 17)", "",
         "Produced by `python -m ablations.gpu_vllm report-exact DIR...` from the job files that the commands below",
         "wrote on the device (`job_*_x17.json`). Raw numbers: `gpu_exact.json` (the job files in full, the",
         "invariance probe's token outputs left out).", "",
         f"* Machine: {res.get('machine')}; GPU as vLLM saw it: {res.get('device')}; versions {res.get('versions')}.",
         f"* Date: {res.get('date')}. Device time: {res.get('device_time_s')} s of the session's 1800, staging included.",
         f"* Code: {res.get('code')}.", f"* Staging: {res.get('staging')}.",
         "* Exact mode = `cloud.exact: true` (`--exact`). For the vLLM backend `make_backend` sets",
         "  `VLLM_BATCH_INVARIANT=1` (inherited by the engine process) and the `TRITON_ATTN` attention backend.",
         "  Default mode = vLLM's default kernels (FLASH_ATTN, FA3). Target: Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
         "  dequantized to bf16 on the device; CUDA graphs (`execution: graphs`); greedy; 128 new tokens per session.",
         "  Checked in the device logs and job files: every exact run's engine says `Using AttentionBackendEnum.TRITON_ATTN",
         "  backend` and registers vLLM's batch-invariant kernels, and the Tandem exact job records",
         "  `VLLM_BATCH_INVARIANT=1` as make_backend left it (the harness set only `cloud.exact`); the default runs",
         "  chose FLASH_ATTN.",
         "", "## Throughput, default vs exact", "",
         "| what | sessions | default tok/s | exact tok/s | exact ÷ default |", "|---|---|---|---|---|"]
    for s in ("64", "256"):
        d, e = (td.get("default", {}).get(s) or {}), (td.get("exact", {}).get(s) or {})
        L.append(f"| **Tandem** (in-engine cloud, replayed edge drafts over the WebSocket) | {s} | {d.get('ours')} | "
                 f"{e.get('ours')} | **{c.get(f'tandem_{s}')}** |")
    for s in ("64", "256"):
        d, e = (td.get("default", {}).get(s) or {}), (td.get("exact", {}).get(s) or {})
        L.append(f"| same engine, oracle drafts of the same shape (no wire) | {s} | {d.get('oracle')} | "
                 f"{e.get('oracle')} | {c.get(f'oracle_{s}')} |")
    for s in ("64", "256", "1"):
        L.append(f"| **plain vLLM** streaming (no speculation) | {s} | {pl.get('default', {}).get(s)} | "
                 f"{pl.get('exact', {}).get(s)} | **{c.get(f'plain_{s}')}** |")
    L += ["", "Tandem and oracle figures are medians over the runs below (each run: every session generates 128",
          "tokens; tokens/s = all sessions' tokens ÷ wall time from the first request to the last answer).",
          "Plain figures are the median of the plain job's runs (each under 2 s: noisy).", "",
          "| mode | sessions | Tandem runs (tok/s) | oracle runs | τ (tokens per round) | engine ms/step (Tandem / oracle) |",
          "|---|---|---|---|---|---|"]
    for mode in ("default", "exact"):
        for s, row in (td.get(mode) or {}).items():
            L.append(f"| {mode} | {s} | {', '.join(map(str, row['ours_runs']))} | {', '.join(map(str, row['oracle_runs']))} "
                     f"| {row['tau']} | {row['ms_per_step']} / {row['oracle_ms_per_step']} |")
    for mode in ("default", "exact"):
        if pl.get(mode):
            L.append(f"\nPlain {mode} runs: 64 sessions {pl[mode]['runs']['64']}, 256 sessions {pl[mode]['runs']['256']}.")
    L += ["", "## Greedy equality: Tandem output vs vLLM target-only on the same engine", "",
          "After the timed runs, the same engine generates each of the 64 prompts target-only (our cloud's",
          "`/v1/generate` path: plain vLLM requests, no drafts), all 64 at once. Every session of every timed run",
          "(Tandem over the wire, and oracle) is compared with it token for token (128 tokens).", "",
          "| mode | Tandem sessions identical | oracle sessions identical | prompts with a divergence (Tandem) | "
          "target-only all-at-once = 8-at-a-time | target-only = separate plain engine |", "|---|---|---|---|---|---|"]
    for mode in ("default", "exact"):
        e = eq.get(mode)
        if e:
            L.append(f"| {mode} | **{e['ours']['identical']}/{e['ours']['sessions']}** | {e['oracle']['identical']}/"
                     f"{e['oracle']['sessions']} | {e['ours']['prompts_with_a_divergence']}/{e['prompts']} | "
                     f"{e['target_only_all_vs_8_at_a_time']}/{e['prompts']} | {e.get('target_only_vs_plain_engine')}/{e['prompts']} |")
    for mode in ("default", "exact"):
        e = eq.get(mode)
        if e and e["ours"]["divergences"]:
            L.append(f"\n{mode}, first divergences (session, position, plain engine's top-2 logprob gap there): " + "; ".join(
                f"{d['sid']} @ {d['position']} ({d['ref_top2_gap']})" for d in e["ours"]["divergences"][:12]))
    if res.get("invariance"):
        L += ["", "## Invariance probe: vLLM alone, greedy, the same 64 prompts at different concurrency", "",
              "One `LLMEngine` per row (no speculation): all 64 requests at once, all again, then at most 8 in vLLM",
              "at a time (a new one as each finishes: prefills share steps with other requests' decodes), then the",
              "first 16 one at a time. Counts: identical to the same engine's all-at-once output (128 tokens).", "",
              "| mode | engine setting | all again | 8 at a time | one at a time | all-at-once = exact/default row's |",
              "|---|---|---|---|---|---|"]
        for v in res["invariance"]:
            setting = v["variant"] + (", eager" if v["execution"] == "eager" else ", CUDA graphs")
            L.append(f"| {'exact' if v['exact'] else 'default'} | {setting} | {v['all_again_identical_to_all']} | "
                     f"{v['w8_identical_to_all']} | {v['w1_identical_to_all']} | {v['all_identical_to_exact_default']} |")
        ex = next((v for v in res["invariance"] if v["exact"] and v["variant"] == "default" and v["execution"] == "graphs"), None)
        if ex:
            L.append("\nExact mode, 8 at a time: (prompt index, first differing position) " +
                     ", ".join(f"({i}, {p})" for i, p in ex["w8_parts_at"]) + "; the same in the eager and no-prefix-cache rows.")
    L += ["", *res.get("notes", []), "", "## Commands", "", "```", *res.get("commands", []), "```", ""]
    return "\n".join(L)
