"""The in-engine vLLM design with the engine in its own process (`cloud.vllm.engine_process: true`).

Why a second process: the engine thread runs vLLM's Python between GPU kernels and the aiohttp loop
parses, validates and answers every round. In one process they share one GIL, so each stalls the
other: measured on the 14B with 64 sessions, a step carrying a third of the sessions took longer
than an oracle step carrying all of them. Here the front end (HTTP, JSON, validation, sessions:
`cloud/server.py` + `cloud/verifier.py`, unchanged) stays in the parent and the child owns the
engine, the DraftBoard and the scheduler plug-ins (`VllmEngineBackend`, unchanged, with its engine
core in the child: VLLM_ENABLE_V1_MULTIPROCESSING=0 there).

The boundary is one multiprocessing Pipe per front end (this process is front end 0; more front-end
processes on the same port: cloud/frontends.py). A front end sends at most one pickled list of
messages per event-loop tick, so a burst of rounds crosses as one write (drafts are batched across
sessions). In the engine process the engine thread itself reads the pipes between steps
(`EnginePort`): a held round goes from the pipe to the board and its answer from the step's output
to the pipe, one write per pipe per step, with no hand-off to another thread; everything else goes
to the process's asyncio loop, in order. Both sides poll instead of sleeping for
`cloud.vllm.busy_poll_ms` after activity (common/busy_poll.py says why).
  front end -> engine  ("verify", id, session_id, context, draft, sampling, rtt_ms, reuse)
                   ("verify_held", id, session_id, n, draft, rtt_ms, sent_at, expect): a round after the n
                   tokens the session's request holds (what its last round left there): the context and
                   the sampling parameters cross once per engine request, not every round; the engine
                   process posts it to the board directly (no task, no future per round). expect: a
                   draft-ahead round (the last len(expect) of those n tokens are the edge's guess of
                   the round in flight), else None
                   ("generate", id, session_id, prompt, max_tokens, sampling)  ("cancel", id)
                   ("oracle", id, prompt, max_tokens, sampling, plan)   plan: a picklable callable
                   ("stats", id)  ("profile", id, on)  ("order", key)  ("drop", session_id)
                   ("expire", session_id)  ("close",)
  engine -> front end  ("ok", id, result)  ("ended", id, reason)  ("stale", id, reason)  ("fail", id, reason)
                   ("tokens", id, new_tokens, finished)
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import multiprocessing as mp
import selectors
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from cloud.backends.base import Backend, DraftStale, SessionEnded
from cloud.backends.draft_board import ENDED, STALE
from common.busy_poll import BusyPoll
from common.config import VllmConfig


def _make_vllm(gguf, cfg, n_ctx, cache):
    from cloud.backends.vllm_engine_backend import VllmEngineBackend
    return VllmEngineBackend(gguf, cfg, n_ctx, cache)


class _Wire:
    """One end of the pipe: batched sends, a reader. Inside an asyncio loop (attach) the loop reads it
    and flushes sends once per loop tick; send() may come from another thread. The thread that owns
    the wire's reading on the engine side (`EnginePort`) flushes its own sends (after each step)."""

    def __init__(self, conn, on_message: Callable[[tuple], None]):
        self.conn, self.on_message, self.out = conn, on_message, []
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.lock = threading.Lock()
        self.scheduled = False                  # a flush is queued on the loop
        self.owner: Optional[int] = None        # a thread whose sends wait for its own flush()

    def attach(self, read: bool = True) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.thread = threading.get_ident()
            if read:
                self.loop.add_reader(self.conn.fileno(), self._readable)

    def send(self, msg: tuple) -> None:
        if self.loop is None or self.loop.is_closed():
            with self.lock:
                self.conn.send([msg])           # no loop yet (set-up) or any more (shutdown)
            return
        me = threading.get_ident()
        with self.lock:
            self.out.append(msg)
            if me == self.owner or self.scheduled:
                return                          # one flush per burst, however many rounds it carries
            self.scheduled = True
        if me == self.thread:
            self.loop.call_soon(self.flush)
        else:
            self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self.lock:
            self.scheduled = False
            batch, self.out = self.out, []
            if batch:
                try:
                    self.conn.send(batch)
                except (OSError, BrokenPipeError):
                    pass                        # the other side went away: its reader sees EOF

    def read(self, handle: Callable[[tuple], None]) -> bool:
        """Hand every message waiting in the pipe to handle; False at EOF."""
        try:
            while self.conn.poll():
                for msg in self.conn.recv():
                    handle(msg)
        except (EOFError, OSError):
            return False
        return True

    def _readable(self) -> None:
        if not self.read(self.on_message):
            self.loop.remove_reader(self.conn.fileno())
            self.on_message(("eof",))


class EnginePort:
    """The engine thread's side of every pipe, installed as the backend's wait_input/flush_output.

    wait(timeout): between steps, read the pipes (and the board's waker) for up to timeout: held
    rounds are posted to the board right here (`local`), everything else is handed to the asyncio
    loop (`forward`), in order. Within busy_s of the last activity it polls instead of sleeping in
    select. flush(): after a step, write its answers, one batch per pipe."""

    def __init__(self, wires: list[_Wire], wake, local: Callable[[int, tuple], bool],
                 forward: Callable[[int, tuple], None], busy_s: float):
        self.wires, self.wake, self.local, self.forward, self.busy_s = wires, wake, local, forward, busy_s
        self.sel = selectors.DefaultSelector()
        for i, w in enumerate(wires):
            self.sel.register(w.conn.fileno(), selectors.EVENT_READ, i)
        self.sel.register(wake.fileno(), selectors.EVENT_READ, None)
        self.active = 0.0                       # when a message came in or answers went out last

    def wait(self, timeout: float) -> None:
        if self.wires[0].owner is None:         # the first wait tells whose sends wait for flush()
            for w in self.wires:
                w.owner = threading.get_ident()
        now = time.monotonic()
        end, got = now + timeout, False
        while True:
            polling = now < self.active + self.busy_s
            for key, _ in self.sel.select(0 if polling else max(0.0, end - now)):
                got = True
                if key.data is not None:
                    self._read(key.data)
            now = time.monotonic()
            if got or self.wake.is_set() or now >= end:
                break
        self.wake.clear()
        if got:
            self.active = now
        self.flush()

    def _read(self, i: int) -> None:
        def one(msg: tuple) -> None:
            if not self.local(i, msg):
                self.forward(i, msg)
        if not self.wires[i].read(one):
            self.sel.unregister(self.wires[i].conn.fileno())
            self.forward(i, ("eof",))

    def flush(self) -> None:
        for w in self.wires:
            if w.out:
                w.flush()
                self.active = time.monotonic()


class EngineClient(Backend):
    """A front end's side of one pipe to the engine process: the backend interface, over the wire."""
    name = "vllm"
    verifies = True

    def __init__(self, conn, hello: dict, on_eof: Optional[Callable[[], None]] = None, busy_poll_s: float = 0.0):
        self.n_vocab, self.n_ctx, self.max_inflight = hello["n_vocab"], hello["n_ctx"], hello["max_inflight"]
        self._conn, self._on_eof = conn, on_eof
        self._busy = BusyPoll(busy_poll_s)      # poll, not sleep, while rounds come and go
        self._wire = _Wire(conn, self._on_message)
        self._ids = itertools.count()
        self._waiting: dict[int, Callable[[tuple], None]] = {}
        self._held: dict[str, list[int]] = {}   # session -> the context its engine request holds

    def logits(self, session_id, tokens, n_logits, reuse):
        raise NotImplementedError("the in-engine vLLM backend verifies rounds itself: use averify")

    # --- parent side of the wire --------------------------------------------------------------------
    def _on_message(self, msg: tuple) -> None:
        self._busy.poke()
        if msg[0] == "eof":                     # the engine process died: fail everyone waiting
            for handler in list(self._waiting.values()):
                handler(("fail", -1, "the engine process exited"))
            self._waiting.clear()
            if self._on_eof is not None:
                self._on_eof()
            return
        handler = self._waiting.get(msg[1])
        if handler is not None:
            handler(msg)

    async def _ask(self, *msg) -> object:
        self._wire.attach()
        self._busy.poke()
        fut = asyncio.get_running_loop().create_future()
        rid = next(self._ids)

        def settle(reply):
            self._waiting.pop(rid, None)
            if fut.done():
                return
            if reply[0] == "ok":
                fut.set_result(reply[2])
            elif reply[0] == "ended":
                fut.set_exception(SessionEnded(reply[2]))
            elif reply[0] == "stale":
                fut.set_exception(DraftStale(reply[2]))
            else:
                fut.set_exception(RuntimeError(reply[2]))
        self._waiting[rid] = settle
        self._wire.send((msg[0], rid, *msg[1:]))
        return await fut

    # --- the backend interface --------------------------------------------------------------------------
    async def averify(self, session_id, context, draft, sampling, rtt_ms, reuse) -> tuple[int, int, int]:
        if reuse and self._held.get(session_id) == context:
            msg = ("verify_held", session_id, len(context), draft, rtt_ms, time.monotonic(), None)
        else:
            msg = ("verify", session_id, context, draft, sampling, rtt_ms, reuse)
        return await self._round(session_id, context, draft, msg, reuse)

    def post_ahead(self, session_id, context, expect, draft, rtt_ms):
        if self._held.get(session_id) != context:
            return None                         # the round in flight is not a held one (a fresh request)
        msg = ("verify_held", session_id, len(context) + len(expect), draft, rtt_ms, time.monotonic(), expect)
        return asyncio.ensure_future(self._round(session_id, context + expect, draft, msg, True))

    async def _round(self, session_id, context, draft, msg, reuse) -> tuple[int, int, int]:
        try:
            accepted, nxt, held = await self._ask(*msg)
        except DraftStale:
            raise                               # nothing happened to the request: what it holds stands
        except Exception:
            self._held.pop(session_id, None)
            raise
        if reuse:
            self._held[session_id] = context + draft[:accepted] + [nxt]
        return accepted, nxt, held

    async def agenerate(self, session_id: str, prompt: list[int], max_tokens: int, sampling) -> AsyncIterator[int]:
        self._wire.attach()
        q: asyncio.Queue = asyncio.Queue()
        rid = next(self._ids)
        self._waiting[rid] = q.put_nowait
        self._wire.send(("generate", rid, session_id, prompt, max_tokens, sampling))
        finished = False
        try:
            while not finished:
                msg = await q.get()
                if msg[0] != "tokens":
                    raise RuntimeError(msg[2])
                _, _, new, finished = msg
                for t in new:
                    yield t
        finally:
            self._waiting.pop(rid, None)
            if not finished:
                self._wire.send(("cancel", rid))

    async def run_oracle(self, prompt: list[int], max_tokens: int, sampling, plan) -> list[int]:
        return await self._ask("oracle", prompt, max_tokens, sampling, plan)

    async def engine_stats(self) -> dict:
        return await self._ask("stats")

    async def profile(self, on: bool) -> Optional[str]:
        return await self._ask("profile", on)

    def set_order(self, key) -> None:
        self._wire.send(("order", key))

    def drop(self, session_id: str) -> None:
        self._held.pop(session_id, None)
        self._wire.send(("drop", session_id))

    def expire(self, session_id: str) -> None:
        self._held.pop(session_id, None)
        self._wire.send(("expire", session_id))



class VllmEngineProcess(EngineClient):
    """Starts the engine process (`factory` builds the backend there) with one pipe per front end:
    this process is front end 0; `frontend_conns` are for the others (cloud/frontends.py)."""

    def __init__(self, gguf: Optional[Path], cfg: VllmConfig, n_ctx: int, cache: str | None = None,
                 factory: Callable = _make_vllm):
        ctx = mp.get_context("spawn")          # CUDA does not survive fork
        pipes = [ctx.Pipe() for _ in range(cfg.frontends)]
        # not a daemon: with tensor parallelism vLLM starts worker processes from the child
        self._proc = ctx.Process(target=serve_engine, args=([c for _, c in pipes], factory, gguf, cfg, n_ctx, cache),
                                 name="tandem-engine")
        self._proc.start()
        for _, child in pipes:
            child.close()
        try:
            hello = pipes[0][0].recv()          # blocks until the engine is up
        except EOFError:
            hello = {"error": f"it exited with code {self._proc.exitcode} before reporting"}
        if "error" in hello:
            self._proc.join(timeout=30)
            raise RuntimeError(f"the engine process failed to start: {hello['error']}")
        super().__init__(pipes[0][0], hello, busy_poll_s=cfg.busy_poll_ms / 1e3)
        self.hello = hello
        self.frontend_conns = [p for p, _ in pipes[1:]]

    def close(self) -> None:
        try:
            self._conn.send([("close",)])
        except (OSError, BrokenPipeError):
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()


# --- the child ----------------------------------------------------------------------------------------
def serve_engine(conns, factory, gguf, cfg, n_ctx, cache) -> None:
    try:
        backend = factory(gguf, cfg, n_ctx, cache)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conns[0].send({"error": f"{type(e).__name__}: {e}"})
        return
    conns[0].send({"n_vocab": backend.n_vocab, "n_ctx": backend.n_ctx, "max_inflight": backend.max_inflight})
    try:
        asyncio.run(_serve(conns, backend, cfg.busy_poll_ms / 1e3))
    finally:
        backend.close()


async def _serve(conns, backend, busy_poll_s: float) -> None:
    """Answer every front end on its own pipe. Pipe 0 is the parent's: its close (or EOF) stops the
    engine. A session belongs to the front end that last sent it a round: an expiry (TTL, LRU) from
    a front end that has since lost the session to another (its connection moved) is ignored; an
    explicit drop (DELETE /v1/sessions/{id}, wherever it lands) is not."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    tasks: dict[tuple[int, int], asyncio.Task] = {}
    samplings: dict[str, object] = {}       # session -> its sampling parameters (from its last "verify")
    owner: dict[str, int] = {}              # session -> the front end that last sent it a round

    async def answer(wire: _Wire, rid: int, coro) -> None:
        try:
            wire.send(("ok", rid, await coro))
        except SessionEnded as e:
            wire.send(("ended", rid, str(e)))
        except Exception as e:  # noqa: BLE001 - the parent raises it in the waiting coroutine
            wire.send(("fail", rid, f"{type(e).__name__}: {e}"))

    async def stream(wire: _Wire, rid: int, gen) -> None:
        try:
            batch = []
            async for tok in gen:
                batch.append(tok)
                if len(batch) >= 16:
                    wire.send(("tokens", rid, batch, False))
                    batch = []
            wire.send(("tokens", rid, batch, True))
        except Exception as e:  # noqa: BLE001
            wire.send(("fail", rid, f"{type(e).__name__}: {e}"))

    def start(key: tuple[int, int], coro) -> None:
        task = loop.create_task(coro)
        tasks[key] = task
        task.add_done_callback(lambda _: tasks.pop(key, None))

    def held_round(wire: _Wire, rid: int, sid: str, n: int, draft: list[int], rtt_ms, sent_at: float,
                   expect) -> None:
        """The hot path: no task, no future; the engine thread's answer goes straight onto the wire.
        The round counts as posted when the front end sent it (the same monotonic clock here), not when
        the engine thread read it after a step: the gather predicts each edge's next draft from that."""
        def on_done(a: int, t: int) -> None:
            wire.send(("ok", rid, (a, t, n)))

        def on_error(reason: str) -> None:
            wire.send(("ended", rid, reason))

        def on_stale() -> None:
            wire.send(("stale", rid, STALE))
        if sid not in samplings or not backend.post_round(sid, n, draft, rtt_ms, on_done, on_error, sent_at,
                                                          expect, on_stale):
            wire.send(("ended", rid, ENDED))

    def on_engine_thread(i: int, msg: tuple) -> bool:
        """The engine thread, reading the pipes: a held round goes to the board here; False: not one."""
        if msg[0] != "verify_held":
            return False
        owner[msg[2]] = i
        held_round(wires[i], *msg[1:])
        return True

    def on_message(i: int, msg: tuple) -> None:
        op, wire = msg[0], wires[i]
        if op == "verify":
            samplings[msg[2]], owner[msg[2]] = msg[5], i
            start((i, msg[1]), answer(wire, msg[1], backend.averify(*msg[2:])))
        elif op == "generate":
            start((i, msg[1]), stream(wire, msg[1], backend.agenerate(*msg[2:])))
        elif op == "oracle":
            start((i, msg[1]), answer(wire, msg[1], backend.run_oracle(*msg[2:])))
        elif op == "stats":
            start((i, msg[1]), answer(wire, msg[1], backend.engine_stats()))
        elif op == "profile":
            start((i, msg[1]), answer(wire, msg[1], backend.profile(msg[2])))
        elif op == "cancel":
            task = tasks.get((i, msg[1]))
            if task is not None:
                task.cancel()
        elif op == "order":
            backend.set_order(msg[1])
        elif op == "drop" or (op == "expire" and owner.get(msg[1], i) == i):
            owner.pop(msg[1], None)         # an expiry from a front end that lost the session is ignored
            samplings.pop(msg[1], None)
            backend.drop(msg[1])
        elif op in ("close", "eof") and i == 0 and not stop.done():
            stop.set_result(None)

    wires = [_Wire(conn, functools.partial(on_message, i)) for i, conn in enumerate(conns)]
    for wire in wires:
        wire.attach(read=False)             # the engine thread reads them (EnginePort)
    def to_loop(i: int, msg: tuple) -> None:
        try:
            loop.call_soon_threadsafe(on_message, i, msg)
        except RuntimeError:                # the loop has closed: the engine is stopping
            pass
    port = EnginePort(wires, backend.board.wake, on_engine_thread, to_loop, busy_poll_s)
    backend.wait_input, backend.flush_output = port.wait, port.flush
    backend.board.wake.set()                # the engine thread starts using them now
    await stop
