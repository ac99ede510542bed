"""Target on vLLM (GPU), in-engine design: one long-lived vLLM request per edge session.

Each edge session is one engine request whose steps consume the edge's drafts as spec tokens:
the DraftBoard (draft_board.py, semantics there) holds each session's pending draft, the
`EdgeDraftScheduler` (vllm_plugins.py, loaded through `scheduler_cls`) steps a session only when
its draft is in and parks it (KV resident) while the draft is on the wire, and vLLM's own rejection
sampler verifies. `speculative_config={"method": "custom_class"}` with the do-nothing
`BoardProposer` switches on the spec-decode path. No vLLM file is patched.

Process boundary: the engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on one
engine thread that owns the LLMEngine; the aiohttp event loop posts drafts to the board (a lock
and an event, no IPC) and gets each round's (accepted, next token) back through a future. With
tensor parallelism the workers are other processes, but drafts never go there.
"""
from __future__ import annotations

import asyncio
import gc
import os
import queue
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from cloud.backends.board_backend import BoardBackend, settle_future
from cloud.backends.draft_board import DraftBoard, Round, Slot
from cloud.backends.vllm_args import engine_kwargs
from common.config import VllmConfig
from common.scheduling import engine_priority


@dataclass
class EngineStats:
    steps: int = 0
    idle_steps: int = 0
    step_s: float = 0.0
    tokens: int = 0
    scheduled_tokens: int = 0
    schedule_s_at_start: float = 0.0    # the scheduler's running total when these counters began
    post_s: float = 0.0                 # engine thread, after a step returned until its answers were written
    gc_s: float = 0.0                   # Python's garbage collector, anywhere in the engine process
    gc_runs: list = field(default_factory=lambda: [0, 0, 0])   # collections per generation
    # why each step started (DraftBoard.ready) -> [steps, seconds the engine sat idle before them]
    started: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0.0]))

    def as_dict(self, schedule_s_total: float, cycles: tuple[int, float, float]) -> dict:
        n, sched = max(self.steps, 1), schedule_s_total - self.schedule_s_at_start
        gap = sum(g for _, g in self.started.values())
        rounds, out_s, read_s = cycles
        return {"steps": self.steps, "idle_steps": self.idle_steps, "step_s": round(self.step_s, 3),
                "schedule_s": round(sched, 3), "tokens": self.tokens,
                "ms_per_step": round(1e3 * self.step_s / n, 3), "schedule_ms_per_step": round(1e3 * sched / n, 3),
                "scheduled_tokens_per_step": round(self.scheduled_tokens / n, 1),
                "idle_ms_per_step": round(1e3 * gap / n, 3),
                "post_ms_per_step": round(1e3 * self.post_s / n, 3),
                "gc_ms_per_step": round(1e3 * self.gc_s / n, 3), "gc_runs": self.gc_runs,
                # per edge round: its answer's trip out, the edge, its next draft's trip back (DraftBoard.post)
                "edge_cycle_ms": round(1e3 * out_s / max(rounds, 1), 3),
                "read_ms": round(1e3 * read_s / max(rounds, 1), 3),    # ... of which: the last pipe hop
                "started": {k: {"steps": c, "idle_ms_per_step": round(1e3 * g / max(c, 1), 3)}
                            for k, (c, g) in sorted(self.started.items())}}


def to_vllm_sampling(sampling, max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    return SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          seed=sampling.seed, max_tokens=max_tokens, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


class VllmEngineBackend(BoardBackend):
    name = "vllm"

    def __init__(self, gguf: Optional[Path], cfg: VllmConfig, n_ctx: int, cache: str | None = None):
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")   # flashinfer may be absent
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"          # engine core in this process
        # The engine thread is CPU-bound between GPU waits; with Python's default 5 ms switch interval
        # every wake-up of the aiohttp loop waits up to 5 ms for the GIL (the convoy effect).
        sys.setswitchinterval(cfg.switch_interval_ms / 1e3)
        from vllm import LLMEngine
        from cloud.backends import vllm_plugins
        model_dir = cfg.model_dir or str(_dequantized(gguf, cache))
        self.board = DraftBoard(cfg.draft_timeout_s, cfg.gather_ms, cfg.pad_drafts)
        vllm_plugins.BOARD = self.board
        from vllm import EngineArgs
        self.engine = LLMEngine.from_engine_args(EngineArgs(**engine_kwargs(model_dir, cfg, n_ctx, cfg.num_speculative_tokens)))
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        # the board's tokens come from the scheduler's update_from_output either way: at once (early
        # answers) or kept until the step has returned, after vLLM's output processing
        self._late: list[tuple[str, list[int], bool]] = []
        self.scheduler.on_outputs = self._produced if cfg.early_answers else self._late.extend
        from transformers import AutoConfig
        self.n_vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        self.n_ctx = n_ctx
        self.max_inflight = cfg.max_num_seqs
        # our waiting room admits at most max_num_seqs requests: vLLM never preempts for a seat, and our
        # scheduler hides parked sessions from vLLM's running list, so it would otherwise admit past it
        self.admit_sessions(cfg.max_num_seqs)
        self.stats = EngineStats()
        gc.callbacks.append(self._on_gc)
        self._gc_t0 = 0.0
        self._ended: Optional[float] = None              # when the last step that computed ended (this window)
        self.sessions: dict[str, str] = {}            # session id -> engine request id
        self.streams: dict[str, Callable] = {}        # engine request id -> on_tokens(new, finished)
        self._internal: dict[str, str] = {}           # our request id -> vLLM's internal id
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.stats.gc_s += time.perf_counter() - self._gc_t0
            self.stats.gc_runs[info["generation"]] += 1

    # --- engine thread ------------------------------------------------------------------------------
    def _produced(self, outs: list[tuple[str, list[int], bool]]) -> None:
        """A step's new tokens per request: rounds resolve, their answers go out now."""
        for rid, new, finished in outs:
            self.board.produced(rid, new, finished)
        self.flush_output()

    def _call(self, fn: Callable[[], object]) -> "asyncio.Future":
        """Run fn on the engine thread; the returned future carries its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def job():
            try:
                res = fn()
                loop.call_soon_threadsafe(settle_future, fut, res, None)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(settle_future, fut, None, e)
        self._inbox.put(job)
        self.board.wake.set()
        return fut

    def _run(self) -> None:
        swept = 0.0                                          # when parked requests were last checked for expiry
        while not self._stop:
            self.wait_input(0.0)
            while True:
                try:
                    self._inbox.get_nowait()()
                except queue.Empty:
                    break
            now = time.monotonic()
            if now - swept > 0.25:                           # O(sessions): not on every draft's arrival
                swept = now
                for rid in self.board.expired(now):
                    self._abort(rid)
            go, wait = self.board.ready(now)
            if not go:
                self.wait_input(wait)
                continue
            t0 = time.perf_counter()
            outs = self.engine.step()
            took = time.perf_counter() - t0
            self.stats.step_s += took
            self.stats.steps += 1
            if self.scheduler.last_scheduled_tokens:
                self.board.stepped(took)
                self.stats.scheduled_tokens += self.scheduler.last_scheduled_tokens
                start = self.stats.started[self.board.reason]
                start[0] += 1
                if self._ended is not None:                      # the engine's idle gap before this step
                    start[1] += t0 - self._ended
                self._ended = time.perf_counter()
            else:
                self.stats.idle_steps += 1
                self.wait_input(0.001)
            if self._late:
                self._produced(self._late)
                self._late.clear()
            for out in outs:
                rid = self._internal.get(out.request_id, out.request_id)
                new = list(out.outputs[0].token_ids) if out.outputs else []
                self.stats.tokens += len(new)
                on_tokens = self.streams.get(rid)
                if on_tokens is not None:
                    on_tokens(new, out.finished)
                if out.finished:
                    self.streams.pop(rid, None)
                    self._internal.pop(out.request_id, None)
                    slot = self.board.slots.get(rid)
                    if slot is not None and slot.kind != "edge":
                        self.board.close(rid)
            self.flush_output()
            self.stats.post_s += time.perf_counter() - t0 - took

    def _add(self, slot_kind: str, prompt: list[int], sampling, max_tokens: int, salt: str, prio: int,
             rtt_ms=None, plan=None, on_tokens=None, seat: bool = False) -> str:
        """Engine thread: add one request and its board slot. seat: the caller holds a seat of the
        waiting room for it, which the slot gives back when the request ends (or this, if it fails)."""
        ext = uuid.uuid4().hex
        try:
            rid = self.engine.add_request(ext, {"prompt_token_ids": list(prompt), "cache_salt": salt},
                                          to_vllm_sampling(sampling, max_tokens), priority=prio)
        except BaseException:
            if seat:
                self.room.give_back()
            raise
        self._internal[ext] = rid
        if on_tokens is not None:
            self.streams[rid] = on_tokens
        self.board.open(Slot(rid, slot_kind, list(prompt), rtt_ms=rtt_ms, plan=plan, seat=seat))
        return rid

    def _abort(self, rid: str) -> None:
        """Engine thread."""
        self.board.close(rid)
        self.streams.pop(rid, None)
        try:
            self.engine.abort_request([rid], internal=True)
        except Exception:  # noqa: BLE001 - already finished
            pass

    # --- verifier entry points -------------------------------------------------------------------------
    async def open_request(self, session_id, context, sampling, rtt_ms, reuse, rnd: Round, priority: int) -> str:
        salt = session_id if reuse else uuid.uuid4().hex
        max_tokens = max(1, self.n_ctx - len(context) - 1)

        def start():
            new = self._add("edge", context, sampling, max_tokens, salt, priority, rtt_ms, seat=True)
            self.board.post(new, rnd, rtt_ms)
            return new
        return await self._call(start)

    async def agenerate(self, session_id: str, prompt: list[int], max_tokens: int, sampling) -> AsyncIterator[int]:
        """Target-only generation (plain request, never drafted): the lossless reference."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def on_tokens(new, finished):
            loop.call_soon_threadsafe(q.put_nowait, (new, finished))
        prio = engine_priority(await self.room.take(None))   # a seat as edge sessions take one (no RTT known)
        rid = await self._call(lambda: self._add("plain", prompt, sampling, max_tokens, f"gen:{session_id}", prio,
                                                 on_tokens=on_tokens, seat=True))
        try:
            while True:
                new, finished = await q.get()
                for t in new:
                    yield t
                if finished:
                    return
        finally:
            self.board.close(rid)
            self._inbox.put(lambda: self._abort(rid))

    async def run_oracle(self, prompt: list[int], max_tokens: int, sampling, plan) -> list[int]:
        """Benchmark helper: a session whose drafts come from plan(n, tokens) at schedule time."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        out: list[int] = []

        def on_tokens(new, finished):
            out.extend(new)
            if finished:
                loop.call_soon_threadsafe(settle_future, done, out, None)
        await self._call(lambda: self._add("oracle", prompt, sampling, max_tokens, uuid.uuid4().hex, 0,
                                           plan=plan, on_tokens=on_tokens))
        return await done

    def drop(self, session_id: str) -> None:
        rid = self.sessions.pop(session_id, None)
        if rid is not None:
            self._inbox.put(lambda: self._abort(rid))
            self.board.wake.set()

    async def engine_stats(self) -> dict:
        """Engine-step counters since the last call; starts new ones."""
        total = self.scheduler.schedule_s
        st = self.stats.as_dict(total, self.board.take_cycles())
        self.stats = EngineStats(schedule_s_at_start=total)
        self._ended = None                  # a new window: the pause before its first step is not idle
        return st

    async def profile(self, on: bool) -> Optional[str]:
        """Benchmarks: cProfile the engine thread's steps between profile(True) and profile(False),
        which returns the top of the table."""
        import cProfile
        import io
        import pstats
        if on:
            prof, step = cProfile.Profile(), self.engine.step

            def profiled_step():
                prof.enable()
                try:
                    return step()
                finally:
                    prof.disable()
            self._profiling = (prof, step)
            self.engine.step = profiled_step
            return None
        prof, step = self._profiling
        self.engine.step = step
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        return buf.getvalue()

    def close(self) -> None:
        self.stop_engine_thread(self._thread, 10)
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


def _dequantized(gguf: Path, cache: str | None) -> Path:
    from cloud.backends.torch_backend import dequantized_dir
    return dequantized_dir(gguf, "bfloat16", cache)
