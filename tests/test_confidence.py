import math

import numpy as np
import pytest

from common.config import ConfidenceConfig, ConfidenceStrategy as S
from edge.confidence import Confidence

# logits ln([4, 2, 1, 1]) -> p = [0.5, 0.25, 0.125, 0.125]
LOGITS = np.log(np.array([4.0, 2.0, 1.0, 1.0], dtype=np.float32))


def conf(strategy, **kw):
    return Confidence(ConfidenceConfig(strategy=strategy, **kw))(LOGITS)


def test_max_prob():
    assert conf(S.MAX_PROB) == pytest.approx(0.5)


def test_entropy():
    h = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))   # 1.2130 nats
    assert conf(S.ENTROPY) == pytest.approx(math.exp(-h))                                # 0.2973


def test_temperature():
    # softmax(ln p / 2) = sqrt(p) / sum sqrt(p) = sqrt(.5) / (sqrt(.5) + .5 + 2 sqrt(.125))
    expect = math.sqrt(0.5) / (math.sqrt(0.5) + 0.5 + 2 * math.sqrt(0.125))
    assert conf(S.TEMPERATURE, temperature=2.0) == pytest.approx(expect)


def test_top_k_agg():
    assert conf(S.TOP_K_AGG, top_k=2) == pytest.approx(0.75)


def test_ensemble():
    w = {S.MAX_PROB: 1.0, S.TOP_K_AGG: 3.0}
    assert conf(S.ENSEMBLE, weights=w, top_k=2) == pytest.approx((0.5 + 3 * 0.75) / 4)


def test_one_hot_is_fully_confident():
    logits = np.array([50.0, 0, 0, 0], dtype=np.float32)
    for s in (S.MAX_PROB, S.ENTROPY, S.TOP_K_AGG):
        assert Confidence(ConfidenceConfig(strategy=s))(logits) == pytest.approx(1.0, abs=1e-9)
