"""A backend whose engine verifies rounds itself through a DraftBoard (the in-engine vLLM design, and
the simulated engine of the protocol tests and the front-end benchmark).

A round goes on in the session's live engine request when that request holds the edge's context
(`post_round`: no future, no task: the engine-process pipe calls it directly per message); anything
else (a new session, a re-sync, reuse off) opens a fresh request (`open_request`, per engine).

Admission (common/scheduling.py says what health priority means here): a fresh request first takes a
seat of the backend's WaitingRoom (`max_inflight` seats: vLLM's max_num_seqs); when all are taken it
waits there, in the verifier's order (`set_order`: health with aging, or FIFO), before it enters the
engine. The seat is given back when the request ends (finished, dropped, timed out: DraftBoard's
on_vacate), never while its session is between rounds.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional

from cloud.backends.base import Backend, DraftStale, SessionEnded
from cloud.backends.draft_board import STALE, DraftBoard, Round
from common.scheduling import OrderKey, WaitingRoom, engine_priority


class BoardBackend(Backend):
    verifies = True                # rounds are verified inside the engine (averify), not from logits
    board: DraftBoard
    sessions: dict[str, str]       # session id -> its engine request id
    room: WaitingRoom              # seats for engine requests (admit_sessions)

    def logits(self, session_id, tokens, n_logits, reuse):
        raise NotImplementedError("an in-engine backend verifies rounds itself: use averify")

    def admit_sessions(self, seats: int) -> None:
        """The subclass's __init__, once its board exists: at most `seats` requests hold a seat at once
        (a request opened with Slot.seat); the board gives each seat back when its request ends."""
        self.room = WaitingRoom(seats)
        self.board.on_vacate = self.room.give_back

    def set_order(self, key: OrderKey) -> None:
        """The verifier's ordering (health with aging, or FIFO): for running sessions (the board) and for
        sessions waiting for a seat (the waiting room). The switch is read there, not here."""
        self.board.order_key = key
        self.room.key = key

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

    def post_ahead(self, session_id: str, context: list[int], expect: list[int], draft: list[int], rtt_ms):
        """A draft-ahead round after the round in flight (which started after `context`): an awaitable of
        (accepted, next_token, held) that raises DraftStale if that round does not leave `expect`, or None
        when the live request does not hold `context` (the verifier runs it in turn)."""
        if not self.board.holds(self.sessions.get(session_id), context):
            return None
        n = len(context) + len(expect)
        fut, on_done, on_error, on_stale = round_future(asyncio.get_running_loop(), lambda a, t: (a, t, n))
        ok = self.post_round(session_id, n, draft, rtt_ms, on_done, on_error, expect=expect, on_stale=on_stale)
        return fut if ok else None

    async def open_request(self, session_id: str, context: list[int], sampling, rtt_ms, reuse: bool,
                           rnd: Round, priority: int) -> str:
        """Start a fresh engine request holding `context` (its board slot seated: Slot.seat, and
        `priority` its engine priority), post `rnd` to it, return its id. Called holding a seat: if no
        request is opened, it gives the seat back itself (self.room.give_back())."""
        raise NotImplementedError

    async def averify(self, session_id: str, context: list[int], draft: list[int], sampling, rtt_ms,
                      reuse: bool) -> tuple[int, int, int]:
        """One round: (accepted, next_token, tokens the engine already held)."""
        fut, on_done, on_error, _ = round_future(asyncio.get_running_loop(), lambda a, t: (a, t))
        rnd = Round(len(context), list(draft), time.monotonic(), on_done, on_error)
        rid = self.sessions.get(session_id)
        if reuse and self.board.holds(rid, context):
            self.board.post(rid, rnd, rtt_ms)
            held = len(context)
        else:                                          # new session, re-sync, or reuse off: a fresh request
            if rid is not None:
                self.drop(session_id)
            key = await self.room.take(rtt_ms)         # all seats taken: wait in the verifier's order
            self.sessions[session_id] = await self.open_request(session_id, context, sampling, rtt_ms, reuse, rnd,
                                                                engine_priority(key))
            held = 0
        accepted, nxt = await fut
        return accepted, nxt, held


def round_future(loop: asyncio.AbstractEventLoop, result: Callable[[int, int], object]):
    """A future on `loop` and the three callbacks the engine thread settles it with: on_done(a, t)
    (its value: result(a, t)), on_error(reason) (SessionEnded), on_stale() (DraftStale)."""
    fut = loop.create_future()

    def settle(value, exc) -> None:
        loop.call_soon_threadsafe(settle_future, fut, value, exc)
    return (fut, lambda a, t: settle(result(a, t), None), lambda reason: settle(None, SessionEnded(reason)),
            lambda: settle(None, DraftStale(STALE)))


def settle_future(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
