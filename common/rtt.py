"""Round-trip time estimation as TCP does it (RFC 6298, section 2): a smoothed RTT and its mean
deviation, each an exponentially weighted moving average of the samples.

First sample R:   SRTT = R, RTTVAR = R / 2
Each next R':     RTTVAR = (1 - beta) * RTTVAR + beta * |SRTT - R'|   (with the SRTT before this sample)
                  SRTT   = (1 - alpha) * SRTT + alpha * R'
alpha = 1/8, beta = 1/4; RTO = SRTT + K * RTTVAR with K = 4 (no 1 s floor: that is TCP's, not ours).
"""
from __future__ import annotations

import math
from typing import Optional

ALPHA, BETA, K = 1 / 8, 1 / 4, 4


class RttEstimator:
    def __init__(self) -> None:
        self.srtt_ms: Optional[float] = None     # None until the first sample
        self.rttvar_ms: Optional[float] = None
        self.samples = 0
        self.last_ms: Optional[float] = None

    def observe(self, sample_ms: float) -> None:
        """Take one RTT sample in ms (negative values, from clock noise, count as 0)."""
        if not math.isfinite(sample_ms):
            raise ValueError(f"RTT sample must be finite, got {sample_ms}")
        r = max(float(sample_ms), 0.0)
        if self.srtt_ms is None:
            self.srtt_ms, self.rttvar_ms = r, r / 2
        else:
            self.rttvar_ms = (1 - BETA) * self.rttvar_ms + BETA * abs(self.srtt_ms - r)
            self.srtt_ms = (1 - ALPHA) * self.srtt_ms + ALPHA * r
        self.samples += 1
        self.last_ms = r

    @property
    def rto_ms(self) -> Optional[float]:
        """SRTT + 4 RTTVAR: a round slower than this is unusually slow for this path."""
        return None if self.srtt_ms is None else self.srtt_ms + K * self.rttvar_ms
