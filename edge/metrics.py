"""The edge's Prometheus metrics (GET /metrics), in a registry of its own.

Counted as things happen: requests (by endpoint and status), tokens by provenance (draft: drafted and
accepted by the target; target: the target's own token; edge: the draft model alone), verify rounds,
the accepted length of each round (accepted drafts + the target's token), time to first token, and
cloud fallbacks. Read from the node at scrape time: the link's RTT and health factor, whether the
cloud is up, the link's down/up events, active sessions and queue depth.
"""
from __future__ import annotations

import math
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
SOURCES = ("draft", "target", "edge")


def _number(value) -> float:
    return float("nan") if value is None else float(value)


class _NodeCollector:
    """Gauges and counters that the node and its link already keep, read at scrape time."""

    def __init__(self, node):
        self.node = node

    def collect(self):
        node, link = self.node, getattr(self.node, "link", None)
        yield _gauge("tandem_edge_active_sessions", "Sessions generating now", getattr(node, "active_sessions", 0))
        yield _gauge("tandem_edge_queue_depth", "Requests waiting for a session", getattr(node, "queue_depth", 0))
        yield _gauge("tandem_edge_link_rtt_ms", "The cloud link's round-trip time estimate (ms)",
                     getattr(link, "rtt_ms", None))
        yield _gauge("tandem_edge_link_health_factor", "The cloud link's health factor (0..1)",
                     getattr(link, "health_factor", None))
        yield _gauge("tandem_edge_cloud_up", "1 while the cloud link is up, 0 while down (NaN: no cloud)",
                     None if link is None else int(bool(link.up)))
        for name, attr, text in (("tandem_edge_cloud_down_events", "down_events", "Times the cloud link went down"),
                                 ("tandem_edge_cloud_up_events", "up_events", "Times the cloud link came back")):
            c = CounterMetricFamily(name, text)
            c.add_metric([], getattr(link, attr, 0) or 0)
            yield c


def _gauge(name: str, text: str, value) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, text)
    g.add_metric([], _number(value))
    return g


class EdgeMetrics:
    def __init__(self, node):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tandem_edge_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("tandem_edge_tokens", "Generated tokens by provenance", ["source"], registry=r)
        self.rounds = Counter("tandem_edge_rounds", "Verify rounds", registry=r)
        self.generations = Counter("tandem_edge_generations", "Finished generations by endpoint and outcome",
                                   ["endpoint", "outcome"], registry=r)
        self.fallbacks = Counter("tandem_edge_fallbacks", "Generations' switches to edge-only while the cloud "
                                 "was down", registry=r)
        self.accepted_length = Histogram("tandem_edge_accepted_length", "Tokens committed per verify round "
                                         "(accepted drafts + the target's token)",
                                         buckets=tuple(range(1, 18)), registry=r)
        self.ttft = Histogram("tandem_edge_ttft_seconds", "Time to first token, from the request's arrival",
                              buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        for s in SOURCES:
            self.tokens.labels(s)
        r.register(_NodeCollector(node))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def generation(self, endpoint: str, stats: dict) -> None:
        self.generations.labels(endpoint, "error" if stats.get("error") else "ok").inc()
        for source, n in (stats.get("tokens_by_source") or {}).items():
            if n:
                self.tokens.labels(source).inc(n)
        self.rounds.inc(stats.get("rounds") or 0)
        self.fallbacks.inc(stats.get("fallbacks") or 0)
        for accepted, n in (stats.get("accept_hist") or {}).items():
            for _ in range(int(n)):
                self.accepted_length.observe(int(accepted) + 1)
        ttft: Optional[float] = stats.get("ttft_ms")
        if ttft is not None and math.isfinite(ttft):
            self.ttft.observe(ttft / 1e3)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
