"""Health-factor priority: good networks first, with aging so nobody starves.

h = exp(-RTT / 500 ms) in (0, 1]; priority = round((1 - h) * 1000), lower runs first (vLLM's
convention). A waiting request gains `aging_per_s` priority units per second it waits, so its
effective priority at time t is priority - aging_per_s * (t - arrival). Since every waiter ages at
the same rate, the order between waiters never changes while they wait: sorting by the static key
priority + aging_per_s * arrival gives the same order at every instant, so a heap works.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from typing import Optional

RTT_SCALE_MS = 500.0


def health_factor(rtt_ms: Optional[float]) -> float:
    """exp(-RTT/500 ms); an edge that has not measured its RTT yet counts as healthy."""
    return 1.0 if rtt_ms is None else math.exp(-max(rtt_ms, 0.0) / RTT_SCALE_MS)


def priority(rtt_ms: Optional[float]) -> int:
    return round((1.0 - health_factor(rtt_ms)) * 1000)


def aged_key(rtt_ms: Optional[float], arrival_s: float, aging_per_s: float) -> float:
    """Static sort key equivalent to 'priority minus aging credit' at any common instant."""
    return priority(rtt_ms) + aging_per_s * arrival_s


class OrderKey:
    """key(rtt_ms, since_s): smaller runs first. A plain object (picklable), so the same ordering can
    be handed to the in-engine scheduler, also in another process."""

    def __init__(self, aging_per_s: float, by_health: bool):
        self.aging_per_s, self.by_health = aging_per_s, by_health

    def __call__(self, rtt_ms: Optional[float], since_s: float) -> float:
        return aged_key(rtt_ms, since_s, self.aging_per_s) if self.by_health else since_s


class AdmissionQueue:
    """At most `max_inflight` holders; waiters are admitted lowest key first (FIFO when not
    `by_health`). Used as `async with queue.slot(rtt_ms): ...`."""

    def __init__(self, max_inflight: int, aging_per_s: float, by_health: bool):
        self.max_inflight = max_inflight
        self.key = OrderKey(aging_per_s, by_health)   # the ordering shared with the in-engine scheduler
        self._inflight = 0
        self._heap: list[tuple[float, int, asyncio.Future]] = []
        self._counter = itertools.count()

    async def acquire(self, rtt_ms: Optional[float]) -> None:
        if self._inflight < self.max_inflight and not self._heap:
            self._inflight += 1
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.key(rtt_ms, time.monotonic()), next(self._counter), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()       # admitted just as we were cancelled: pass the slot on
            raise

    def release(self) -> None:
        while self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)  # hand our slot to the best waiter
                return
        self._inflight -= 1

    @property
    def waiting(self) -> int:
        return len(self._heap)

    def slot(self, rtt_ms: Optional[float]):
        queue = self

        class _Slot:
            async def __aenter__(self):
                await queue.acquire(rtt_ms)

            async def __aexit__(self, *exc):
                queue.release()

        return _Slot()
