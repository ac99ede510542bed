"""What one verify round costs our cloud's Python, outside the GPU (CPU only, no vLLM).

The real front end (aiohttp server + Verifier, `cloud/server.py`), the real engine-process boundary
(`VllmEngineProcess`: a spawned child behind one Pipe) and the real DraftBoard gather policy, with a
simulated engine in the child: each step sleeps a fixed time (the GPU's share) and its target says
last + 1, so every draft of the light clients (the GPU script's trace-driven clients) is accepted.
Reports the CPU time per round of the HTTP process and of the engine process, and what fraction of
the wall the simulated engine was stepping (1.0 = the wire never made it wait).

  python -m ablations.frontend_cost [--sessions 64] [--step-ms 6.6] [--clients 1]
writes results/frontend_cost.json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path

from cloud.backends.simulated_engine import SimulatedEngine, target_token

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 1000


def simulated_engine(gguf, cfg, n_ctx, cache):
    """Factory for VllmEngineProcess (runs in the child): the step time travels in cfg.model_dir."""
    return SimulatedEngine(VOCAB, 4096, float(cfg.model_dir) / 1e3, cfg.gather_ms, max_inflight=256)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(sessions: int, step_ms: float, clients: int, frontends: int, n_new: int = 120,
                  prompt_len: int = 400, busy_poll_ms: float = 0.0, ws: bool = False) -> dict:
    from ablations.gpu_vllm import run_light, summary
    from cloud.backends.vllm_engine_process import VllmEngineProcess
    from cloud.node import CloudNode
    from common.config import load_config
    cfg = load_config(overrides={"cloud.backend": "vllm", "cloud.port": 0, "cloud.max_sessions": 4096,
                                 "cloud.vllm.model_dir": str(step_ms), "cloud.vllm.frontends": frontends,
                                 "cloud.vllm.busy_poll_ms": busy_poll_ms})
    backend = VllmEngineProcess(None, cfg.cloud.vllm, 4096, factory=simulated_engine)
    node = await CloudNode.start(cfg, backend=backend)
    pids = [p.pid for p in node._frontends]
    try:
        ss = []
        for i in range(sessions):
            prompt = [(100 + i + j) % VOCAB for j in range(1 - prompt_len, 1)]
            ref = prompt[-2:]
            while len(ref) < n_new + 10:
                ref.append(target_token(ref[-2], ref[-1], VOCAB))
            ref = ref[2:]
            ss.append({"prompt": prompt, "fallback": ref, "trace": {str(j): [ref[j:j + 4], 0.0] for j in range(n_new)},
                       "sid": f"s{i}"})
        await backend.engine_stats()
        front0 = time.process_time() + sum(_cpu_s(p) for p in pids)
        child0 = _cpu_s(backend._proc.pid)
        res, wall = await asyncio.to_thread(run_light, url := node.url, ss, n_new, clients, busy_poll_ms=busy_poll_ms,
                                            ws=ws)
        front_s = time.process_time() + sum(_cpu_s(p) for p in pids) - front0
        child_s = _cpu_s(backend._proc.pid) - child0
        st, eng = summary(res, wall), await backend.engine_stats()
    finally:
        await node.close()
    rounds = st["rounds"]
    return {"sessions": sessions, "step_ms": step_ms, "client_processes": clients, "frontends": frontends,
            "transport": "websocket" if ws else "http",
            "busy_poll_ms": busy_poll_ms,
            "url": url, "rounds": rounds, "wall_s": st["wall_s"], "engine_steps": eng["steps"],
            "engine_busy": round(eng["stepping_s"] / max(wall, 1e-9), 3),
            "http_processes_us_per_round": round(1e6 * front_s / rounds),
            "engine_process_us_per_round": round(1e6 * child_s / rounds),
            "round_ms_p50": st["round_ms_p50"], "errors": st["errors"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--step-ms", type=float, default=6.6, help="simulated engine step (the 1.5B's on the H100)")
    ap.add_argument("--clients", type=int, default=1, help="light-client processes")
    ap.add_argument("--frontends", default="1,4", help="HTTP front-end processes (cloud.vllm.frontends), a list")
    ap.add_argument("--transports", default="http,ws", help="how rounds travel: POST /v1/verify (http), /v1/ws (ws)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    runs = [asyncio.run(measure(args.sessions, args.step_ms, args.clients, int(f), ws=t == "ws"))
            for t in args.transports.split(",") for f in args.frontends.split(",") for _ in range(args.repeats)]
    res = {"command": f"python -m ablations.frontend_cost --sessions {args.sessions} --step-ms {args.step_ms} "
                      f"--clients {args.clients} --frontends {args.frontends} --transports {args.transports} "
                      f"--repeats {args.repeats}",
           "cpus": os.cpu_count(), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frontend_cost.json").write_text(json.dumps(res, indent=1))
    lines = ["# Front-end cost per verify round (CPU, simulated engine)", "", f"`{res['command']}` on {res['cpus']} CPUs.",
             "", "| transport | front ends | rounds | engine steps | engine busy | HTTP processes µs/round (all) | engine process µs/round | round ms p50 client/handler/engine |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lat = r["round_ms_p50"]
        lines.append(f"| {r['transport']} | {r['frontends']} | {r['rounds']} | {r['engine_steps']} | {r['engine_busy']} | {r['http_processes_us_per_round']} | "
                     f"{r['engine_process_us_per_round']} | {lat['client']} / {lat['handler']} / {lat['engine']} |")
    (RESULTS / "frontend_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
