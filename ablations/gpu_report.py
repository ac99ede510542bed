"""Merge the GPU jobs' job_*.json (ablations/gpu_vllm.py) into results/gpu_vllm.json and .md."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _tps(job: dict, key: str):
    return (job.get(key) or {}).get("tokens_per_s")


STEPS = [  # the 14B at 64 sessions, one change at a time (job files in gpu_jobs/ and gpu_jobs/steps/)
    ("big_nopad", "previous session: drafts as gated (mixed lengths: no CUDA graph), engine thread in the HTTP process, fixed 1 ms gather", "35639cc"),
    ("big_gather10_nopad", "same, 10 ms gather", "35639cc"),
    ("steps/1_pad_inproc_gatherv0", "+ drafts padded to k: every spec step replays one CUDA graph", "611982f"),
    ("steps/2_pad_inproc_gatherv1", "+ gather by expected arrival (v1), GIL switch interval 0.5 ms", "3fa2155 (in-process)"),
    ("steps/2b_pad_inproc_gatherv1_switch5", "same, Python's default 5 ms switch interval", "3fa2155 (in-process)"),
    ("steps/2c_pad_inproc_gatherv1_gather25", "same, 25 ms gather window", "3fa2155 (in-process)"),
    ("steps/3_pad_proc_gatherv1", "+ engine in a child process (HTTP front end alone in the parent)", "3fa2155"),
    ("steps/3b_pad_proc_gatherv1_gather1", "same, 1 ms gather window", "3fa2155"),
    ("big", "+ the gather window opens when the engine is free (this session's final code)", "6ba7fa9"),
]


def _load(dirs: list[Path]) -> dict:
    jobs = {}
    for d in dirs:
        for f in sorted(d.glob("job_*.json")):
            jobs[f.stem[4:]] = json.loads(f.read_text())
        for f in sorted(d.glob("steps/*.json")):
            jobs[f"steps/{f.stem}"] = json.loads(f.read_text())
    return jobs


def report(dirs: list[Path]) -> int:
    jobs = _load(dirs)
    plain, edges, big, big_plain = (jobs.get(k, {}) for k in ("plain", "edges", "big", "big_plain"))
    bi = jobs.get("edges_bi_nopad", {})
    res = {
        "device": edges.get("device"), "versions": edges.get("versions"), "execution": edges.get("execution"),
        "pad_drafts": edges.get("pad_drafts"), "engine_process": True,
        "lossless_prompts": edges.get("lossless_prompts"), "lossless_identical": edges.get("lossless_identical"),
        "lossless_identical_batch_invariant_previous_session": bi.get("lossless_identical"),
        "tau": {s: edges.get(f"tau_{s}") for s in ("humaneval", "mtbench")},
        "acceptance_rate": {s: edges.get(f"acceptance_rate_{s}") for s in ("humaneval", "mtbench")},
        "capacity_ratio": _ratio(_tps(edges, "replay_64"), _tps(plain, "plain_64")),
        "capacity_ratio_256": _ratio(_tps(edges, "replay_256"), _tps(plain, "plain_256")),
        "capacity_ratio_14b": _ratio(_tps(big, "ours_64"), _tps(big_plain, "plain_64")),
        "capacity_ratio_14b_256": _ratio(_tps(big, "ours_256"), _tps(big_plain, "plain_256")),
        "oracle_ratio_14b": _ratio(_tps(big, "oracle_64"), _tps(big_plain, "plain_64")),
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
        "jobs": jobs,
    }
    (RESULTS / "gpu_vllm.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "gpu_vllm.md").write_text(markdown(res))
    print(json.dumps({k: v for k, v in res.items() if k != "jobs"}, indent=1))
    return 0


def markdown(r: dict) -> str:
    j = r["jobs"]
    e, p, bp, b = j.get("edges", {}), j.get("plain", {}), j.get("big_plain", {}), j.get("big", {})
    e0, p0, bp0 = j.get("edges_nopad", {}), j.get("plain_nopad", {}), j.get("big_plain_nopad", {})
    rows = []

    def row(name, job, key, base=None):
        x = job.get(key) or {}
        t, lat = x.get("tokens_per_s"), x.get("round_ms_p50") or {}
        rows.append(f"| {name} | {t} | {_ratio(t, base) if base else ''} | {x.get('tau', '')} | "
                    f"{x.get('engine', {}).get('steps', '')} | {x.get('engine', {}).get('ms_per_step', '')} | "
                    f"{' / '.join(str(lat.get(k)) for k in ('client', 'handler', 'engine')) if lat else ''} |")
    for s in (64, 256):
        row(f"1.5B plain vLLM, {s} sessions", p, f"plain_{s}")
        row(f"1.5B ours (real-edge drafts replayed over HTTP), {s}", e, f"replay_{s}", _tps(p, f"plain_{s}"))
        row(f"1.5B same engine, oracle drafts of the same shape (no wire), {s}", e, f"oracle_{s}", _tps(p, f"plain_{s}"))
    row("1.5B ours with recorded draft time + 20 ms RTT, 64", e, "replay_timed_64", _tps(p, "plain_64"))
    for s in (64, 256):
        row(f"14B plain vLLM, {s}", bp, f"plain_{s}")
        row(f"14B ours, {s}", b, f"ours_{s}", _tps(bp, f"plain_{s}"))
        row(f"14B oracle, {s}", b, f"oracle_{s}", _tps(bp, f"plain_{s}"))
    a = j.get("anchor", {})
    rows.append(f"| 1.5B + vLLM draft_model 0.5B (co-located anchor; previous session's plain), 1 | {_tps(a, 'anchor_1')} | | | | | |")
    rows.append(f"| 1.5B + vLLM draft_model 0.5B, 64 | {_tps(a, 'anchor_64')} | "
                f"{_ratio(_tps(a, 'anchor_64'), _tps(p0, 'plain_64'))} | | | | |")
    prev = []
    for s in (64, 256):
        prev.append(f"| 1.5B, {s} | {_tps(e0, f'replay_{s}')} ({_ratio(_tps(e0, f'replay_{s}'), _tps(p0, f'plain_{s}'))}x) | "
                    f"{_tps(e, f'replay_{s}')} ({r['capacity_ratio'] if s == 64 else r['capacity_ratio_256']}x) | "
                    f"{_tps(e0, f'oracle_{s}')} | {_tps(e, f'oracle_{s}')} | "
                    f"{(e0.get(f'replay_{s}') or {}).get('engine', {}).get('ms_per_step')} | {(e.get(f'replay_{s}') or {}).get('engine', {}).get('ms_per_step')} |")
    steps = "\n".join(f"| {x['change']} | `{x['commit']}` | {x['ours_ratio']} | {x['oracle_ratio']} | {x['steps']} |"
                       for x in r["steps_14b_64"])
    divs = "\n".join(f"| {d['id']} | {d['position']} | {d['ref_top2_gap']} | {d['ref_token']} | {d['edge_token']} |"
                     for d in e.get("lossless_divergences", []))
    bi = j.get("edges_bi_nopad", {})
    gaps = [d["ref_top2_gap"] for d in e.get("lossless_divergences", []) if d["ref_top2_gap"] is not None]
    lat64, lat14 = (e.get("replay_64") or {}).get("round_ms_p50", {}), (b.get("ours_64") or {}).get("round_ms_p50", {})
    return f"""# vLLM cloud on a GPU: in-engine design vs vLLM alone (issue 3)

Produced by `python -m ablations.gpu_report ablations/results/gpu_jobs` from the job files that
`python -m ablations.gpu_vllm run --jobs ...` wrote on the device (commands at the end). Device:
{r['device']}, vLLM {r['versions']['vllm']}, torch {r['versions']['torch']}. Engines run with CUDA graphs and
no torch.compile (`execution: graphs` = `compilation_config={{"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}`).
The in-engine design runs with this session's defaults: drafts padded to k (`cloud.vllm.pad_drafts`), the
engine in a child process (`cloud.vllm.engine_process`), gathering by expected draft arrival
(`cloud.vllm.gather_ms` 10). Target: Qwen2.5-Coder-1.5B-Instruct Q4_K_M dequantized to bf16 on the
device; 14B: the Qwen2.5-14B shape with random weights (`load_format="dummy"`). 128 new tokens per
session, greedy, k = 4. Raw numbers: `gpu_vllm.json` and `gpu_jobs/` (`*_nopad` = the previous
session's code). Each throughput row is one run. The 1.5B plain runs last under 1.1 s and moved
by up to 40 % between sessions (64 sessions: {_tps(p0, 'plain_64')} then {_tps(p, 'plain_64')} tok/s), so the 1.5B ratios carry that noise.

## What was real and what was replayed
* **Real edges** (lossless, tau, acceptance): 64 prompts (32 HumanEval, 32 MT-Bench first turns),
  each through our edge code (`edge/generator.py`: llama.cpp 0.5B drafter with confidence gating,
  aiohttp client) in 7 processes x 2 threads on the device's CPU, over HTTP on loopback to our cloud
  (aiohttp + Verifier in the parent; `VllmEngineBackend` in the engine process: one long-lived vLLM
  request per session, drafts entering through the `EdgeDraftScheduler` scheduler_cls, vLLM's
  rejection sampler verifying).
* **Trace-driven edges** (capacity): light clients (4 processes) replay the real edges' recorded drafts
  by output position over the same HTTP API, with no think time (the engine is the bottleneck to
  measure) and, in one row, with each round's recorded draft time plus a 20 ms emulated RTT.
* **Oracle** rows: the same engine and scheduler, drafts produced inside the scheduler at step time
  with the same per-round length and accepted count as the real trace (1.5B) or the 14B's own greedy
  output with every 4th token wrong (14B, as in the issue's probe); no HTTP, no parking.
* **A measurement bias against "ours", found after the run**: the light clients' wall time in these
  job files starts before their 4 processes are spawned and import their modules, which the oracle
  rows do not pay; how much that is on the device was not measured, and the GPU runs last
  2.2–5.6 s. `gpu_vllm.py` now
  starts the clock after a barrier that all client processes reach, but the numbers below were taken
  before that fix and were not re-run (the session's device time was spent). Read every "ours" row as
  a lower bound; the engine-side bound is in the step columns (the 14B, 64 sessions: {(b.get('ours_64') or {}).get('engine', {}).get('step_s')} s of engine steps
  for {(b.get('ours_64') or {}).get('tokens')} tokens, i.e. at most {round((b.get('ours_64') or {}).get('tokens', 0) / max((b.get('ours_64') or {}).get('engine', {}).get('step_s', 1), 1e-9))} tok/s if the engine never waited).

## Headline numbers
| metric | value |
|---|---|
| lossless_identical / lossless_prompts (default kernels) | {r['lossless_identical']} / {r['lossless_prompts']} (HumanEval {e.get('identical_humaneval')}, MT-Bench {e.get('identical_mtbench')}) |
| same with `VLLM_BATCH_INVARIANT=1` (previous session, unpadded) | {r['lossless_identical_batch_invariant_previous_session']} / {bi.get('lossless_prompts')} (HumanEval {bi.get('identical_humaneval')}, MT-Bench {bi.get('identical_mtbench')}) |
| tau (HumanEval / MT-Bench) | {r['tau']['humaneval']} / {r['tau']['mtbench']} |
| acceptance_rate (HumanEval / MT-Bench) | {r['acceptance_rate']['humaneval']} / {r['acceptance_rate']['mtbench']} |
| capacity_ratio (1.5B, 64 sessions; 256) | {r['capacity_ratio']}; {r['capacity_ratio_256']} |
| capacity_ratio_14b (64 sessions; 256) | {r['capacity_ratio_14b']}; {r['capacity_ratio_14b_256']} |
| 14B oracle drafts in our engine ÷ plain (64) | {r['oracle_ratio_14b']} |
| oracle_ceiling_ratio (1.5B, 64; 256) | {r['oracle_ceiling_ratio']}; {r['oracle_ceiling_ratio_256']} |
| oracle_ceiling_ratio, 14B (64) | {r['oracle_ceiling_ratio_14b']} |
| verify_ms_p50, k=4 at 1k context, request-per-round design (reuse / no reuse; previous session) | {r['verify_ms_p50'].get('reuse')} / {r['verify_ms_p50'].get('no_reuse')} |
| TP=2 ({r['tp2']['device']}; previous session) | in-engine design ran: {r['tp2']['http_identical']}/8 HTTP sessions and {r['tp2']['oracle_identical']}/8 oracle sessions identical to plain (random-weight 1.5B shape) |

## Throughput (engine tokens/s)
"round ms" = p50 of one verify round as seen by the client / in the cloud's handler / inside the engine
(from the draft's arrival at the board to its result).

| run | tokens/s | ÷ plain | tau | engine steps | ms per step | round ms p50 |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

### The 14B at 64 sessions, one change at a time
÷ plain against this session's 14B plain run ({_tps(bp, 'plain_64')} tok/s; the previous session's was {_tps(bp0, 'plain_64')}).

| change | commit | ours ÷ plain | oracle ÷ plain | engine steps (ours) |
|---|---|---|---|---|
{steps}

### The 1.5B, previous session (unpadded, engine in the HTTP process) vs now
| sessions | ours then | ours now | oracle then | oracle now | ms/step then | ms/step now |
|---|---|---|---|---|---|---|
""" + "\n".join(prev) + f"""

## Where the bar stands, and why
The bar: lossless ≥ 90 %, oracle_ceiling_ratio ≥ 0.8, capacity_ratio_14b ≥ 1.0. Met: the in-engine
design works end to end with real edges, and with TP=2 (previous session). Not met: the other three,
though this session moved all of the throughput figures.

* **Padding made spec steps CUDA graphs.** The 1.5B step at 64 sessions went from
  {(e0.get('replay_64') or {}).get('engine', {}).get('ms_per_step')} ms to {(e.get('replay_64') or {}).get('engine', {}).get('ms_per_step')} ms, and the same-shape oracle rose
  from {_tps(e0, 'oracle_64')} to {_tps(e, 'oracle_64')} tok/s. `profile_64.txt` (the engine thread during a 64-session replay)
  no longer shows the model running op by op: the top entry is the `.cpu()` copy that waits for the GPU.
* **Batching now matches the oracle; the wire sets the pace.** At 64 sessions the 1.5B replay takes
  {(e.get('replay_64') or {}).get('engine', {}).get('steps')} engine steps against the oracle's {(e.get('oracle_64') or {}).get('engine', {}).get('steps')}, so the steps are as full as the oracle's. But a round costs
  {lat64.get('client')} ms at the client (p50), {lat64.get('engine')} ms of it inside the engine process (gather + step +
  handing the result back), against a {(e.get('replay_64') or {}).get('engine', {}).get('ms_per_step')} ms step. The engine is idle while
  drafts travel. On the 14B the round is {lat14.get('client')} ms against a {(b.get('ours_64') or {}).get('engine', {}).get('ms_per_step')} ms step. Part of the remaining gap is the
  measurement bias above.
* **What did not help:** the GIL switch interval (0.5 ms vs 5 ms) and the gather window length, taken
  alone; see the table of changes. Moving the engine to its own process helped a little. The gather fix
  helped most: a draft that arrived during a step used to start the next step at once, nearly empty.
* **Not lossless on the GPU, and the divergences are near-ties.** Every divergence comes at a position
  where vLLM's own reference has a top-1/top-2 logprob gap of at most {max(gaps) if gaps else None} (bf16 logprob resolution
  is 0.0625 there). Verification runs 1 + k query tokens per request, and the reference decodes one
  token per step. The kernels round differently for those shapes. Batch-invariant kernels (previous
  session) lifted identity from 49 to {r['lossless_identical_batch_invariant_previous_session']} of 64 but do not make the two shapes equal. vLLM's own
  draft-model speculation does no better: {r['anchor_draft_model'].get('identical_to_plain')} identical to plain vLLM.
* **Next:** re-measure with the barrier-timed clients (one device call with the vLLM kit only for the
  14B); send the tokens a padded slot got accepted back in the same response (they now come back in
  the next round, via alignment by content); several HTTP front-end processes for the 1.5B, whose
  6 ms step cannot be fed by one Python process; batch-invariant kernels with padded steps.

Divergences, default kernels (position = first differing output token; gap = reference top-1 minus top-2 logprob there):

| prompt | position | ref top-2 gap | ref token | ours |
|---|---|---|---|---|
{divs}

## Commands (device calls, back to back on one warm machine)
Staging, per `shared/device/README.md`: `bash .vllm_g1/stash.sh`; `bash .vllm_g2/install.sh`; the
draft GGUF + llama-cpp-python wheel + diskcache wheel as `.stage_d01..09` and the target GGUF as
`.stage_01..18` (`split_files.py`), then `python3 -m pip install --no-deps --target /tmp/site /tmp/stage/wheels/*.whl`.
With `PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1` (and torch's lib folder on
`LD_LIBRARY_PATH` for llama.cpp's libgomp):
```
# this session (H100), in order
python -m ablations.gpu_vllm run --jobs smoke,big_plain,big --out $OUT               # steps/1 (611982f)
python -m ablations.gpu_vllm run --jobs big_plain,big --out $OUT                     # steps/2 (in-process)
python -m ablations.gpu_vllm run --jobs big --switch-ms 5 --out $OUT                 # steps/2b
python -m ablations.gpu_vllm run --jobs big --gather-ms 25 --out $OUT                # steps/2c
python -m ablations.gpu_vllm run --jobs smoke,big_plain,big --out $OUT               # steps/3, job_smoke (3fa2155)
python -m ablations.gpu_vllm run --jobs big --gather-ms 1 --out $OUT                 # steps/3b
python -m ablations.gpu_vllm run --jobs big_plain,big --out $OUT                     # job_big* (6ba7fa9)
python -m ablations.gpu_vllm run --jobs plain,edges --out $OUT                       # job_plain, job_edges (6ba7fa9)
# previous session (files *_nopad, anchor, baseline, plain_bi)
python -m ablations.gpu_vllm run --jobs anchor,baseline --out $OUT
python -m ablations.gpu_vllm run --jobs plain,edges --batch-invariant --work /tmp/gpu_bi --out $OUT
python -m ablations.gpu_vllm run --jobs smoke --tp 2 --out $OUT        # on nvidia-h200-x2
```
(Steps 1–3b ran before the job names carried `--in-process`; their files were renamed into `steps/`.)
Device time this session: about 28 minutes, staging included.
"""
