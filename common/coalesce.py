"""Application-level Nagle: when to send what is ready in one frame, and when to wait for more.
One policy for all three hops (switches.rtt_batching; thresholds in `coalesce:`):

  cloud -> edge   verify answers of one link's sessions, one WebSocket frame (cloud/server.py)
  edge -> cloud   verify rounds of one edge's sessions, one WebSocket frame (edge/link.py)
  edge -> user    the SSE chunks of one answer, one event (edge/openai_api.py)

The rule. Whatever becomes ready in the same event-loop pass travels together at no cost (the answers
one engine step settles, the drafts one batched draft step makes). Beyond that, a link whose RTT is
below `min_rtt_ms` sends at once: a near link is not made to wait. A farther link may hold a frame
for at most `rtt_fraction` of its RTT, never more than `max_wait_ms`, and sends early as soon as
everything it is waiting for is in (every round of the link that the cloud holds has its answer;
every session of the edge has its draft), or as soon as the rest cannot come within the window (the
link's answers have been coming further apart than what is left of it: a CPU cloud verifies one round
at a time, a few hundred ms each, so a frame does not wait in vain for the next). Except for the rest of
the step that is ending: the answers of rounds whose target work is done (`due`: the backend computed
them, the cloud is finishing their answers) come within milliseconds however far off the next step is,
so a frame always waits for those (within the window). Without that a step's first answer went alone
and the rest a few ms later: on a 2-core CPU cloud finishing each answer (acceptance over the
vocabulary) takes a millisecond or more, and the next batch starts meanwhile. Why: a far link pays for
every frame and every wake-up at both ends, and a few ms of coalescing are small beside its RTT; the
wait is bounded in proportion to the RTT, so it never costs a round more than that fraction of what the
link already costs it.

Who coalesces: the edge asks for it (switches.rtt_batching, read by the edge through from_config) for
its rounds, its users' streams, and, by opening its WebSocket with `?coalesce=1`, for the answers the
cloud sends it; the cloud coalesces exactly the links whose edge asked (its thresholds are its own
`coalesce:` section). So one cloud serves edges with the switch on and off side by side.

The user's stream follows seed 000's rule on top of the same bound: every chunk at once below
`sse_min_rtt_ms` (300), up to `sse_chunks` (8) chunks in one event above it and `sse_far_chunks` (20)
above `sse_far_rtt_ms` (1,000), and a chunk is never held longer than the window above. The first
chunk (time to first token) and the last one are never held.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from typing import Awaitable, Callable, Optional

log = logging.getLogger("tandem.coalesce")

__all__ = ["Policy", "from_config", "Coalescer", "Cadence", "HOLD_BUCKETS_MS", "hold_quantile_ms", "COMPUTED",
           "WS_QUERY"]

WS_QUERY = "coalesce"     # GET /v1/ws?coalesce=1: the edge asks the cloud to coalesce this link's answers

# Set by whoever awaits a verify round (cloud/server.py, per round: its own task's context) to a callback
# `computed(step)`; the backend path that computes the round's target work calls it, with an id of the step
# (batch) that did, once that work is done and only the answer's finishing is left (cloud/verify_batcher.py).
# The round's answer is then `due`: a frame waits for it (Policy.wait_ms), and answers of one step are one
# burst (Cadence). A backend that does not call it leaves the rule as it was (bursts by time).
COMPUTED: contextvars.ContextVar[Optional[Callable[[int], None]]] = contextvars.ContextVar("tandem_computed",
                                                                                          default=None)

# how long messages waited for company, counted per message in these buckets (upper bounds, ms): counters
# that a benchmark can diff before and after (ablations/runner.py: added_ms_p50)
HOLD_BUCKETS_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, math.inf)


def hold_bucket(ms: float) -> int:
    return next(i for i, b in enumerate(HOLD_BUCKETS_MS) if ms <= b)


def hold_quantile_ms(counts: list[int], q: float) -> Optional[float]:
    """The q-quantile of the holds counted in `counts` (per HOLD_BUCKETS_MS), interpolated linearly
    within its bucket (the last, unbounded bucket reports its lower edge); None when nothing was counted."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            lo = 0.0 if i == 0 else HOLD_BUCKETS_MS[i - 1]
            hi = HOLD_BUCKETS_MS[i]
            return lo if math.isinf(hi) else lo + (hi - lo) * max(0.0, rank - seen) / n
        seen += n
    return HOLD_BUCKETS_MS[-2]


class Policy:
    """The thresholds (a `coalesce:` config section) and the decisions, as pure functions."""

    def __init__(self, min_rtt_ms: float = 100.0, rtt_fraction: float = 0.5, max_wait_ms: float = 250.0,
                 sse_min_rtt_ms: float = 300.0, sse_chunks: int = 8, sse_far_rtt_ms: float = 1000.0,
                 sse_far_chunks: int = 20):
        self.min_rtt_ms, self.rtt_fraction, self.max_wait_ms = min_rtt_ms, rtt_fraction, max_wait_ms
        self.sse_min_rtt_ms, self.sse_chunks = sse_min_rtt_ms, sse_chunks
        self.sse_far_rtt_ms, self.sse_far_chunks = sse_far_rtt_ms, sse_far_chunks

    @classmethod
    def of(cls, section) -> "Policy":
        """From a CoalesceConfig (common/config.py), or anything with the same fields."""
        return cls(**{k: getattr(section, k) for k in ("min_rtt_ms", "rtt_fraction", "max_wait_ms", "sse_min_rtt_ms",
                                                        "sse_chunks", "sse_far_rtt_ms", "sse_far_chunks")})

    def window_ms(self, rtt_ms: Optional[float], min_rtt_ms: Optional[float] = None) -> float:
        """How long a frame may be held on a link of this RTT: 0 below the threshold (or unknown RTT)."""
        floor = self.min_rtt_ms if min_rtt_ms is None else min_rtt_ms
        if rtt_ms is None or not math.isfinite(rtt_ms) or rtt_ms < floor:
            return 0.0
        return min(self.max_wait_ms, self.rtt_fraction * rtt_ms)

    def wait_ms(self, rtt_ms: Optional[float], held: int, missing: int, oldest_age_ms: float,
                next_in_ms: Optional[float] = None, due: int = 0) -> float:
        """How much longer to hold `held` items (0: send now). missing: items of the same step not
        ready yet (answers still being verified, drafts still being made); none missing: send now.
        next_in_ms: when the next of them is expected (None: unknown); later than the window: send now,
        unless `due` of the missing are the step's own, computed and being finished: wait for those."""
        if held <= 0 or missing <= 0:
            return 0.0                                   # everything of the step is in: flush early
        left = max(0.0, self.window_ms(rtt_ms) - oldest_age_ms)
        if due > 0:
            return left                                  # the rest of this step: it comes now
        if next_in_ms is not None and next_in_ms > left:
            return 0.0                                   # the rest comes too late: do not wait in vain
        return left

    def sse_chunks_per_event(self, user_rtt_ms: Optional[float]) -> int:
        """Seed 000's rule: 1 below 300 ms, 8 above, 20 above 1,000 ms (the thresholds are config)."""
        if user_rtt_ms is None or not math.isfinite(user_rtt_ms) or user_rtt_ms < self.sse_min_rtt_ms:
            return 1
        return self.sse_far_chunks if user_rtt_ms >= self.sse_far_rtt_ms else self.sse_chunks

    def sse_wait_ms(self, user_rtt_ms: Optional[float], held: int, oldest_age_ms: float,
                    first: bool = False, last: bool = False) -> float:
        """How much longer to hold `held` chunks of a user's stream (0: send now). The first chunk (TTFT)
        and the last are never held; a full event goes at once; no chunk waits past the window."""
        if held <= 0 or first or last:
            return 0.0
        if held >= self.sse_chunks_per_event(user_rtt_ms):
            return 0.0
        return max(0.0, self.window_ms(user_rtt_ms, self.sse_min_rtt_ms) - oldest_age_ms)


class Cadence:
    """When a stream of items (one link's answers) is due next: an EWMA of the gaps between consecutive
    bursts (the answers of one step: those of the same `step` where the backend says which (COMPUTED),
    else items within BURST_MS of the burst's first), counted only while more were outstanding (an idle
    link's silence is no gap). next_in_ms is that gap minus the time since the last burst (None before
    two bursts)."""
    BURST_MS = 2.0

    def __init__(self, weight: float = 0.25):
        self.weight, self.gap_ms, self._last, self._step = weight, None, None, None

    def item(self, more_outstanding: bool, step: Optional[int] = None) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._last, self._step = now, step
        else:
            gap = (now - self._last) * 1e3
            same = step == self._step if step is not None and self._step is not None else gap < self.BURST_MS
            if not same:                         # a new burst (else: the same step's answers)
                self.gap_ms = gap if self.gap_ms is None else (1 - self.weight) * self.gap_ms + self.weight * gap
                self._last, self._step = now, step
        if not more_outstanding:
            self._last = None

    def next_in_ms(self) -> Optional[float]:
        if self.gap_ms is None or self._last is None:
            return None
        return max(0.0, self.gap_ms - (time.perf_counter() - self._last) * 1e3)


def from_config(cfg) -> Optional[Policy]:
    """The one place switches.rtt_batching is read (by the edge: edge/node.py for its link, which asks
    the cloud for coalesced answers, edge/openai_api.py for its users' streams): the policy, or None
    (each frame goes alone, as before the switch). cfg: a TandemConfig."""
    return Policy.of(cfg.coalesce) if cfg.switches.rtt_batching else None


class Coalescer:
    """One sender for one connection: `put(text)` queues a JSON message; one task sends what is queued
    as frames, several in one batch envelope (`pack`: common/protocol.py batch_frame) or alone, holding
    them as the policy says (with the switch off there is no Coalescer: each message is its own frame).
    `missing()` counts what the step still lacks, `due()` how many of those are computed and being
    finished (Policy.wait_ms); `rtt_ms()` is the link's RTT now; `next_in_ms()` when the next missing item
    is expected (None: unknown). `send(text, messages, held_ms)` writes one frame
    of that many messages, which waited held_ms in all for company. Frames go in order, one at a time."""

    def __init__(self, policy: Policy, send: Callable[[str, int, float], Awaitable[None]],
                 rtt_ms: Callable[[], Optional[float]], missing: Callable[[], int],
                 pack: Callable[[list[str]], str], name: str = "coalescer",
                 next_in_ms: Callable[[], Optional[float]] = lambda: None, due: Callable[[], int] = lambda: 0):
        self.policy, self._send, self._rtt_ms, self._missing, self._pack = policy, send, rtt_ms, missing, pack
        self._next_in_ms, self._due = next_in_ms, due
        self._items: list[str] = []
        self._put_s: list[float] = []      # when each item came
        self._oldest = 0.0
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._name = name
        self.frames = 0            # frames sent
        self.messages = 0          # messages sent (in those frames)
        self.bytes = 0             # bytes of text sent
        self.held_ms = 0.0         # total time messages waited for company (sum over messages)
        self.hold_counts = [0] * len(HOLD_BUCKETS_MS)    # messages by how long they waited (HOLD_BUCKETS_MS)
        self.closed = False

    def put(self, text: str) -> None:
        if self.closed:
            return
        now = time.perf_counter()
        if not self._items:
            self._oldest = now
        self._items.append(text)
        self._put_s.append(now)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"tandem-{self._name}")

    def poke(self) -> None:
        """Something the policy looks at changed (an answer left the step): decide again."""
        if self._items:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._items)

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._items:
                    continue
                await asyncio.sleep(0)          # what becomes ready in this pass of the loop travels along
                while self._items:
                    age_ms = (time.perf_counter() - self._oldest) * 1e3
                    wait = self.policy.wait_ms(self._rtt_ms(), len(self._items), self._missing(), age_ms,
                                               self._next_in_ms(), self._due())
                    if wait <= 0:
                        break
                    try:                        # a new item or a finished answer may complete the step
                        async with asyncio.timeout(wait / 1e3):
                            await self._wake.wait()
                    except TimeoutError:
                        break
                    self._wake.clear()
                    await asyncio.sleep(0)
                if self._items:
                    batch, self._items, put_s, self._put_s = self._items, [], self._put_s, []
                    now = time.perf_counter()
                    holds = [(now - t) * 1e3 for t in put_s]
                    for ms in holds:
                        self.hold_counts[hold_bucket(ms)] += 1
                    text = batch[0] if len(batch) == 1 else self._pack(batch)
                    self.frames += 1
                    self.messages += len(batch)
                    self.bytes += len(text)
                    self.held_ms += sum(holds)
                    await self._send(text, len(batch), sum(holds))
        except asyncio.CancelledError:
            raise
        except Exception as e:             # the connection is gone: nothing more can be sent on it
            log.debug("%s stopped: %s: %s", self._name, type(e).__name__, e)
            self.closed = True
            self._items.clear()
            self._put_s.clear()

    async def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
                pass
