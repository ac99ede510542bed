"""Health-factor priority: good networks first, with aging so nobody starves. One ordering key
(`OrderKey`) for every backend, and one waiting room (`WaitingRoom`) that admits by it.

h = exp(-RTT / 500 ms) in (0, 1]; priority = round((1 - h) * 1000) in [0, 1000], lower runs first
(vLLM's convention). A waiting request gains `aging_per_s` priority units per second it waits, so its
effective priority at time t is priority - aging_per_s * (t - arrival). Since every waiter ages at
the same rate, the order between waiters never changes while they wait: sorting by the static key
priority + aging_per_s * arrival gives the same order at every instant, so a heap works.

Bounded wait. Priorities span [0, PRIORITY_MAX], so a waiter that arrived at t is never overtaken by
one that arrives after t + PRIORITY_MAX / aging_per_s (`overtake_window_s`: 1 s at the default
1000 units/s): the sessions admitted before it all arrived before that instant. Its wait is therefore
at most what first-come-first-served would make a session arriving one window later wait. With
aging 0 there is no bound (a far session can starve under a steady stream of near ones).

What is admitted, per backend:
* CPU backends (llama_cpp, torch) and vLLM request-per-round: verify *calls*. The backend computes
  `max_inflight` at once; the rest wait in the verifier's `AdmissionQueue` (cloud/verifier.py).
* vLLM in-engine (cloud/backends/board_backend.py): *sessions*. Each edge session is one long-lived
  engine request that holds its seat (one of max_num_seqs) and its KV blocks for the whole answer,
  also while its next draft crosses the link; a session at RTT R yields about tau / (R + step)
  tokens per second per seat, so a seat given to a near session carries more tokens. Health priority
  there means: when every seat is taken, NEW sessions wait in a `WaitingRoom` ordered by this key and
  the next free seat (a session that ended, was dropped or timed out) goes to the lowest key, with
  the aging bound above. A session once seated keeps its seat: vLLM does not preempt when
  max_num_seqs binds, and taking a seat from a session mid-answer would cost its whole prefill again.
  The same key is the engine request's `priority` (vLLM's scheduling_policy="priority",
  `engine_priority`), so under KV pressure vLLM preempts the running request with the worst aged key
  first and re-admits its preempted requests in key order; and the scheduler orders running sessions
  by it when the token budget binds (cloud/backends/vllm_plugins.py). FIFO (health_priority off) is
  the same machinery with arrival time as the key.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
from typing import Optional

RTT_SCALE_MS = 500.0
PRIORITY_MAX = 1000          # priority() of an infinitely far link; a healthy one (RTT 0 or unknown) is 0


def health_factor(rtt_ms: Optional[float]) -> float:
    """exp(-RTT/500 ms); an edge that has not measured its RTT yet counts as healthy."""
    return 1.0 if rtt_ms is None else math.exp(-max(rtt_ms, 0.0) / RTT_SCALE_MS)


def priority(rtt_ms: Optional[float]) -> int:
    return round((1.0 - health_factor(rtt_ms)) * PRIORITY_MAX)


def aged_key(rtt_ms: Optional[float], arrival_s: float, aging_per_s: float) -> float:
    """Static sort key equivalent to 'priority minus aging credit' at any common instant."""
    return priority(rtt_ms) + aging_per_s * arrival_s


def overtake_window_s(aging_per_s: float) -> float:
    """No waiter is overtaken by one arriving more than this many seconds after it (inf: no aging)."""
    return math.inf if aging_per_s <= 0 else PRIORITY_MAX / aging_per_s


def engine_priority(key: float) -> int:
    """An order key as vLLM's integer `priority` (lower first), at a thousandth of a key unit."""
    return round(key * 1000)


class OrderKey:
    """key(rtt_ms, since_s): smaller runs first. A plain object (picklable), so the same ordering can
    be handed to the in-engine scheduler, also in another process."""

    def __init__(self, aging_per_s: float, by_health: bool):
        self.aging_per_s, self.by_health = aging_per_s, by_health

    def __call__(self, rtt_ms: Optional[float], since_s: float) -> float:
        return aged_key(rtt_ms, since_s, self.aging_per_s) if self.by_health else since_s


FIFO = OrderKey(0.0, by_health=False)


def _grant(room: "WaitingRoom", fut: asyncio.Future) -> None:
    """On the waiter's loop: hand it the seat, or pass the seat on if it stopped waiting meanwhile."""
    if fut.done():
        room.give_back()
    else:
        fut.set_result(None)


class WaitingRoom:
    """At most `seats` holders; when all are taken, waiters are let in lowest `key` first (FIFO by
    default). take() is awaited on an asyncio loop; give_back() may be called from any thread (an
    engine thread frees a seat when its request ends). `key` may be replaced at any time (the
    verifier hands the backend its policy); waiters already queued keep the key they arrived with."""

    def __init__(self, seats: int, key: OrderKey = FIFO):
        self.seats, self.key = seats, key
        self._taken = 0
        self._heap: list[tuple[float, int, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._counter = itertools.count()
        self._lock = threading.Lock()

    async def take(self, rtt_ms: Optional[float]) -> float:
        """Wait for a seat; returns this waiter's order key (e.g. for engine_priority)."""
        loop = asyncio.get_running_loop()
        key = self.key(rtt_ms, time.monotonic())
        with self._lock:
            if self._taken < self.seats and not self._heap:
                self._taken += 1
                return key
            fut = loop.create_future()
            heapq.heappush(self._heap, (key, next(self._counter), fut, loop))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give_back()     # admitted just as we were cancelled: pass the seat on
            raise
        return key

    def give_back(self) -> None:
        """A holder leaves: its seat goes to the best waiter, else it is free."""
        with self._lock:
            while self._heap:
                _, _, fut, loop = heapq.heappop(self._heap)
                if not fut.done():
                    try:
                        loop.call_soon_threadsafe(_grant, self, fut)
                        return
                    except RuntimeError:  # that waiter's loop has closed: try the next one
                        continue
            self._taken -= 1

    @property
    def waiting(self) -> int:
        return len(self._heap)

    @property
    def taken(self) -> int:
        return self._taken


class AdmissionQueue(WaitingRoom):
    """The verifier's queue of verify calls: at most `max_inflight` at once, waiters admitted lowest
    key first (FIFO when not `by_health`). Used as `async with queue.slot(rtt_ms): ...`."""

    def __init__(self, max_inflight: int, aging_per_s: float, by_health: bool):
        super().__init__(max_inflight, OrderKey(aging_per_s, by_health))   # the key shared with the in-engine scheduler
        self.max_inflight = max_inflight

    async def acquire(self, rtt_ms: Optional[float]) -> None:
        await self.take(rtt_ms)

    def release(self) -> None:
        self.give_back()

    def slot(self, rtt_ms: Optional[float]):
        queue = self

        class _Slot:
            async def __aenter__(self):
                await queue.acquire(rtt_ms)

            async def __aexit__(self, *exc):
                queue.release()

        return _Slot()
