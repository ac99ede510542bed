"""The edge's generation loop in three modes: edge-cloud speculation, edge-only, cloud-only; and the
fallback that keeps an answer going edge-only while the cloud is away.

Every committed token carries its provenance: "draft" (drafted here, accepted by the target),
"target" (the target's own token: a correction, a bonus, or cloud-only output) or "edge" (the draft
model alone: edge-only mode, or a fallback while the cloud is unreachable).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from contextlib import aclosing
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, NamedTuple, Optional

import numpy as np

from common.config import TandemConfig
from common.errors import CloudError, CloudUnavailable
from common.protocol import GenerateRequest, SamplingParams, VerifyRequest
from edge.drafter import Drafter
from edge.sessions import EdgeBusy  # noqa: F401  (re-exported: the HTTP layer answers it with 429)

DRAFT, TARGET, EDGE = "draft", "target", "edge"


class Mode(str, Enum):
    EDGE_CLOUD = "edge_cloud"
    EDGE_ONLY = "edge_only"
    CLOUD_ONLY = "cloud_only"


def resolve_mode(cfg: TandemConfig, override: Optional[Mode] = None) -> Mode:
    """The one read of the draft_verify and cloud_only switches; a CLI flag overrides both."""
    if override is not None:
        return override
    if cfg.switches.cloud_only:
        return Mode.CLOUD_ONLY
    return Mode.EDGE_CLOUD if cfg.switches.draft_verify else Mode.EDGE_ONLY


class Piece(NamedTuple):
    token_ids: list[int]
    text: str
    sources: list[str]          # one per token: DRAFT | TARGET | EDGE


@dataclass
class GenStats:
    mode: str
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accept_hist: Counter = field(default_factory=Counter)   # accepted drafts per round -> rounds
    by_source: Counter = field(default_factory=Counter)     # committed tokens by provenance
    tokens: int = 0
    prompt_tokens: int = 0
    fallbacks: int = 0            # times the answer went on edge-only because the cloud was unreachable
    resumed: int = 0              # times it went back to verified mode when the cloud returned
    ttft_ms: Optional[float] = None
    total_ms: float = 0.0
    draft_ms: float = 0.0         # edge model time
    compute_ms: float = 0.0       # cloud model time
    round_wall_ms: float = 0.0    # verify round trips as seen by the edge
    rtt_ms: Optional[float] = None
    error: Optional[str] = None
    trace: list = field(default_factory=list)   # per round: (output position, draft, accepted, draft ms)

    def as_dict(self) -> dict:
        r = self.rounds or 1
        return {
            "mode": self.mode, "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
            # tau: tokens committed per verify round = accepted drafts + the target's own token
            "mean_accepted_length": round((self.accepted + self.rounds) / r, 3) if self.rounds else None,
            "accept_hist": {str(k): v for k, v in sorted(self.accept_hist.items())},
            "tokens_by_source": {s: self.by_source[s] for s in (DRAFT, TARGET, EDGE)},
            "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
            "fallbacks": self.fallbacks, "resumed": self.resumed,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "total_ms": round(self.total_ms, 1),
            "tokens_per_s": round(self.tokens / (self.total_ms / 1e3), 2) if self.total_ms else None,
            # TPOT as vllm bench serve defines it: time after the first token / tokens after the first
            "tpot_ms": round((self.total_ms - self.ttft_ms) / (self.tokens - 1), 2)
            if self.tokens > 1 and self.ttft_ms is not None else None,
            "rounds_per_100_tokens": round(100 * self.rounds / self.tokens, 2) if self.tokens and self.rounds else None,
            "draft_ms_per_round": round(self.draft_ms / r, 2) if self.rounds else None,
            "compute_ms_per_round": round(self.compute_ms / r, 2) if self.rounds else None,
            "compute_ms": round(self.compute_ms, 2),     # the cloud's model time for the whole answer
            # serialisation + HTTP + scheduling: what a round costs beyond the two models
            "overhead_ms_per_round": round((self.round_wall_ms - self.compute_ms) / r, 3) if self.rounds else None,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 2),
            "error": self.error,
        }


class Generator:
    def __init__(self, drafter: Drafter, link, cfg: TandemConfig, stop_tokens: set[int]):
        self.drafter = drafter
        self.link = link                               # edge/link.py CloudLink (None: edge-only node)
        self.cfg = cfg
        self.reuse_kv = cfg.switches.kv_cache         # the one read of this switch (edge and cloud)
        self.fallback = cfg.edge.fallback == "edge_only"
        self.stop_tokens = stop_tokens

    async def stream(self, seq: int, prompt: list[int], max_tokens: int, sampling: SamplingParams,
                     stats: GenStats, t0: Optional[float] = None) -> AsyncIterator[tuple[list[int], list[str]]]:
        """Yield (tokens, their sources) as they are committed, on draft-model sequence `seq`; `stats`
        is filled in as we go (TTFT counts from t0, the request's arrival). On a failure the tokens
        already yielded stand and stats.error says what happened."""
        t0 = time.perf_counter() if t0 is None else t0
        stats.prompt_tokens = len(prompt)
        loop = {Mode.EDGE_CLOUD: self._speculate, Mode.EDGE_ONLY: self._edge_only,
                Mode.CLOUD_ONLY: self._cloud_only}[Mode(stats.mode)]
        try:
            async with aclosing(loop(seq, list(prompt), max_tokens, sampling, stats)) as rounds:
                async for toks, sources in rounds:
                    toks = toks[:max_tokens - stats.tokens]
                    if stats.ttft_ms is None:
                        stats.ttft_ms = (time.perf_counter() - t0) * 1e3
                    stop = next((i for i, t in enumerate(toks) if t in self.stop_tokens), None)
                    toks = toks if stop is None else toks[:stop + 1]
                    stats.tokens += len(toks)
                    stats.by_source.update(sources[:len(toks)])
                    yield toks, sources[:len(toks)]
                    if stop is not None or stats.tokens >= max_tokens:
                        break
        except Exception as e:  # CloudError, CloudUnavailable, ...: keep what was generated
            stats.error = f"{type(e).__name__}: {e}"
        finally:
            stats.total_ms = (time.perf_counter() - t0) * 1e3
            stats.rtt_ms = self.link.rtt_ms if self.link else None

    async def _speculate(self, seq, context, max_tokens, sampling, stats):
        sid, rng = uuid.uuid4().hex, np.random.default_rng(sampling.seed)
        cloud_len, n, n_prompt = 0, 0, len(context)      # tokens the cloud holds for this session; round number
        try:
            while len(context) - n_prompt < max_tokens:
                # 1. Draft up to max_k tokens on the edge (stops early when confidence is low).
                k = max(1, min(self.cfg.draft.max_k, max_tokens - (len(context) - n_prompt) - 1))
                d = await self.drafter.draft(seq, context, k, sampling, rng, self.reuse_kv)
                # 2. The cloud verifies all k in one target pass: accepted prefix + the target's token.
                req = VerifyRequest(session_id=sid, seq=n, base_len=cloud_len, append=context[cloud_len:],
                                    draft=d.tokens, draft_dists=d.dists, sampling=sampling,
                                    reuse_cache=self.reuse_kv, rtt_ms=self.link.rtt_ms,
                                    prompt_len=n_prompt if cloud_len == 0 else None)
                try:
                    r, wall_ms = await self.link.verify(req)
                except CloudError as e:
                    if e.status != 409 or cloud_len == 0:
                        raise
                    cloud_len = 0                  # cloud lost the session (restart/eviction): resend all
                    continue
                except CloudUnavailable:
                    if not self.fallback:
                        raise
                    # 2'. The cloud is away: go on with the draft model alone until it is back, then
                    # re-sync the whole context (a new cloud session) and verify again.
                    stats.fallbacks += 1
                    async for tok in self._until_cloud_back(seq, context, n_prompt + max_tokens, sampling, rng):
                        context.append(tok)
                        yield [tok], [EDGE]
                    if len(context) - n_prompt >= max_tokens:
                        return
                    stats.resumed += 1
                    sid, cloud_len, n = uuid.uuid4().hex, 0, 0
                    continue
                # 3. Commit; the drafter's KV is rolled back to this context at the next draft.
                new = d.tokens[:r.accepted] + [r.next_token]
                stats.trace.append((len(context) - n_prompt, d.tokens, r.accepted, round(d.ms, 2)))
                context += new
                cloud_len, n = r.committed_len, n + 1
                stats.rounds += 1
                stats.drafted += len(d.tokens)
                stats.accepted += r.accepted
                stats.accept_hist[r.accepted] += 1
                stats.draft_ms += d.ms
                stats.compute_ms += r.timing.compute_ms
                stats.round_wall_ms += wall_ms
                yield new, [DRAFT] * r.accepted + [TARGET]
        finally:
            if cloud_len and self.link.up:
                asyncio.get_running_loop().create_task(self.link.drop(sid))   # best effort, off the answer's path

    async def _until_cloud_back(self, seq, context, limit, sampling, rng):
        """Edge-only tokens while the link is down (a stop token ends the answer in stream())."""
        while len(context) < limit and not self.link.up:
            yield await self.drafter.next_token(seq, context, sampling, rng, self.reuse_kv)

    async def _edge_only(self, seq, context, max_tokens, sampling, stats):
        rng = np.random.default_rng(sampling.seed)
        for _ in range(max_tokens):
            t = time.perf_counter()
            tok = await self.drafter.next_token(seq, context, sampling, rng, self.reuse_kv)
            stats.draft_ms += (time.perf_counter() - t) * 1e3
            context.append(tok)
            yield [tok], [EDGE]

    async def _cloud_only(self, seq, context, max_tokens, sampling, stats):
        req = GenerateRequest(session_id=uuid.uuid4().hex, prompt=context, max_tokens=max_tokens,
                              sampling=sampling, stop=sorted(self.stop_tokens))
        async for chunk in self.link.generate(req):
            if chunk.token_ids:
                yield chunk.token_ids, [TARGET] * len(chunk.token_ids)
            if chunk.timing:
                stats.compute_ms += chunk.timing.compute_ms
