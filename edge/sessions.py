"""The edge's session slots: each active generation owns one sequence of the draft model's context.

At most `edge.max_sessions` generations run at once; up to `edge.max_queue` more wait their turn, first
come first served; past that a new request is refused with EdgeBusy (HTTP 429 with Retry-After). A
waiter whose client leaves is cancelled and gives up its place; a finished or abandoned session frees
its sequence at once (the drafter clears its KV before anyone else gets it).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import AsyncIterator, Callable


class EdgeBusy(RuntimeError):
    """Every session slot is taken and the wait queue is full."""

    def __init__(self, active: int, waiting: int, retry_after_s: float):
        super().__init__(f"the edge is busy: {active} sessions running and {waiting} waiting; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class SessionSlots:
    def __init__(self, max_sessions: int, max_queue: int, release: Callable[[int], None], retry_after_s: float = 1.0):
        self.free = list(range(max_sessions - 1, -1, -1))     # sequence ids; pop() hands out the lowest first
        self.max_queue = max_queue
        self.release = release           # drafter.release(seq): clears the sequence's KV cache
        self.retry_after_s = retry_after_s
        self.waiters: deque[asyncio.Future] = deque()
        self.active = 0

    @property
    def waiting(self) -> int:
        return sum(not w.done() for w in self.waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """Hold a sequence id for one generation (waits in the queue; EdgeBusy when it is full)."""
        if self.free and not self.waiting:
            seq = self.free.pop()
        elif self.waiting >= self.max_queue:
            raise EdgeBusy(self.active, self.waiting, self.retry_after_s)
        else:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                seq = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():      # handed a slot in the same instant: give it back
                    self._give(fut.result())
                raise
        self.active += 1
        try:
            yield seq
        finally:
            self.active -= 1
            self.release(seq)
            self._give(seq)

    def _give(self, seq: int) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(seq)
                return
        self.free.append(seq)
