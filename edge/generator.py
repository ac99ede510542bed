"""The edge's generation loop in three modes: edge-cloud speculation, edge-only, cloud-only; and the
fallback that keeps an answer going edge-only while the cloud is away.

Every committed token carries its provenance: "draft" (drafted here, accepted by the target),
"target" (the target's own token: a correction, a bonus, or cloud-only output) or "edge" (the draft
model alone: edge-only mode, or a fallback while the cloud is unreachable).

Edge-cloud drafting adapts to the link, each part behind its own switch (read in Generator.__init__):
the draft length (adaptive_draft, edge/draft_length.py), rounds drafted and sent while the one before is
in flight (draft_ahead), prompt-lookup drafts (ngram_draft, edge/ngram.py) and round 0 sent with the
prompt alone so both sides prefill at once (parallel_prefill). _speculate says why sampling stays exact.
"""
from __future__ import annotations

import asyncio
import hashlib
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
from edge.draft_length import (LOOKUP_ALPHA0, Acceptance, Calibration, RateGate, VerifyCost, best_draft_length,
                               drafting_ms, round_rate)
from edge.drafter import Draft, Drafter
from edge.ngram import lookup, one_hot
from edge.sessions import EdgeBusy  # noqa: F401  (re-exported: the HTTP layer answers it with 429)

DRAFT, TARGET, EDGE = "draft", "target", "edge"
FIRST_K = 4        # switches.adaptive_draft: the draft length until the drafter has timed a step
AHEAD_HOLD0 = 0.5  # switches.draft_ahead: a session's share of rounds drafted ahead that hold, before it has any


class _Flight(NamedTuple):
    """A round: the context it was drafted after, its draft, the guessed token before it (draft-ahead)
    and its verify call (None: a draft held, not sent)."""
    base: list[int]
    draft: Draft
    guess: Optional[int]
    task: Optional[asyncio.Task]
    fresh: bool                # it starts (or re-syncs) the cloud's session: its verify time includes a prefill


def _draft_rng(seeds: np.random.SeedSequence, context: list[int], extra: int) -> np.random.Generator:
    """The random stream of the draft for `context` (extra = 1: a draft-ahead draft, guess first)."""
    digest = hashlib.blake2b(np.asarray(context, dtype=np.int64).tobytes(), digest_size=8).digest()
    key = (int.from_bytes(digest, "little"), len(context), extra)
    return np.random.default_rng(np.random.SeedSequence(seeds.entropy, spawn_key=key))


def _lookup_draft(tokens: list[int], sampling: SamplingParams) -> Draft:
    """A prompt-lookup draft: no model time; each token's proposal law is a point mass (edge/ngram.py)."""
    return Draft(tokens, one_hot(tokens) if not sampling.greedy else None, [1.0] * len(tokens), 0.0, "lookup")


class _Acceptances(NamedTuple):
    """A session's acceptance estimates, one per draft source, and the share of its rounds drafted ahead
    that held (edge/draft_length.py)."""
    model: Acceptance
    lookup: Acceptance
    ahead: Acceptance


def _sent(coro) -> asyncio.Task:
    """A round's verify call as a task; an answer nobody waits for any more (a dropped round's 412, a round
    in flight when the answer ended) is taken here, not reported as never retrieved."""
    task = asyncio.create_task(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def _settled(task: asyncio.Task) -> None:
    """Wait for a dropped round's answer (a 412, or any error): only that it has landed matters."""
    try:
        await task
    except Exception:  # noqa: BLE001 - stale or failed: nothing of it is used
        pass


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
    ahead_kept: int = 0           # rounds sent ahead (switches.draft_ahead) that the cloud verified
    ahead_dropped: int = 0        # ... and that it refused (412: the round before ended otherwise)
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
            "ahead_kept": self.ahead_kept, "ahead_dropped": self.ahead_dropped,
            "error": self.error,
        }


class Generator:
    def __init__(self, drafter: Drafter, link, cfg: TandemConfig, stop_tokens: set[int]):
        self.drafter = drafter
        self.link = link                               # edge/link.py CloudLink (None: edge-only node)
        self.cfg = cfg
        self.reuse_kv = cfg.switches.kv_cache         # the one read of this switch (edge and cloud)
        self.fallback = cfg.edge.fallback == "edge_only"
        self.adaptive = cfg.switches.adaptive_draft     # the one read of each of these four switches
        self.draft_ahead = cfg.switches.draft_ahead
        self.ngram = cfg.switches.ngram_draft
        self.parallel_prefill = cfg.switches.parallel_prefill
        self.verify_cost = VerifyCost()                 # the link's verify ms against draft length (all sessions)
        self.calibration = Calibration()                # P(accepted | the drafter's confidence), all sessions
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
        """Edge-cloud rounds. One round is in flight at a time, plus (switches.draft_ahead) the next one,
        drafted while it flies as if it accepts everything and then the target says `guess`.

        Exactness of sampled drafts with draft-ahead: every draft draws its tokens from a random stream
        of its own, keyed by the session's seed, the exact context it is drafted after and whether it
        starts with a guess (_draft_rng). A draft that is dropped (412, or held and found stale, or
        cancelled) was for a context the answer has left for good (the committed tokens part from it
        within its length), so no later draft draws from its stream: its randomness, which decided its
        guess and so whether it was dropped, goes with it. A kept draft was drawn from q(. | the
        context it was drafted after) with randomness independent of everything the cloud did, and it
        is kept only when the committed context equals that context; so, given the committed context,
        its tokens are distributed as q, the q sent with them, and the cloud's exact acceptance
        (cloud/acceptance.py) makes the committed tokens the target's law. Keying by context, not by
        call order, also makes a seeded answer the same however the rounds' timing fell.
        Prompt-lookup tokens are one-hot proposals (edge/ngram.py), exact the same way."""
        sid, seeds = uuid.uuid4().hex, np.random.SeedSequence(sampling.seed)
        rng = np.random.default_rng(seeds.spawn(1)[0])          # edge-only tokens while the cloud is away
        acceptance = _Acceptances(Acceptance(), Acceptance(LOOKUP_ALPHA0), Acceptance(AHEAD_HOLD0))
        cloud_len, n, n_prompt = 0, 0, len(context)             # tokens the cloud holds; next round's seq
        fly: Optional[_Flight] = None                            # the round in flight
        ahead: Optional[_Flight] = None                          # the round after it: sent ahead, or held
        ahead_job: Optional[asyncio.Task] = None                 # drafting `ahead` (it runs beside the answer)
        stale: list[asyncio.Task] = []                           # dropped ahead rounds whose answer (412) is due
        done = lambda: len(context) - n_prompt >= max_tokens     # noqa: E731

        async def drop_ahead() -> None:
            """Drop the round drafted after the one in flight (ruled out); a sent one's 412 is due."""
            nonlocal ahead, ahead_job
            if ahead_job is not None:
                ahead_job.cancel()
                await asyncio.wait((ahead_job,))
                if not ahead_job.cancelled() and ahead_job.exception() is None:
                    ahead = ahead_job.result()
                ahead_job = None
            if ahead is not None and ahead.task is not None:
                stale.append(ahead.task)
                stats.ahead_dropped += 1
            ahead = None

        try:
            while not done():
                if fly is None:
                    # 1. The next round: the one drafted while the last flew, if it is for this context (sent
                    # ahead: it is in flight already; held: send its draft), else round 0 with no draft at
                    # once (parallel prefill), else a draft made now.
                    if ahead_job is not None:
                        ahead, ahead_job = await ahead_job, None
                    if ahead is not None and ahead.base != context:
                        await drop_ahead()
                    if self.draft_ahead and n > 0:           # did the round drafted ahead of the last one hold?
                        acceptance.ahead.observe(1, int(ahead is not None))
                    room = max_tokens - (len(context) - n_prompt) - 1
                    if ahead is not None and ahead.task is not None:
                        fly, ahead = ahead, None
                        stats.ahead_kept += 1
                    else:
                        if ahead is not None and (ahead.draft.tokens or room < 1):
                            d = ahead.draft
                        elif cloud_len == 0 and n == 0 and self.parallel_prefill:
                            d = Draft([], [] if not sampling.greedy else None, [], 0.0)
                        else:
                            d = await self._draft(seq, context, max(1, room), 0, sampling, seeds, acceptance)
                        ahead = None
                        for task in stale:                        # its seq is ours now: let its 412 land first
                            await _settled(task)
                        stale = []
                        req = VerifyRequest(session_id=sid, seq=n, base_len=cloud_len, append=context[cloud_len:],
                                            draft=d.tokens, draft_dists=d.dists, sampling=sampling,
                                            reuse_cache=self.reuse_kv, rtt_ms=self.link.rtt_ms,
                                            prompt_len=n_prompt if cloud_len == 0 else None)
                        fly = _Flight(list(context), d, None, _sent(self.link.verify(req)),
                                      cloud_len == 0)
                # 2. While it flies: draft the round after it (draft-ahead; round 0's first draft with a
                # parallel prefill), as if it accepts its whole draft and the target then says `guess`.
                # The drafting runs beside the answer: an answer that comes first is committed at once.
                if ahead_job is None and (self.draft_ahead or not fly.draft.tokens and self.parallel_prefill):
                    ahead_job = asyncio.create_task(self._ahead(
                        seq, fly, sid, n, max_tokens - (len(context) - n_prompt), sampling, seeds, acceptance))
                # 3. The answer.
                try:
                    r, wall_ms = await fly.task
                except CloudError as e:
                    fly = None
                    await drop_ahead()
                    if e.status == 412:            # a round sent ahead that did not hold: draft afresh
                        continue
                    if e.status != 409 or cloud_len == 0:
                        raise
                    cloud_len = 0                  # cloud lost the session (restart/eviction): resend all
                    continue
                except CloudUnavailable:
                    fly = None
                    await drop_ahead()
                    for task in stale:
                        await _settled(task)
                    stale = []
                    if not self.fallback:
                        raise
                    # 3'. The cloud is away: go on with the draft model alone until it is back, then
                    # re-sync the whole context (a new cloud session) and verify again.
                    stats.fallbacks += 1
                    async for tok in self._until_cloud_back(seq, context, n_prompt + max_tokens, sampling, rng):
                        context.append(tok)
                        yield [tok], [EDGE]
                    if done():
                        return
                    stats.resumed += 1
                    sid, cloud_len, n = uuid.uuid4().hex, 0, 0
                    continue
                # 4. Commit; the drafter's KV is rolled back to this context at the next draft.
                d = fly.draft
                new = d.tokens[:r.accepted] + [r.next_token]
                stats.trace.append((len(context) - n_prompt, d.tokens, r.accepted, round(d.ms, 2)))
                context += new
                cloud_len, n = r.committed_len, n + 1
                (acceptance.lookup if d.source == "lookup" else acceptance.model).observe(len(d.tokens), r.accepted)
                if d.source == "model":
                    self.calibration.observe(d.confidences, r.accepted)
                if not fly.fresh:                  # a round that brought the prompt timed its prefill too
                    self.verify_cost.observe(len(d.tokens), r.timing.compute_ms)
                stats.rounds += 1
                stats.drafted += len(d.tokens)
                stats.accepted += r.accepted
                stats.accept_hist[r.accepted] += 1
                stats.draft_ms += d.ms
                stats.compute_ms += r.timing.compute_ms
                stats.round_wall_ms += wall_ms
                fly = None
                if r.accepted < len(d.tokens):
                    await drop_ahead()                 # it was drafted after the whole draft: ruled out
                yield new, [DRAFT] * r.accepted + [TARGET]
        finally:
            for task in [f.task for f in (fly, ahead) if f is not None and f.task is not None] + [ahead_job]:
                if task is not None and not task.done():
                    task.cancel()
            for task in stale:
                task.cancel()
            if (cloud_len or n or fly is not None) and self.link.up:
                asyncio.get_running_loop().create_task(self.link.drop(sid))   # best effort, off the answer's path

    async def _draft(self, seq, context, room, extra, sampling, seeds, acc: "_Acceptances") -> Draft:
        """`extra` + k tokens after `context`, k at most `room` (extra: draft-ahead's guess, drafted first).

        Fixed (adaptive_draft off; or on, before the drafter has timed a step and for seeded sampling,
        which must reproduce whatever the timing): k = draft.max_k (FIRST_K),
        prompt-lookup tokens first (switches.ngram_draft), then the model's, stopping early where the
        model's confidence falls below the threshold (the confidence gate). Adaptive: a model draft of up
        to max_k whose gate is the rate rule (RateGate: each token weighed by its calibrated chance of
        acceptance against the link's costs; with the gate off, the best k of the geometric model up
        front) or, when a lookup finds tokens and its expected rate is higher, the best prefix of those.
        Its randomness comes from the stream of (seed, context, extra) (_draft_rng; see _speculate)."""
        dc = self.cfg.draft
        found = lookup(context, min(dc.max_k, room) + extra, dc.ngram_max_n, dc.ngram_min_n) if self.ngram else []
        rng = _draft_rng(seeds, context, extra)
        # A seeded sampled answer must come out the same every time: its draft lengths may not depend on
        # timing (the rounds' boundaries decide which of the cloud's random draws meets which token).
        reproducible = sampling.seed is not None and not sampling.greedy
        if self.adaptive and self.drafter.first_ms is not None and not reproducible:
            first, rtt, verify = self.drafter.first_ms, self.link.rtt_ms or 0.0, self.verify_cost
            t_draft = self.drafter.step_ms if self.drafter.step_ms is not None else first
            hold = acc.ahead.alpha if self.draft_ahead else 0.0
            k = min(best_draft_length(acc.model.alpha, t_draft, rtt, verify, dc.min_k, dc.max_k, 0, hold, first), room)
            if len(found) > extra:
                m = best_draft_length(acc.lookup.alpha, 0.0, rtt, verify, 1, len(found) - extra, 0, hold)
                if (round_rate(acc.lookup.alpha, m, 0.0, rtt, verify, hold)
                        >= round_rate(acc.model.alpha, k, drafting_ms(k + extra, t_draft, first), rtt, verify, hold)):
                    return _lookup_draft(found[:extra + m], sampling)
            if self.drafter.gated:
                top = min(dc.max_k, room) + extra
                gate = RateGate(self.calibration, acc.model.alpha, t_draft, rtt, verify, top, hold, first)
                return await self.drafter.draft(seq, context, top, sampling, rng, self.reuse_kv, extra + dc.min_k, gate)
            return await self.drafter.draft(seq, context, extra + k, sampling, rng, self.reuse_kv, extra + dc.min_k)
        want = extra + min(dc.max_k if not self.adaptive else max(dc.min_k, min(dc.max_k, FIRST_K)), room)
        found = found[:want]
        if len(found) >= want:
            return _lookup_draft(found, sampling)
        d = await self.drafter.draft(seq, context + found, want - len(found), sampling, rng, self.reuse_kv,
                                     max(dc.min_k + extra - len(found), 1))
        if not found:
            return d
        return Draft(found + d.tokens, None if sampling.greedy else one_hot(found) + d.dists,
                     [1.0] * len(found) + d.confidences, d.ms, "mixed")

    async def _ahead(self, seq, fly: "_Flight", sid, n, left, sampling, seeds, acceptance) -> Optional["_Flight"]:
        """The round after `fly`, drafted while it flies, after fly's context + its whole draft + `guess`
        (the first token drafted here: the drafter's own guess of the target's next token). Sent at once
        as a draft-ahead round (switches.draft_ahead) if `fly` is still in flight; else held. None when
        there is no round after it (the answer ends within it)."""
        base = fly.base + fly.draft.tokens
        room = left - len(fly.draft.tokens) - 2          # tokens the round after may draft besides the guess
        if room < 0 or any(t in self.stop_tokens for t in fly.draft.tokens):
            return None
        d = await self._draft(seq, base, room, 1, sampling, seeds, acceptance)
        if not d.tokens:
            return None
        guess, draft = d.tokens[0], Draft(d.tokens[1:], None if d.dists is None else d.dists[1:], d.confidences[1:],
                                          d.ms, d.source)
        task = None
        if self.draft_ahead and not fly.task.done() and guess not in self.stop_tokens:
            req = VerifyRequest(session_id=sid, seq=n + 1, base_len=len(base) + 1, draft=draft.tokens,
                                draft_dists=draft.dists, sampling=sampling, reuse_cache=self.reuse_kv,
                                rtt_ms=self.link.rtt_ms, guess=guess)
            task = _sent(self.link.verify(req))
        return _Flight(base + [guess], draft, guess, task, False)

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
