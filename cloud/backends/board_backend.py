"""A backend whose engine verifies rounds itself through a DraftBoard (the in-engine vLLM design, and
the simulated engine of the protocol tests and the front-end benchmark).

A round goes on in the session's live engine request when that request holds the edge's context
(`post_round`: no future, no task: the engine-process pipe calls it directly per message); anything
else (a new session, a re-sync, reuse off) opens a fresh request (`open_request`, per engine).
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional

from cloud.backends.base import Backend, DraftStale, SessionEnded
from cloud.backends.draft_board import DraftBoard, Round


class BoardBackend(Backend):
    verifies = True                # rounds are verified inside the engine (averify), not from logits
    board: DraftBoard
    sessions: dict[str, str]       # session id -> its engine request id

    def logits(self, session_id, tokens, n_logits, reuse):
        raise NotImplementedError("an in-engine backend verifies rounds itself: use averify")

    def set_order(self, key: Callable[[Optional[float], float], float]) -> None:
        self.board.order_key = key

    # The engine thread's two waits and its output. The engine process replaces both with its pipe
    # poller (vllm_engine_process.EnginePort), so that drafts and answers cross with no other thread.
    def wait_input(self, timeout: float) -> None:
        """Engine thread: wait up to timeout for a draft or a job (0: only take what is there)."""
        self.board.wake.wait(timeout)
        self.board.wake.clear()

    def flush_output(self) -> None:
        """Engine thread, after a step's outputs: send the answers it produced (here they left already)."""

    def stop_engine_thread(self, thread, timeout_s: float) -> None:
        """Ask the engine thread to stop (it checks self._stop), wait for it, then free the board's
        waker (not while the thread may still use it)."""
        self._stop = True
        self.board.wake.set()
        thread.join(timeout=timeout_s)
        if not thread.is_alive():
            self.board.wake.close()

    def post_round(self, session_id: str, n: int, draft: list[int], rtt_ms, on_done: Callable[[int, int], None],
                   on_error: Callable[[str], None], posted: Optional[float] = None,
                   expect: Optional[list[int]] = None, on_stale: Optional[Callable[[], None]] = None) -> bool:
        """Post a round after the first n tokens the session's live request holds (the engine thread
        calls on_done(accepted, next_token) or on_error(reason)); False if no live request holds n.
        The caller vouches that those n tokens are the edge's context (the front end checked them).
        posted: when the round arrived (time.monotonic(), any process of this host); default now.
        expect: a draft-ahead round (DraftBoard): the request holds only n - len(expect) tokens of its
        context yet; it goes on if the round in flight leaves `expect` after them, else on_stale()."""
        rid = self.sessions.get(session_id)
        tokens = self.board.held(rid)
        if tokens is None or len(tokens) < n - len(expect or ()):
            return False
        self.board.post(rid, Round(n, list(draft), posted or time.monotonic(), on_done, on_error, expect, on_stale),
                        rtt_ms)
        return True

    def post_ahead(self, session_id: str, context: list[int], after: int, draft: list[int], rtt_ms):
        """A draft-ahead round (its context runs past the round in flight, which started at `after`):
        an awaitable of (accepted, next_token, held) that raises DraftStale if that round ends
        otherwise, or None when the live request does not hold context[:after] (verify it in turn)."""
        tokens = self.board.held(self.sessions.get(session_id))
        if tokens is None or tokens[:after] != context[:after]:
            return None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        ok = self.post_round(session_id, len(context), draft, rtt_ms,
                             lambda a, t: loop.call_soon_threadsafe(settle_future, fut, (a, t, len(context)), None),
                             lambda msg: loop.call_soon_threadsafe(settle_future, fut, None, SessionEnded(msg)),
                             expect=context[after:],
                             on_stale=lambda: loop.call_soon_threadsafe(settle_future, fut, None, DraftStale(
                                 "the round before did not end as guessed")))
        return fut if ok else None

    async def open_request(self, session_id: str, context: list[int], sampling, rtt_ms, reuse: bool,
                           rnd: Round) -> str:
        """Start a fresh engine request holding `context`, post `rnd` to it, return its id."""
        raise NotImplementedError

    async def averify(self, session_id: str, context: list[int], draft: list[int], sampling, rtt_ms,
                      reuse: bool) -> tuple[int, int, int]:
        """One round: (accepted, next_token, tokens the engine already held)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def on_done(a: int, t: int) -> None:
            loop.call_soon_threadsafe(settle_future, fut, (a, t), None)

        def on_error(msg: str) -> None:
            loop.call_soon_threadsafe(settle_future, fut, None, SessionEnded(msg))
        rnd = Round(len(context), list(draft), time.monotonic(), on_done, on_error)
        rid = self.sessions.get(session_id)
        if reuse and self.board.holds(rid, context):
            self.board.post(rid, rnd, rtt_ms)
            held = len(context)
        else:                                          # new session, re-sync, or reuse off: a fresh request
            if rid is not None:
                self.drop(session_id)
            self.sessions[session_id] = await self.open_request(session_id, context, sampling, rtt_ms, reuse, rnd)
            held = 0
        accepted, nxt = await fut
        return accepted, nxt, held


def settle_future(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
