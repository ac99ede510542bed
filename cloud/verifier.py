"""Sessions and verify rounds on top of a backend: validation, idempotent replay, admission, stats.

A round is checked in full (draft length, every token id against the vocabulary, the context
window) before its session is looked up or created, so bad input never creates, evicts or changes
a session. Sessions are evicted least recently used first, but never one with a round in flight
(`busy`); with cloud.max_sessions_per_client a client at its cap evicts its own oldest session.
Late duplicates (a round older than the session's last one) are replayed from the last
REPLAY_ROUNDS answers or refused with 409, never recomputed (common/protocol.py says why)."""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import numpy as np

from cloud.acceptance import accept_draft, next_token
from cloud.backends.base import Backend, DraftStale, SessionEnded
from cloud.stats import CloudStats
from cloud.verify_batcher import VerifyBatcher
from common.config import CloudConfig, Switches
from common.protocol import REPLAY_ROUNDS, GenerateRequest, Timing, VerifyRequest, VerifyResponse
from common.scheduling import AdmissionQueue, priority


async def _settled(fut) -> None:
    """Wait for an awaitable whose outcome no longer matters (None: nothing to wait for)."""
    if fut is not None:
        try:
            await fut
        except Exception:  # noqa: BLE001 - stale or ended: either way nothing was verified for the edge
            pass


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: Optional[str] = None, **extra):
        super().__init__(message)
        self.status, self.message, self.field, self.extra = status, message, field, extra


def _fingerprint(req: VerifyRequest) -> tuple:
    """What makes a repeated seq the same round (a retry) rather than a different one."""
    return req.base_len, tuple(req.append), tuple(req.draft), req.guess


@dataclass
class Session:
    tokens: list[int] = field(default_factory=list)    # committed context (prompt + output so far)
    last_seq: int = -1
    answers: OrderedDict = field(default_factory=OrderedDict)   # seq -> (fingerprint, VerifyResponse), last REPLAY_ROUNDS
    rng: Optional[np.random.Generator] = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    touched: float = field(default_factory=time.monotonic)
    inflight: Optional[tuple[int, list[int], list[int]]] = None   # (seq, context, draft) of the round being verified
    busy: int = 0                      # rounds of this session inside verify() (in flight or waiting): not evictable
    client: Optional[str] = None       # the address that started it (cloud.max_sessions_per_client)

    def remember(self, seq: int, fingerprint: tuple, resp: VerifyResponse) -> None:
        self.answers[seq] = (fingerprint, resp)
        while len(self.answers) > REPLAY_ROUNDS:
            self.answers.popitem(last=False)


class Verifier:
    def __init__(self, backend: Backend, cfg: CloudConfig, switches: Switches):
        self.backend = backend
        self.cfg = cfg
        self.stats = CloudStats()
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.queue = AdmissionQueue(backend.max_inflight, cfg.priority_aging_per_s, by_health=switches.health_priority)
        if backend.verifies:
            backend.set_order(self.queue.key)   # the engine's scheduler orders sessions by the same key
        # switches.batched_verify: calls waiting together go in one backend call (cloud/verify_batcher.py)
        self.batcher = (VerifyBatcher(backend, self.queue, backend.max_batch)
                        if switches.batched_verify and hasattr(backend, "logits_many") and not backend.exact
                        and backend.max_inflight == 1 else None)

    # --- sessions ------------------------------------------------------------------------------
    def _session(self, sid: str, create: bool, client: Optional[str] = None) -> Optional[Session]:
        now = time.monotonic()
        while self.sessions:                 # least recently used first: expire from the front, O(1) per round
            oldest, s = next(iter(self.sessions.items()))
            if now - s.touched <= self.cfg.session_ttl_s:
                break
            if s.busy:                       # a round in flight keeps it (touched again when it ends)
                s.touched = now
                self.sessions.move_to_end(oldest)
                continue
            self._forget(oldest)
        s = self.sessions.get(sid)
        if s is None and create:
            self._make_room(client)
            s = self.sessions[sid] = Session(client=client)
        if s is not None:
            s.touched = now
            self.sessions.move_to_end(sid)
        return s

    def _make_room(self, client: Optional[str]) -> None:
        """Evict for one new session: the client's own oldest idle session when it is at its cap, else
        the least recently used idle session when the table is full. A session with a round in flight
        is never evicted; when there is none to evict, the new session is refused (429 / 503)."""
        cap = self.cfg.max_sessions_per_client
        if cap is not None and client is not None:
            mine = [sid for sid, s in self.sessions.items() if s.client == client]
            if len(mine) >= cap:
                victim = next((sid for sid in mine if not self.sessions[sid].busy), None)
                if victim is None:
                    raise ApiError(429, f"this client holds {cap} sessions (max_sessions_per_client), each with a "
                                   "round in flight: retry when one ends", "session_id", retry_after_s=1)
                self._forget(victim)
        while len(self.sessions) >= self.cfg.max_sessions:
            victim = next((sid for sid, s in self.sessions.items() if not s.busy), None)
            if victim is None:
                raise ApiError(503, f"all {self.cfg.max_sessions} sessions (max_sessions) have a round in flight: "
                               "retry shortly", "session_id", retry_after_s=1)
            self._forget(victim)

    def _forget(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        self.stats.evicted += 1
        self.backend.expire(sid)

    def drop(self, sid: str) -> bool:
        existed = self.sessions.pop(sid, None) is not None
        self.backend.drop(sid)
        return existed

    # --- validation ----------------------------------------------------------------------------
    def _check_tokens(self, name: str, tokens: list[int]) -> None:
        bad = next((t for t in tokens if t >= self.backend.n_vocab), None)
        if bad is not None:
            raise ApiError(422, f"{name}: token id {bad} is outside the vocabulary (size {self.backend.n_vocab})", name)

    def _check_context(self, n: int) -> None:
        if n > self.backend.n_ctx:
            raise ApiError(413, f"context of {n} tokens exceeds the target's window of {self.backend.n_ctx}", "append")

    def _check_round(self, req: VerifyRequest) -> None:
        """Everything about a round that needs no session: draft length, token ids, the window
        (base_len + append + draft is the context the round verifies if the session is in sync)."""
        if len(req.draft) > self.cfg.max_draft:
            raise ApiError(413, f"draft of {len(req.draft)} tokens exceeds max_draft {self.cfg.max_draft}", "draft")
        self._check_tokens("append", req.append)
        self._check_tokens("draft", req.draft)
        if req.guess is not None:
            self._check_tokens("guess", [req.guess])
        for i, dist in enumerate(req.draft_dists or ()):
            self._check_tokens(f"draft_dists.{i}.ids", dist.ids)
        self._check_context(req.base_len + len(req.append) + len(req.draft))

    def _late(self, s: Session, req: VerifyRequest) -> VerifyResponse:
        """A round at or before the session's last one: its stored answer if it is a retry of a round
        still remembered, else 409 with the current state. The session is not touched either way."""
        kept = s.answers.get(req.seq)
        if kept is not None and kept[0] == _fingerprint(req):
            self.stats.replayed += 1            # a retry: same answer, nothing recomputed
            return kept[1]
        self.stats.late_rounds += 1
        raise ApiError(409, f"round {req.seq} is a late duplicate: the session is at round {s.last_seq} with "
                       f"{len(s.tokens)} tokens; an older round never changes it", "seq",
                       committed_len=len(s.tokens), last_seq=s.last_seq)

    async def _logits(self, sid: str, tokens: list[int], n_logits: int, reuse: bool, rtt_ms, **exact_kw):
        if self.batcher is not None and not exact_kw:
            return await self.batcher.logits(sid, tokens, n_logits, reuse, rtt_ms)
        t0 = time.perf_counter()
        async with self.queue.slot(rtt_ms):
            t1 = time.perf_counter()
            logits, cached = await self.backend.alogits(sid, tokens, n_logits, reuse, priority(rtt_ms), **exact_kw)
        t2 = time.perf_counter()
        return logits, cached, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    # --- verify --------------------------------------------------------------------------------
    async def verify(self, req: VerifyRequest, client: Optional[str] = None) -> VerifyResponse:
        """One round. `client`: the caller's address (for cloud.max_sessions_per_client)."""
        t0 = time.perf_counter()
        self.stats.requests += 1
        self._check_round(req)                  # bad input: refused before any session is created or changed
        s = self._session(req.session_id, create=req.base_len == 0, client=client)
        if s is None:
            self.stats.resyncs += 1
            raise ApiError(409, "unknown session: resend the whole context with base_len=0", "base_len", committed_len=0)
        s.busy += 1
        try:
            return await self._verify_in(s, req, t0)
        finally:
            s.busy -= 1
            s.touched = time.monotonic()

    async def _verify_in(self, s: Session, req: VerifyRequest, t0: float) -> VerifyResponse:
        ahead = self._post_ahead(s, req) if req.guess is not None else None
        async with s.lock:
            if req.seq <= s.last_seq:           # a retry or a late duplicate: never recomputed
                try:
                    return self._late(s, req)
                finally:
                    await _settled(ahead)
            restart = req.base_len == 0         # a new session, or a re-sync of this one (seq above its last)
            if req.guess is not None and (req.seq != s.last_seq + 1 or req.base_len != len(s.tokens)
                                          or s.tokens[-1:] != [req.guess]):
                await _settled(ahead)               # stale on the engine too: it saw the same outcome
                self.stats.stale_rounds += 1
                raise ApiError(412, "draft-ahead round: the round before it did not accept its whole draft with "
                               "`guess` as its next token; nothing was verified", "guess",
                               committed_len=len(s.tokens), last_seq=s.last_seq)
            if not restart and (req.seq != s.last_seq + 1 or req.base_len != len(s.tokens)):
                self.stats.resyncs += 1
                raise ApiError(409, f"out of sync: cloud holds {len(s.tokens)} tokens after round {s.last_seq}",
                               "seq", committed_len=len(s.tokens), last_seq=s.last_seq)
            context = list(req.append) if restart else s.tokens + req.append
            if s.rng is None or restart:
                s.rng = np.random.default_rng(req.sampling.seed)
            s.inflight = (req.seq, context, req.draft)
            try:
                n, tok, cached, queue_ms, compute_ms = await self._verify_round(s, req, context, ahead)
            finally:
                s.inflight = None
            s.tokens = context + req.draft[:n] + [tok]
            s.last_seq = req.seq
            server_ms = (time.perf_counter() - t0) * 1e3
            resp = VerifyResponse(
                session_id=req.session_id, seq=req.seq, accepted=n, next_token=tok, committed_len=len(s.tokens),
                timing=Timing(queue_ms=round(queue_ms, 3), compute_ms=round(compute_ms, 3), server_ms=round(server_ms, 3)))
            if restart:
                s.answers.clear()               # answers of the old context are no retries of this one
            s.remember(req.seq, _fingerprint(req), resp)
            self.stats.round(len(req.draft), n, cached, len(context) + len(req.draft) - cached, server_ms, queue_ms)
            return resp

    def _post_ahead(self, s: Session, req: VerifyRequest):
        """Draft-ahead: a round sent while the one before it is in flight goes to a verifying engine now,
        conditional on that round's outcome (the engine checks it the moment it is known), so the
        engine never waits for the wire between the two. None: it waits its turn (then checked here)."""
        prev = s.inflight
        if (prev is None or prev[0] != req.seq - 1 or req.append or not req.reuse_cache
                or req.base_len != len(prev[1]) + len(prev[2]) + 1):
            return None
        ahead = self.backend.post_ahead(req.session_id, prev[1], prev[2] + [req.guess], req.draft, req.rtt_ms)
        if ahead is not None:
            self.stats.ahead_posted += 1
        return ahead

    async def _verify_round(self, s: Session, req: VerifyRequest, context: list[int], ahead):
        """(accepted, next token, cached tokens, queue ms, compute ms) of one round, from the engine
        (in-engine verification) or from the target's logits and our acceptance rule."""
        if self.backend.verifies:      # in-engine verification: the engine accepts and samples
            t1 = time.perf_counter()
            try:
                if ahead is not None:
                    n, tok, cached = await ahead
                else:
                    n, tok, cached = await self.backend.averify(req.session_id, context, req.draft, req.sampling,
                                                                req.rtt_ms, req.reuse_cache)
            except SessionEnded as e:
                self.drop(req.session_id)
                raise ApiError(409, f"{e}: resend the whole context with base_len=0", "base_len",
                               committed_len=0) from e
            except DraftStale as e:    # cannot happen after the check in verify(); say so if it does
                raise ApiError(412, f"draft-ahead round: {e}", "guess", committed_len=len(s.tokens)) from e
            return n, tok, cached, 0.0, (time.perf_counter() - t1) * 1e3
        if self.backend.exact:
            return await self._verify_exact(s, req, context)
        logits, cached, queue_ms, compute_ms = await self._logits(
            req.session_id, context + req.draft, len(req.draft) + 1, req.reuse_cache, req.rtt_ms)
        n, tok = accept_draft(req.draft, logits, req.sampling, req.draft_dists, s.rng)
        return n, tok, cached, queue_ms, compute_ms

    async def _verify_exact(self, s: Session, req: VerifyRequest, context: list[int]):
        """Exact mode: the target's rows one position at a time, each from a decode of its own, as the
        target alone computes them. Greedy stops at the first mismatch (row i predicts draft[i]; the
        rows after it would not be used), so a rejected tail is never evaluated."""
        rows, cached, queue_ms, compute_ms = [], 0, 0.0, 0.0
        fresh = {"prompt_len": req.prompt_len or len(context)} if req.base_len == 0 else {}
        for i in range(len(req.draft) + 1):
            logits, hit, q_ms, c_ms = await self._logits(req.session_id, context + req.draft[:i], 1,
                                                         req.reuse_cache, req.rtt_ms, **(fresh if i == 0 else {}))
            rows.append(logits[-1])
            cached, queue_ms, compute_ms = cached or hit, queue_ms + q_ms, compute_ms + c_ms
            if req.sampling.greedy and (i == len(req.draft) or int(np.argmax(rows[-1])) != req.draft[i]):
                return i, int(np.argmax(rows[-1])), cached, queue_ms, compute_ms
        n, tok = accept_draft(req.draft, np.stack(rows), req.sampling, req.draft_dists, s.rng)
        return n, tok, cached, queue_ms, compute_ms

    # --- target-only generation ------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[tuple[int, Timing]]:
        """Yield the target's own tokens one at a time (the cloud_only mode and lossless reference)."""
        self.stats.requests += 1
        self._check_tokens("prompt", req.prompt)
        self._check_context(len(req.prompt) + req.max_tokens)
        if self.backend.verifies:
            async for tok in self.backend.agenerate(req.session_id, req.prompt, req.max_tokens, req.sampling):
                self.stats.generated += 1
                yield tok, Timing()
                if tok in req.stop:
                    return
            return
        rng = np.random.default_rng(req.sampling.seed)
        tokens = list(req.prompt)
        sid = f"gen:{req.session_id}"
        try:
            for _ in range(req.max_tokens):
                logits, cached, queue_ms, compute_ms = await self._logits(sid, tokens, 1, True, None)
                tok = next_token(logits[-1], req.sampling, rng)
                tokens.append(tok)
                self.stats.generated += 1
                self.stats.cached_tokens += cached
                self.stats.computed_tokens += len(tokens) - 1 - cached
                yield tok, Timing(queue_ms=round(queue_ms, 3), compute_ms=round(compute_ms, 3))
                if tok in req.stop:
                    break
        finally:
            self.backend.drop(sid)
