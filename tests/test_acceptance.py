"""The acceptance function on synthetic distributions: greedy rules, and speculative sampling
reproducing the target's law (chi-squared at a 1e-4 false-alarm level, fixed seeds)."""
import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from cloud.acceptance import accept_draft, target_probs
from common.protocol import DraftDist, SamplingParams

GREEDY = SamplingParams()
T1 = SamplingParams(temperature=1.0)


def onehot_logits(rows, v=8):
    x = np.zeros((len(rows), v), dtype=np.float32)
    for i, t in enumerate(rows):
        x[i, t] = 3.0
    return x


def test_greedy_accepts_matching_prefix_then_corrects():
    assert accept_draft([1, 2, 3], onehot_logits([1, 2, 5, 7]), GREEDY, None, None) == (2, 5)


def test_greedy_all_accepted_gives_bonus():
    assert accept_draft([1, 2], onehot_logits([1, 2, 6]), GREEDY, None, None) == (2, 6)


def test_greedy_first_rejected():
    assert accept_draft([4], onehot_logits([0, 6]), GREEDY, None, None) == (0, 0)


def test_greedy_tie_breaks_to_lowest_id():
    logits = np.zeros((2, 4), dtype=np.float32)
    logits[0, [1, 3]] = 2.0
    assert accept_draft([3], logits, GREEDY, None, None) == (0, 1)


def test_target_probs_top_k_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert np.allclose(p, [[0.625, 0.375, 0, 0]])
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert np.allclose(p, [[0.625, 0.375, 0, 0]])
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert np.allclose(p, [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]])


def sparse(q):
    ids = np.flatnonzero(q)
    return DraftDist(ids=ids.tolist(), probs=(q[ids] / q[ids].sum()).tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_first_token_is_distributed_as_target(seed):
    rng = np.random.default_rng(seed)
    v, n = 6, 40_000
    p = rng.dirichlet(np.ones(v))
    q = rng.dirichlet(np.ones(v) * 0.5)
    q[v - 1] = 0.0                      # the draft never proposes token 5: only the residual can
    q /= q.sum()
    logits = np.log(np.stack([p, p]))
    counts = np.zeros(v)
    for _ in range(n):
        x = int(rng.choice(v, p=q))
        n_acc, tok = accept_draft([x], logits, T1, [sparse(q)], rng)
        counts[x if n_acc else tok] += 1
    assert chisquare(counts, p * n).pvalue > 1e-4
    # the same test has power: the draft's own law is rejected
    assert chisquare(counts, q * n + 1e-9).pvalue < 1e-4


def test_whole_loop_reproduces_a_markov_target():
    """Target and draft are Markov chains over 4 tokens; run full speculative rounds (k=3, bonus
    tokens included) until 3 tokens are out and compare the joint law of those 3 with the target's."""
    rng = np.random.default_rng(7)
    v, n, k = 4, 60_000, 3
    P = rng.dirichlet(np.ones(v), size=v)          # target: P[prev] = p(next | prev)
    Q = rng.dirichlet(np.ones(v) * 0.7, size=v)    # draft
    start = 0
    counts = {}
    for _ in range(n):
        out = []
        while len(out) < 3:
            prev = out[-1] if out else start
            draft, dists, p_rows = [], [], []
            for _ in range(k):
                x = int(rng.choice(v, p=Q[prev]))
                draft.append(x)
                dists.append(sparse(Q[prev]))
                p_rows.append(P[prev])
                prev = x
            p_rows.append(P[prev])
            n_acc, tok = accept_draft(draft, np.log(np.stack(p_rows)), T1, dists, rng)
            out += draft[:n_acc] + [tok]
        key = tuple(out[:3])
        counts[key] = counts.get(key, 0) + 1
    cells = list(itertools.product(range(v), repeat=3))
    expected = np.array([P[start, a] * P[a, b] * P[b, c] for a, b, c in cells]) * n
    observed = np.array([counts.get(c, 0) for c in cells])
    assert chisquare(observed, expected).pvalue > 1e-4
