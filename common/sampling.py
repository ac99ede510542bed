"""The target's sampling law, shared by the edge and the cloud: the distribution p (temperature, top-k,
top-p), an inverse-CDF draw, the token the target alone would emit, and a draft's sparse q made dense.

`next_token` is the reference every verifier must match; `accept_draft` (cloud/acceptance.py) builds
exact speculative sampling on these.
"""
from __future__ import annotations

import numpy as np

from common.protocol import DraftDist, SamplingParams


def target_probs(logits: np.ndarray, sampling: SamplingParams) -> np.ndarray:
    """p = the target's sampling distribution: softmax(logits / T), then top-k, then top-p (float64)."""
    z = np.atleast_2d(logits).astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < z.shape[-1]:
        kth = np.partition(z, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        for row in p:  # keep the smallest set of most likely tokens whose mass reaches top_p
            order = np.argsort(-row, kind="stable")
            cut = int(np.searchsorted(np.cumsum(row[order]), sampling.top_p - 1e-9)) + 1
            row[order[cut:]] = 0.0
            row /= row.sum()
    return p


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from an (unnormalised, non-negative) distribution."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))


def next_token(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator) -> int:
    """What the target alone emits from one row of logits (the reference the verifier must match)."""
    if sampling.greedy:
        return int(np.argmax(logits))
    return sample(target_probs(logits, sampling)[0], rng)


def dense(dist: DraftDist, n_vocab: int) -> np.ndarray:
    q = np.zeros(n_vocab, dtype=np.float64)
    q[dist.ids] = dist.probs
    return q / q.sum()
