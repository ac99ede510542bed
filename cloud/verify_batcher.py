"""switches.batched_verify: a CPU cloud verifies the rounds that wait together in one batch, as an
in-engine GPU cloud does per engine step.

A CPU backend computes one call at a time (max_inflight 1), so with several sessions every round waits
behind the others and each is its own llama_decode. With this switch the call that gets the backend takes
every call waiting at that moment (up to the backend's `max_batch`, one per session) and the backend
evaluates them in one `llama_decode` (LlamaCppBackend.logits_many: each session's missing tokens on its
own sequence), up to MAX_BATCH_TOKENS new tokens (a prompt's prefill goes alone). On a CPU, a batch of several rounds costs much less than that many decodes (the weights are
read once), and the rounds answered together are one step: their answers share a WebSocket frame
(switches.rtt_batching), and their sessions' next drafts share a draft step at the edge. When a batch is
computed, each of its rounds is marked as such (common/coalesce.py COMPUTED, with the batch's number) before
any of their answers is finished, so that the first answer's frame waits for the others of its batch.

Not in exact mode (each token is evaluated alone there). Numbers: a round's logits may differ in the last
bits from those of the round alone (llama.cpp's kernels depend on the batch), as they already differ
between a 1+k-token verify and one-token decodes; cloud.exact is the bit-for-bit mode.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from common.coalesce import COMPUTED
from common.scheduling import AdmissionQueue

MAX_BATCH_TOKENS = 512     # tokens one batch evaluates at most (the first call always goes): a prompt's prefill
                           # does not hold a step of verify rounds back, nor do eight prefills wait for each other


@dataclass(eq=False)
class _Call:
    session_id: str
    tokens: list[int]
    n_logits: int
    reuse: bool
    fut: asyncio.Future
    t0: float = field(default_factory=time.perf_counter)
    computed: Optional[Callable[[int], None]] = field(default_factory=COMPUTED.get)   # the caller's (its context)


class VerifyBatcher:
    def __init__(self, backend, queue: AdmissionQueue, max_batch: int, max_tokens: int = MAX_BATCH_TOKENS):
        self.backend, self.queue, self.max_batch, self.max_tokens = backend, queue, max(1, max_batch), max_tokens
        self.pending: list[_Call] = []
        self.batches = 0          # backend calls made
        self.calls = 0            # calls answered by them

    async def logits(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool,
                     rtt_ms: Optional[float]) -> tuple:
        """(logits, cached, queue ms, compute ms) of one call, computed in a batch with the calls waiting."""
        call = _Call(session_id, tokens, n_logits, reuse, asyncio.get_running_loop().create_future())
        self.pending.append(call)
        acq = asyncio.ensure_future(self.queue.acquire(rtt_ms))
        try:
            # the backend, or an answer from a batch that someone else ran: whichever comes first
            await asyncio.wait({acq, call.fut}, return_when=asyncio.FIRST_COMPLETED)
            if not acq.done():
                acq.cancel()                     # answered meanwhile: leave the queue (a seat granted just now
                with contextlib.suppress(asyncio.CancelledError):     # is passed on by acquire itself)
                    await acq
            if _held(acq) and not call.fut.done():
                await self._run(call)
            return await call.fut
        finally:
            if call in self.pending:
                self.pending.remove(call)
            if not acq.done():
                acq.cancel()
            elif _held(acq):
                self.queue.release()

    async def _run(self, mine: _Call) -> None:
        batch, sessions = [mine], {mine.session_id}
        budget = self.max_tokens - self._new_tokens(mine)
        for c in self.pending:                   # first come first: they all waited, they all go now
            if len(batch) >= self.max_batch:
                break
            if c is not mine and c.session_id not in sessions and not c.fut.done():
                n = self._new_tokens(c)
                if n > budget:                   # a prompt's prefill waits for a batch of its own
                    continue
                budget -= n
                batch.append(c)
                sessions.add(c.session_id)
        for c in batch:
            self.pending.remove(c)
        t1 = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.backend.logits_many,
                                              [(c.session_id, c.tokens, c.n_logits, c.reuse) for c in batch])
        except Exception as e:  # noqa: BLE001 - every round of the batch fails as its call alone would
            for c in batch:
                if not c.fut.done():
                    c.fut.set_exception(e)
            return
        t2 = time.perf_counter()
        self.batches += 1
        self.calls += len(batch)
        for c in batch:                          # all of the batch is computed: tell each caller's link first
            if c.computed is not None and not c.fut.done():
                c.computed(self.batches)
        for c, (logits, cached) in zip(batch, results):
            if not c.fut.done():
                c.fut.set_result((logits, cached, (t1 - c.t0) * 1e3, (t2 - t1) * 1e3))


    def _new_tokens(self, c: _Call) -> int:
        count = getattr(self.backend, "new_tokens", None)
        return count(c.session_id, c.tokens, c.n_logits, c.reuse) if count else len(c.tokens)


def _held(acq: asyncio.Future) -> bool:
    return acq.done() and not acq.cancelled() and acq.exception() is None
