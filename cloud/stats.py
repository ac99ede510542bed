"""Cloud counters: JSON for /stats and Prometheus text for /metrics (its own registry per server)."""
from __future__ import annotations

import time
from collections import Counter, deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter as PCounter, Histogram, generate_latest


class CloudStats:
    def __init__(self, window: int = 4096):
        self.started = time.time()
        self.requests = 0
        self.rounds = 0
        self.generated = 0          # target-only tokens (/v1/generate)
        self.drafted = 0
        self.accepted = 0
        self.accept_hist: Counter[int] = Counter()   # accepted draft tokens per round -> rounds
        self.errors: Counter[int] = Counter()         # HTTP status -> count
        self.cached_tokens = 0      # context tokens served from KV/prefix cache
        self.computed_tokens = 0    # tokens the target evaluated
        self.replayed = 0           # retried rounds answered from the stored result
        self.resyncs = 0            # 409s asking the edge to resend its context
        self.late_rounds = 0        # late duplicates refused with 409 (older than the session's last round, not kept)
        self.evicted = 0            # sessions forgotten: expired (session_ttl_s) or evicted for a new one
        self.ahead_posted = 0       # draft-ahead rounds handed to the engine while the round before was in flight
        self.stale_rounds = 0       # draft-ahead rounds answered 412: the round before ended otherwise
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.queue_ms: deque[float] = deque(maxlen=window)
        self.registry = CollectorRegistry()
        self._p_rounds = PCounter("tandem_verify_rounds", "verify rounds", registry=self.registry)
        self._p_drafted = PCounter("tandem_drafted_tokens", "draft tokens received", registry=self.registry)
        self._p_accepted = PCounter("tandem_accepted_tokens", "draft tokens accepted", registry=self.registry)
        self._p_errors = PCounter("tandem_errors", "error responses", ["status"], registry=self.registry)
        self._p_latency = Histogram("tandem_verify_seconds", "verify handler latency", registry=self.registry,
                                    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

    def round(self, drafted: int, accepted: int, cached: int, computed: int, latency_ms: float, queue_ms: float):
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.accept_hist[accepted] += 1
        self.cached_tokens += cached
        self.computed_tokens += computed
        self.latency_ms.append(latency_ms)
        self.queue_ms.append(queue_ms)
        self._p_rounds.inc()
        self._p_drafted.inc(drafted)
        self._p_accepted.inc(accepted)
        self._p_latency.observe(latency_ms / 1000)

    def error(self, status: int):
        self.errors[status] += 1
        self._p_errors.labels(str(status)).inc()

    @staticmethod
    def _percentiles(values) -> dict:
        if not values:
            return {}
        p = np.percentile(np.fromiter(values, float), [50, 90, 99])
        return {"p50": round(p[0], 3), "p90": round(p[1], 3), "p99": round(p[2], 3)}

    def snapshot(self, extra: dict | None = None) -> dict:
        seen = self.cached_tokens + self.computed_tokens
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": self.requests, "rounds": self.rounds, "generated_tokens": self.generated,
            "drafted": self.drafted, "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
            "mean_accepted_per_round": round(self.accepted / self.rounds, 3) if self.rounds else None,
            "accept_hist": {str(k): v for k, v in sorted(self.accept_hist.items())},
            "latency_ms": self._percentiles(self.latency_ms),
            "queue_ms": self._percentiles(self.queue_ms),
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "cache": {"cached_tokens": self.cached_tokens, "computed_tokens": self.computed_tokens,
                      "hit_rate": round(self.cached_tokens / seen, 4) if seen else None,
                      "replayed_rounds": self.replayed, "resyncs": self.resyncs, "late_rounds": self.late_rounds},
            "evicted_sessions": self.evicted,
            "draft_ahead": {"posted_early": self.ahead_posted, "stale": self.stale_rounds},
            **(extra or {}),
        }

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)
