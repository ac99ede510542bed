"""The edge's draft model on llama.cpp, shared by every session: drafts up to max_k tokens per round,
stopping when confidence drops, with all drafting sessions advanced in one `llama_decode` per step.

Continuous batching, as llama-server's slots do: one worker thread owns the llama.cpp context. Each
step it takes every job that is due, brings each job's sequence to the job's context (rollback to the
longest cached prefix, then the missing tokens), feeds each drafting job its last drafted token, and
decodes all of that in one batch. A session whose round is on the wire has no job, so it holds no
one up. A job is a draft (up to k tokens) or one next-token row (edge-only generation).

Greedy drafts are the draft model's argmax. Sampled drafts come from q = the draft's softmax at the
request temperature, truncated to its top_n tokens and renormalised; q travels with the draft so the
cloud can run exact speculative sampling (any q works, as long as the verifier knows it).
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from common.config import ConfidenceConfig, DraftConfig, Switches
from common.llama_runtime import LlamaRunner
from common.protocol import DraftDist, SamplingParams
from common.sampling import next_token, sample
from common.tokens import common_prefix
from edge.confidence import Confidence, softmax


STEP_TOKENS = 16     # steps in which no sequence feeds more than this count toward step_ms (a round's catch-up does)
STEP_EWMA = 0.1      # weight of the newest step in step_ms


@dataclass
class Draft:
    tokens: list[int]
    dists: Optional[list[DraftDist]]   # q per position (sampling only)
    confidences: list[float]           # confidence of each drafted position's distribution
    ms: float                          # wall time from asking to having the draft (incl. syncing the KV cache)
    source: str = "model"              # "model" | "lookup" (edge/ngram.py) | "mixed" (lookup tokens, then the model's)


def draft_distribution(logits: np.ndarray, temperature: float, top_n: int) -> DraftDist:
    p = softmax(logits, temperature)
    ids = np.argpartition(p, -top_n)[-top_n:] if top_n < p.size else np.arange(p.size)
    ids = ids[np.argsort(-p[ids], kind="stable")]
    probs = p[ids] / p[ids].sum()
    return DraftDist.model_construct(ids=ids.tolist(), probs=probs.tolist())


@dataclass(eq=False)
class _Job:
    seq: int
    context: list[int]
    max_k: int                          # 0: edge-only, one token sampled as the target would (next_token)
    min_k: int                          # the confidence gate may stop the draft once it has this many
    gate: Optional[Callable[[float, bool], tuple[bool, bool]]]   # adaptive drafts: edge/draft_length.py RateGate
    sampling: SamplingParams
    rng: np.random.Generator
    reuse_kv: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    t0: float = field(default_factory=time.perf_counter)
    synced: bool = False
    tokens: list[int] = field(default_factory=list)
    dists: list[DraftDist] = field(default_factory=list)
    confs: list[float] = field(default_factory=list)

    def finish(self, value) -> None:
        def settle():
            if not self.future.done():
                (self.future.set_exception if isinstance(value, BaseException) else self.future.set_result)(value)
        self.loop.call_soon_threadsafe(settle)


class Drafter:
    def __init__(self, runner: LlamaRunner, draft_cfg: DraftConfig, conf_cfg: ConfidenceConfig, switches: Switches):
        self.runner = runner
        self.cfg = draft_cfg
        self.confidence = Confidence(conf_cfg)
        self.threshold = conf_cfg.threshold
        self.gated = switches.confidence_gating     # the one read of this switch
        self.batched = switches.batched_drafting    # the one read of this switch: off = one draft at a time
        self.steps = 0                              # llama_decode batches run
        self.batched_tokens = 0                     # tokens they carried
        self.widest = 0                             # most sessions one step has advanced together
        self.first_ms: Optional[float] = None       # EWMA of a step that starts a draft (its sync: edge/draft_length.py)
        self.step_ms: Optional[float] = None        # ... of a step that only extends drafts (t_draft)
        self._jobs: list[_Job] = []                 # due, not yet taken by the worker
        self._released: list[int] = []              # sequences to clear before anything else runs
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="drafter", daemon=True)
        self._thread.start()

    # --- the asyncio side ------------------------------------------------------------------------
    async def draft(self, seq: int, context: list[int], max_k: int, sampling: SamplingParams,
                    rng: np.random.Generator, reuse_kv: bool = True, min_k: Optional[int] = None,
                    gate: Optional[Callable[[float, bool], tuple[bool, bool]]] = None) -> Draft:
        """Up to max_k draft tokens after `context`, on sequence `seq`. With the confidence gate on, it stops
        early (but not before min_k tokens: draft.min_k unless given) where `gate` says (conf, forced) ->
        (take this token, draft on), else where the confidence falls below the fixed threshold."""
        return await self._submit(seq, context, max_k, sampling, rng, reuse_kv, min_k, gate)

    async def next_token(self, seq: int, context: list[int], sampling: SamplingParams,
                         rng: np.random.Generator, reuse_kv: bool = True) -> int:
        """The draft model's own next token, sampled as the target alone samples (edge-only)."""
        return await self._submit(seq, context, 0, sampling, rng, reuse_kv, 0)

    async def _submit(self, seq, context, max_k, sampling, rng, reuse_kv, min_k, gate=None):
        loop = asyncio.get_running_loop()
        job = _Job(seq, list(context), max_k, self.cfg.min_k if min_k is None else min_k, gate, sampling, rng,
                   reuse_kv, loop.create_future(), loop)
        with self._wake:
            if self._closed:
                raise RuntimeError("the drafter is closed")
            self._jobs.append(job)
            self._wake.notify()
        return await job.future       # cancelled (client gone): the worker drops the job at its next step

    def release(self, seq: int) -> None:
        """A session ended: drop its jobs and clear its sequence's KV before the sequence is reused."""
        with self._wake:
            self._released.append(seq)
            self._wake.notify()

    def close(self) -> None:
        """Stop the worker and wait for it to leave llama.cpp (only then may the context be freed)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    # --- the worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        active: list[_Job] = []
        while True:
            with self._wake:
                while not (self._jobs or self._released or active or self._closed):
                    self._wake.wait()
                if self._closed:
                    for job in active + self._jobs:
                        job.finish(RuntimeError("the drafter is closed"))
                    return
                released, self._released = self._released, []
                # a released sequence's old jobs go; jobs queued after the release are its next owner's
                active = [j for j in active if j.seq not in released]
                take = len(self._jobs) if self.batched else (0 if active else 1)
                active += self._jobs[:take]
                del self._jobs[:take]
            for seq in released:
                self.runner.reset(seq)
            active = [j for j in active if not j.future.cancelled()]
            if active:
                try:
                    active = self._step(active)
                except Exception as e:  # noqa: BLE001 - a llama.cpp failure fails this step's jobs, not the thread
                    for job in active:
                        job.finish(e)
                    active = []

    def _step(self, active: list[_Job]) -> list[_Job]:
        """One llama_decode for every active job; returns the jobs still drafting."""
        t0 = time.perf_counter()
        work, starts = [], False
        for job in active:
            if job.synced:                 # drafting: feed its last drafted token
                work.append((job.seq, job.tokens[-1:], 1))
                continue
            held = self.runner.seq_tokens[job.seq]
            keep = max(min(common_prefix(held, job.context), len(job.context) - 1), 0) if job.reuse_kv else 0
            self.runner.rollback(keep, job.seq)
            work.append((job.seq, job.context[keep:], 1))
            job.synced = starts = True
        rows = self.runner.decode_batch(work)
        self.steps += 1
        self.batched_tokens += sum(len(t) for _, t, _ in work)
        self.widest = max(self.widest, len(work))
        still = [job for job, row in zip(active, rows) if not self._advance(job, row[-1])]
        if max(len(toks) for _, toks, _ in work) <= STEP_TOKENS:    # a drafting step, not a prompt's prefill
            ms = (time.perf_counter() - t0) * 1e3
            if starts:                     # it fed a draft's newly committed tokens: dearer on a CPU (2 cost 2x 1)
                self.first_ms = ms if self.first_ms is None else (1 - STEP_EWMA) * self.first_ms + STEP_EWMA * ms
            else:
                self.step_ms = ms if self.step_ms is None else (1 - STEP_EWMA) * self.step_ms + STEP_EWMA * ms
        return still

    def _advance(self, job: _Job, row: np.ndarray) -> bool:
        """Take one row of logits; True when the job is finished (and answered)."""
        if job.max_k == 0:
            job.finish(next_token(row, job.sampling, job.rng))
            return True
        conf = self.confidence(row)
        forced = len(job.tokens) < job.min_k
        if not self.gated:
            more = True
        elif job.gate is not None:
            take, more = job.gate(conf, forced)
            if not take:
                return self._done(job)
        elif not forced and conf < self.threshold:
            return self._done(job)
        else:
            more = True
        if job.sampling.greedy:
            tok = int(np.argmax(row))
        else:
            dist = draft_distribution(row, job.sampling.temperature, self.cfg.top_n)
            tok = dist.ids[sample(np.asarray(dist.probs), job.rng)]
            job.dists.append(dist)
        job.tokens.append(tok)
        job.confs.append(conf)
        enough = len(job.tokens) >= job.max_k or not more and len(job.tokens) >= job.min_k
        return self._done(job) if enough else False

    @staticmethod
    def _done(job: _Job) -> bool:
        job.finish(Draft(job.tokens, job.dists if not job.sampling.greedy else None, job.confs,
                         (time.perf_counter() - job.t0) * 1e3))
        return True
