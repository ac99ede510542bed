"""Prompt-lookup drafts (switches.ngram_draft): a draft that costs no model.

When the last n committed tokens (n = max_n down to min_n, longest first) also occur earlier in the
context (the prompt or the answer so far), propose the tokens that followed their latest earlier
occurrence, up to k. Code and edits repeat their context a lot (Saxena's prompt lookup decoding;
Spec-Bench: tau ~1.7 at no draft cost).

A lookup is a deterministic proposal, so for sampled verification each of its tokens x travels with
the one-hot q = [x: 1.0]: the cloud accepts x with probability min(1, p(x)/q(x)) = p(x) and on
rejection samples the residual max(0, p - q) = p without x, renormalised, which is exactly p overall.
"""
from __future__ import annotations

import numpy as np

from common.protocol import DraftDist


def lookup(context: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's longest suffix of
    length max_n..min_n; [] when none occurs."""
    if k <= 0 or len(context) < min_n + 1:
        return []
    ctx = np.asarray(context)
    for n in range(min(max_n, len(context) - 1), min_n - 1, -1):
        suffix = ctx[-n:]
        # candidate starts i < len - n whose n tokens equal the suffix (the suffix itself excluded)
        starts = np.flatnonzero(ctx[:len(ctx) - n] == suffix[0])
        for j in range(1, n):
            starts = starts[ctx[starts + j] == suffix[j]]
        if starts.size:
            at = int(starts[-1]) + n               # the tokens after the latest occurrence
            return ctx[at:at + k].tolist()
    return []


def one_hot(tokens: list[int]) -> list[DraftDist]:
    """The proposal law of a lookup draft: a point mass on each token."""
    return [DraftDist.model_construct(ids=[t], probs=[1.0]) for t in tokens]
