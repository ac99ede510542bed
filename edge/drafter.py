"""The edge's draft model on llama.cpp: drafts up to max_k tokens, stopping when confidence drops.

Greedy drafts are the draft model's argmax. Sampled drafts come from q = the draft's softmax at the
request temperature, truncated to its top_n tokens and renormalised; q travels with the draft so
the cloud can run exact speculative sampling (any q works, as long as the verifier knows it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cloud.acceptance import sample
from common.config import ConfidenceConfig, DraftConfig, Switches
from common.llama_runtime import LlamaRunner
from common.protocol import DraftDist, SamplingParams
from edge.confidence import Confidence, softmax


@dataclass
class Draft:
    tokens: list[int]
    dists: Optional[list[DraftDist]]   # q per position (sampling only)
    confidences: list[float]           # confidence of each drafted position's distribution
    ms: float                          # wall time spent drafting (incl. syncing the KV cache)


def draft_distribution(logits: np.ndarray, temperature: float, top_n: int) -> DraftDist:
    p = softmax(logits, temperature)
    ids = np.argpartition(p, -top_n)[-top_n:] if top_n < p.size else np.arange(p.size)
    ids = ids[np.argsort(-p[ids], kind="stable")]
    probs = p[ids] / p[ids].sum()
    return DraftDist.model_construct(ids=ids.tolist(), probs=probs.tolist())


class Drafter:
    def __init__(self, runner: LlamaRunner, draft_cfg: DraftConfig, conf_cfg: ConfidenceConfig, switches: Switches):
        self.runner = runner
        self.cfg = draft_cfg
        self.confidence = Confidence(conf_cfg)
        self.threshold = conf_cfg.threshold
        self.gated = switches.confidence_gating     # the one read of this switch

    def draft(self, context: list[int], max_k: int, sampling: SamplingParams,
              rng: np.random.Generator, reuse_kv: bool) -> Draft:
        t0 = time.perf_counter()
        logits, _ = self.runner.extend_to(context, 1, reuse=reuse_kv)   # KV := context (rollback + catch up)
        row = logits[-1]
        tokens, dists, confs = [], [], []
        for i in range(max_k):
            conf = self.confidence(row)
            if self.gated and i >= self.cfg.min_k and conf < self.threshold:
                break
            if sampling.greedy:
                tok = int(np.argmax(row))
            else:
                dist = draft_distribution(row, sampling.temperature, self.cfg.top_n)
                tok = dist.ids[sample(np.asarray(dist.probs), rng)]
                dists.append(dist)
            tokens.append(tok)
            confs.append(conf)
            if i + 1 < max_k:
                row = self.runner.decode([tok], 1)[-1]
        return Draft(tokens, dists if not sampling.greedy else None, confs, (time.perf_counter() - t0) * 1e3)
