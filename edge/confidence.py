"""How sure the drafter is about its next token, in [0, 1]; drafting stops below the threshold.

Each strategy maps the draft model's logits at one position to a score:
  MAX_PROB     max_i p_i                                   p = softmax(logits)
  ENTROPY      exp(-H(p)), H = -sum p_i ln p_i             1 for a one-hot, 1/n for uniform over n
  TEMPERATURE  max_i softmax(logits / T)_i                 T > 1 flattens, so only strong peaks pass
  TOP_K_AGG    sum of the k largest p_i
  ENSEMBLE     sum_s w_s score_s / sum_s w_s               over the weighted strategies
"""
from __future__ import annotations

import numpy as np

from common.config import ConfidenceConfig, ConfidenceStrategy as S


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    np.exp(z, out=z)
    z /= z.sum()
    return z


def max_prob(probs: np.ndarray) -> float:
    return float(probs.max())


def entropy_confidence(probs: np.ndarray) -> float:
    nz = probs[probs > 0]
    return float(np.exp(np.sum(nz * np.log(nz))))


def top_k_mass(probs: np.ndarray, k: int) -> float:
    k = min(k, probs.size)
    return float(np.partition(probs, probs.size - k)[-k:].sum())


class Confidence:
    """Scores one position's logits with the configured strategy."""

    def __init__(self, cfg: ConfidenceConfig):
        self.cfg = cfg
        total = sum(cfg.weights.values())
        self.weights = {s: w / total for s, w in cfg.weights.items() if w > 0}

    def score_one(self, strategy: S, logits: np.ndarray, probs: np.ndarray) -> float:
        if strategy is S.MAX_PROB:
            return max_prob(probs)
        if strategy is S.ENTROPY:
            return entropy_confidence(probs)
        if strategy is S.TEMPERATURE:
            return max_prob(softmax(logits, self.cfg.temperature))
        if strategy is S.TOP_K_AGG:
            return top_k_mass(probs, self.cfg.top_k)
        return sum(w * self.score_one(s, logits, probs) for s, w in self.weights.items())

    def __call__(self, logits: np.ndarray, probs: np.ndarray | None = None) -> float:
        probs = softmax(logits) if probs is None else probs
        return self.score_one(self.cfg.strategy, logits, probs)
