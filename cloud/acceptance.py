"""Verification of a draft against the target's logits: greedy and exact speculative sampling.

Row i of `target_logits` is the target's prediction for the token after context + draft[:i], so a
draft of k tokens comes with k+1 rows: the last one gives the bonus token when all k are accepted.
"""
from __future__ import annotations

import numpy as np

from common.protocol import DraftDist, SamplingParams
from common.sampling import dense, next_token, sample, target_probs  # noqa: F401 (re-exported)


def accept_draft(draft: list[int], target_logits: np.ndarray, sampling: SamplingParams,
                 draft_dists: list[DraftDist] | None, rng: np.random.Generator) -> tuple[int, int]:
    """Return (n_accepted, next_token). Output is exactly what the target alone would produce:
    identical tokens when greedy, identically distributed tokens when sampling."""
    k = len(draft)
    assert target_logits.shape[0] == k + 1, "need k+1 rows of target logits"
    if sampling.greedy:
        # Greedy: the target alone emits argmax at every position. Accept the longest draft prefix
        # that equals it; at the first mismatch emit the target's argmax (a correction), else the
        # argmax after the last draft token (a bonus). Ties break to the lowest id on both paths.
        best = target_logits.argmax(axis=-1)
        n = 0
        while n < k and draft[n] == best[n]:
            n += 1
        return n, int(best[n])
    p = target_probs(target_logits, sampling)                  # [k+1, V]
    for i, x in enumerate(draft):
        q = dense(draft_dists[i], p.shape[-1])                  # the edge drew x ~ q
        # Accept x with probability min(1, p(x)/q(x)). Then P(emit y without rejecting) =
        # q(y)·min(1, p(y)/q(y)) = min(q(y), p(y)).
        if rng.random() * q[x] < p[i, x]:
            continue
        # Reject: draw from the residual r ∝ max(0, p − q). Its mass is 1 − Σ min(p, q) = P(reject),
        # so P(emit y) = min(q(y), p(y)) + max(0, p(y) − q(y)) = p(y): exactly the target's law.
        residual = np.maximum(p[i] - q, 0.0)
        if residual.sum() <= 0.0:   # p == q up to rounding: rejection had probability ~0
            residual = p[i]
        return i, sample(residual, rng)
    # All k accepted: the k+1-th row is a free token drawn from the target itself.
    return k, sample(p[k], rng)
