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

from cloud.backends.base import Backend, SessionEnded
from cloud.backends.draft_board import PARK, DraftBoard, Round, Slot

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 1000


class SimulatedEngine(Backend):
    """The in-engine backend's shape (board, sessions, averify) around a sleeping step."""
    name, n_vocab, n_ctx, verifies, max_inflight = "simulated", VOCAB, 4096, True, 256

    def __init__(self, step_ms: float, gather_ms: float):
        self.board = DraftBoard(60.0, gather_ms, pad=True)
        self.sessions: dict[str, str] = {}
        self.step_s, self.steps, self.stepping_s = step_ms / 1e3, 0, 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def set_order(self, key):
        self.board.order_key = key

    def logits(self, *a):
        raise NotImplementedError

    def _run(self):
        while True:
            go, wait = self.board.ready(time.monotonic())
            if not go:
                self.board.wake.wait(wait)
                self.board.wake.clear()
                continue
            work = [(rid, spec) for rid, slot in list(self.board.slots.items())
                    if not slot.finished and (spec := self.board.spec_for(rid, slot.tokens, 4)) not in (PARK, None)]
            t0 = time.perf_counter()
            time.sleep(self.step_s)
            self.stepping_s += time.perf_counter() - t0
            self.steps += 1
            for rid, spec in work:
                out, last = [], self.board.slots[rid].tokens[-1]
                for t in spec:
                    if t != (last + 1) % VOCAB:
                        break
                    out.append(t)
                    last = t
                out.append((last + 1) % VOCAB)
                self.board.produced(rid, out, False)

    async def averify(self, sid, context, draft, sampling, rtt_ms, reuse):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(res, exc):
            if not fut.done():
                fut.set_exception(exc) if exc else fut.set_result(res)
        rnd = Round(len(context), list(draft), time.monotonic(),
                    on_done=lambda a, t: loop.call_soon_threadsafe(settle, (a, t), None),
                    on_error=lambda m: loop.call_soon_threadsafe(settle, None, SessionEnded(m)))
        rid = self.sessions.get(sid)
        if not self.board.holds(rid, context):
            rid = self.sessions[sid] = f"{sid}-{len(context)}"
            self.board.open(Slot(rid, "edge", list(context)))
        self.board.post(rid, rnd, rtt_ms)
        a, t = await fut
        return a, t, 0

    async def engine_stats(self) -> dict:
        st = {"steps": self.steps, "stepping_s": round(self.stepping_s, 3)}
        self.steps, self.stepping_s = 0, 0.0
        return st

    def drop(self, sid):
        rid = self.sessions.pop(sid, None)
        if rid:
            self.board.close(rid)


def simulated_engine(gguf, cfg, n_ctx, cache):
    """Factory for VllmEngineProcess (runs in the child): step time in cfg.model_dir."""
    return SimulatedEngine(float(cfg.model_dir), cfg.gather_ms)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(sessions: int, step_ms: float, clients: int, n_new: int = 120, prompt_len: int = 400) -> dict:
    from ablations.gpu_vllm import run_light, summary
    from cloud.backends.vllm_engine_process import VllmEngineProcess
    from cloud.server import start_cloud
    from cloud.verifier import Verifier
    from common.config import load_config
    cfg = load_config(overrides={"cloud.max_sessions": 4096, "cloud.vllm.model_dir": str(step_ms)})
    backend = VllmEngineProcess(None, cfg.cloud.vllm, 4096, factory=simulated_engine)
    runner, url = await start_cloud(Verifier(backend, cfg.cloud, cfg.switches), cfg, "127.0.0.1", 0)
    try:
        ss = []
        for i in range(sessions):
            ref = [(101 + i + j) % VOCAB for j in range(n_new + 8)]
            ss.append({"prompt": [(100 + i + j) % VOCAB for j in range(1 - prompt_len, 1)], "fallback": ref,
                       "trace": {str(j): [ref[j:j + 4], 0.0] for j in range(n_new)}, "sid": f"s{i}"})
        await backend.engine_stats()
        parent0, child0 = time.process_time(), _cpu_s(backend._proc.pid)
        res, wall = await asyncio.to_thread(run_light, url, ss, n_new, clients)
        parent_s, child_s = time.process_time() - parent0, _cpu_s(backend._proc.pid) - child0
        st, eng = summary(res, wall), await backend.engine_stats()
    finally:
        await runner.cleanup()
        backend.close()
    rounds = st["rounds"]
    return {"sessions": sessions, "step_ms": step_ms, "client_processes": clients, "rounds": rounds,
            "wall_s": st["wall_s"], "engine_steps": eng["steps"],
            "engine_busy": round(eng["stepping_s"] / max(wall, 1e-9), 3),
            "http_process_us_per_round": round(1e6 * parent_s / rounds),
            "engine_process_us_per_round": round(1e6 * child_s / rounds),
            "round_ms_p50": st["round_ms_p50"], "errors": st["errors"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--step-ms", type=float, default=6.6, help="simulated engine step (the 1.5B's on the H100)")
    ap.add_argument("--clients", type=int, default=1, help="light-client processes")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    runs = [asyncio.run(measure(args.sessions, args.step_ms, args.clients)) for _ in range(args.repeats)]
    res = {"command": f"python -m ablations.frontend_cost --sessions {args.sessions} --step-ms {args.step_ms} "
                      f"--clients {args.clients} --repeats {args.repeats}", "cpus": os.cpu_count(), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frontend_cost.json").write_text(json.dumps(res, indent=1))
    lines = ["# Front-end cost per verify round (CPU, simulated engine)", "", f"`{res['command']}` on {res['cpus']} CPUs.",
             "", "| run | rounds | engine steps | engine busy | HTTP process µs/round | engine process µs/round | round ms p50 client/handler/engine |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        lat = r["round_ms_p50"]
        lines.append(f"| {i} | {r['rounds']} | {r['engine_steps']} | {r['engine_busy']} | {r['http_process_us_per_round']} | "
                     f"{r['engine_process_us_per_round']} | {lat['client']} / {lat['handler']} / {lat['engine']} |")
    (RESULTS / "frontend_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
