"""More HTTP front ends for one engine process (`cloud.vllm.frontends`, in-engine vLLM design).

One Python process parses, validates and answers every verify round: about 130 µs of CPU a round
(`ablations/frontend_cost.py`), so 64 sessions in lock step cost ~9 ms of serial Python per engine
step, more than the 1.5B target's 6 ms step on an H100. Here front end 0 is the cloud's own process
and each other front end is a spawned process serving the same host:port (SO_REUSEPORT: the kernel
spreads connections over them) with its own Verifier and its own pipe to the engine process.

Sessions are sticky by connection: an edge keeps one keep-alive connection. If an edge's connection
lands on another front end, that one does not know the session: 409, the edge re-syncs (its whole
context, base_len=0), and the engine process finds its request still holding that context, so the
re-sync costs no prefill. The engine process gives each session to the front end that last sent it
a round, so the stale copy left on the old front end cannot drop the request when it expires there.
/stats and /metrics report the front end that answers them.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp

log = logging.getLogger("tandem.cloud")


def start_frontends(engine, cfg, host: str, port: int) -> list:
    """Spawn a front end for each of engine.frontend_conns (a VllmEngineProcess), serving host:port
    next to this process; returns the processes once all of them listen."""
    ctx = mp.get_context("spawn")
    procs, ready = [], []
    for conn in getattr(engine, "frontend_conns", []):
        ev = ctx.Event()
        p = ctx.Process(target=serve_frontend, args=(conn, engine.hello, cfg, host, port, ev), daemon=True,
                        name="tandem-frontend")
        p.start()
        procs.append(p)
        ready.append(ev)
    for p, ev in zip(procs, ready):
        if not ev.wait(60):
            stop_frontends(procs)
            raise RuntimeError(f"a front-end process did not start (exit code {p.exitcode})")
    return procs


def stop_frontends(procs: list) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(timeout=10)


def serve_frontend(conn, hello: dict, cfg, host: str, port: int, ready) -> None:
    asyncio.run(_serve(conn, hello, cfg, host, port, ready))


async def _serve(conn, hello, cfg, host, port, ready) -> None:
    from cloud.backends.vllm_engine_process import EngineClient
    from cloud.server import start_cloud
    from cloud.verifier import Verifier
    stop = asyncio.get_running_loop().create_future()
    backend = EngineClient(conn, hello, on_eof=lambda: stop.done() or stop.set_result(None),
                           busy_poll_s=cfg.cloud.vllm.busy_poll_ms / 1e3)
    backend._wire.attach()
    runner, _ = await start_cloud(Verifier(backend, cfg.cloud, cfg.switches), cfg, host, port, reuse_port=True)
    ready.set()
    await stop                              # the engine process went away
    await runner.cleanup()
