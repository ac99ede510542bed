"""The edge's generation loop in three modes: edge-cloud speculation, edge-only, cloud-only."""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, Optional

import numpy as np

from cloud.acceptance import next_token
from common.config import TandemConfig
from common.protocol import GenerateRequest, SamplingParams, VerifyRequest
from edge.cloud_client import CloudClient, CloudError
from edge.drafter import Drafter


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


@dataclass
class GenStats:
    mode: str
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accept_hist: Counter = field(default_factory=Counter)   # accepted drafts per round -> rounds
    tokens: int = 0
    ttft_ms: Optional[float] = None
    total_ms: float = 0.0
    draft_ms: float = 0.0         # edge model time
    compute_ms: float = 0.0       # cloud model time
    round_wall_ms: float = 0.0    # verify round trips as seen by the edge
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
            "tokens": self.tokens, "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "total_ms": round(self.total_ms, 1),
            "tokens_per_s": round(self.tokens / (self.total_ms / 1e3), 2) if self.total_ms else None,
            "decode_tokens_per_s": round((self.tokens - 1) / ((self.total_ms - self.ttft_ms) / 1e3), 2)
            if self.tokens > 1 and self.ttft_ms is not None and self.total_ms > self.ttft_ms else None,
            "rounds_per_100_tokens": round(100 * self.rounds / self.tokens, 2) if self.tokens and self.rounds else None,
            "draft_ms_per_round": round(self.draft_ms / r, 2) if self.rounds else None,
            "compute_ms_per_round": round(self.compute_ms / r, 2) if self.rounds else None,
            # serialisation + HTTP + scheduling: what a round costs beyond the two models
            "overhead_ms_per_round": round((self.round_wall_ms - self.compute_ms) / r, 3) if self.rounds else None,
            "error": self.error,
        }


class Generator:
    def __init__(self, drafter: Drafter, client: Optional[CloudClient], cfg: TandemConfig):
        self.drafter = drafter
        self.client = client
        self.cfg = cfg
        self.reuse_kv = cfg.switches.kv_cache         # the one read of this switch (edge and cloud)
        self.stop_tokens = drafter.runner.stop_tokens()

    async def stream(self, prompt: list[int], max_tokens: int, sampling: SamplingParams,
                     stats: GenStats) -> AsyncIterator[list[int]]:
        """Yield committed tokens as they come; `stats` is filled in as we go. On a cloud failure the
        tokens already yielded stand and stats.error says what happened."""
        t0 = time.perf_counter()
        loop = {Mode.EDGE_CLOUD: self._speculate, Mode.EDGE_ONLY: self._edge_only,
                Mode.CLOUD_ONLY: self._cloud_only}[Mode(stats.mode)]
        try:
            async with aclosing(loop(list(prompt), max_tokens, sampling, stats)) as rounds:
                async for toks in rounds:
                    toks = toks[:max_tokens - stats.tokens]
                    if stats.ttft_ms is None:
                        stats.ttft_ms = (time.perf_counter() - t0) * 1e3
                    stop = next((i for i, t in enumerate(toks) if t in self.stop_tokens), None)
                    toks = toks if stop is None else toks[:stop + 1]
                    stats.tokens += len(toks)
                    yield toks
                    if stop is not None or stats.tokens >= max_tokens:
                        break
        except Exception as e:  # CloudError, CloudUnavailable, ...: keep what was generated
            stats.error = f"{type(e).__name__}: {e}"
        finally:
            stats.total_ms = (time.perf_counter() - t0) * 1e3

    async def _speculate(self, context, max_tokens, sampling, stats) -> AsyncIterator[list[int]]:
        sid, rng = uuid.uuid4().hex, np.random.default_rng(sampling.seed)
        cloud_len, seq, n_prompt = 0, 0, len(context)     # tokens the cloud holds for this session
        try:
            while len(context) - n_prompt < max_tokens:
                # 1. Draft up to max_k tokens on the edge (stops early when confidence is low).
                k = max(1, min(self.cfg.draft.max_k, max_tokens - (len(context) - n_prompt) - 1))
                d = await asyncio.to_thread(self.drafter.draft, context, k, sampling, rng, self.reuse_kv)
                # 2. The cloud verifies all k in one target pass: accepted prefix + the target's token.
                req = VerifyRequest(session_id=sid, seq=seq, base_len=cloud_len, append=context[cloud_len:],
                                    draft=d.tokens, draft_dists=d.dists, sampling=sampling,
                                    reuse_cache=self.reuse_kv, rtt_ms=self.client.rtt_ms)
                try:
                    r, wall_ms = await self.client.verify(req)
                except CloudError as e:
                    if e.status != 409 or cloud_len == 0:
                        raise
                    cloud_len = 0                  # cloud lost the session (restart/eviction): resend all
                    continue
                # 3. Commit; the drafter's KV is rolled back to this context at the next draft().
                new = d.tokens[:r.accepted] + [r.next_token]
                stats.trace.append((len(context) - n_prompt, d.tokens, r.accepted, round(d.ms, 2)))
                context += new
                cloud_len, seq = r.committed_len, seq + 1
                stats.rounds += 1
                stats.drafted += len(d.tokens)
                stats.accepted += r.accepted
                stats.accept_hist[r.accepted] += 1
                stats.draft_ms += d.ms
                stats.compute_ms += r.timing.compute_ms
                stats.round_wall_ms += wall_ms
                yield new
        finally:
            await self.client.drop(sid)

    async def _edge_only(self, context, max_tokens, sampling, stats) -> AsyncIterator[list[int]]:
        rng = np.random.default_rng(sampling.seed)
        for _ in range(max_tokens):
            t = time.perf_counter()
            logits, _ = await asyncio.to_thread(self.drafter.runner.extend_to, context, 1, self.reuse_kv)
            tok = next_token(logits[-1], sampling, rng)
            stats.draft_ms += (time.perf_counter() - t) * 1e3
            context.append(tok)
            yield [tok]

    async def _cloud_only(self, context, max_tokens, sampling, stats) -> AsyncIterator[list[int]]:
        req = GenerateRequest(session_id=uuid.uuid4().hex, prompt=context, max_tokens=max_tokens,
                              sampling=sampling, stop=sorted(self.stop_tokens))
        async for chunk in self.client.generate(req):
            if chunk.token_ids:
                yield chunk.token_ids
            if chunk.timing:
                stats.compute_ms += chunk.timing.compute_ms
