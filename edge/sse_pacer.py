"""Pacing one user's SSE stream by the user's RTT (switches.rtt_batching, common/coalesce.py: the rule).

The node commits tokens a round at a time; each round's spans are one content chunk. On a far user
link (X-Client-RTT or TCP_INFO, edge/user_rtt.py) several chunks are merged into one SSE event: held
until there are sse_chunks_per_event of them or the oldest has waited its window, whichever first.
The first chunk (TTFT) is written at once by the caller, and close() writes whatever is held: the last
chunk is never held. A timer writes held chunks when their window ends even if no new chunk comes.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Optional

from common.coalesce import Policy
from edge.text_stream import Span


class SsePacer:
    def __init__(self, policy: Optional[Policy], user_rtt_ms: Optional[float],
                 write: Callable[[list[Span]], Awaitable[None]]):
        self.policy, self.user_rtt_ms, self._write = policy, user_rtt_ms, write
        self._held: list[list[Span]] = []
        self._oldest = 0.0
        self._lock = asyncio.Lock()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timed: Optional[asyncio.Task] = None
        self.chunks = 0           # content chunks passed through (after the first)
        self.events = 0           # SSE events they went out in
        self.error: Optional[BaseException] = None    # a timed write that failed (the client left)

    async def add(self, spans: list[Span]) -> None:
        if self.error is not None:
            raise self.error
        self.chunks += 1
        if self.policy is None:
            self.events += 1
            await self._write(spans)
            return
        if not self._held:
            self._oldest = time.perf_counter()
        self._held.append(spans)
        wait = self.policy.sse_wait_ms(self.user_rtt_ms, len(self._held), (time.perf_counter() - self._oldest) * 1e3)
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait / 1e3, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timed = asyncio.get_running_loop().create_task(self._timed_flush())

    async def _timed_flush(self) -> None:
        try:
            await self.flush()
        except Exception as e:  # noqa: BLE001 - the client left: the stream's next write says so
            self.error = e

    async def flush(self) -> None:
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            held, self._held = self._held, []
            if held:
                self.events += 1
                await self._write([s for spans in held for s in spans])

    async def close(self) -> None:
        """Write what is held (the last chunk is never held back)."""
        if self._timed is not None and not self._timed.done():
            await asyncio.wait({self._timed})
        await self.flush()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timed is not None:
            self._timed.cancel()

    def figures(self) -> dict:
        return {"user_rtt_ms": None if self.user_rtt_ms is None else round(self.user_rtt_ms, 3),
                "chunks": self.chunks + 1, "events": self.events + 1, "paced": self.policy is not None}
