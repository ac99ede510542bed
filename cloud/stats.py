"""Cloud counters: JSON for /stats and Prometheus text for /metrics (its own registry per server).

Links: each edge link (a WebSocket; an HTTP client address for POST rounds) with the RTT its edge
reports in every round (RFC 6298 SRTT and RTTVAR, measured by the edge: common/rtt.py) and its health
factor (common/scheduling.py). /stats gives their distribution across links (and the links, up to
MAX_LINKS_SHOWN); /metrics histograms of it (tandem_link_rtt_ms, tandem_link_health_factor) read at
scrape time. Links not heard from for LINK_IDLE_S are forgotten.

Frames: WebSocket frames and bytes each way and the verify messages they carried (switches.rtt_batching
puts several in one frame). CPU: the front end's event-loop thread's CPU time (`frontend_cpu_s`, the HTTP
and WebSocket work: parsing, validation, answers, frames; not the model, which runs in other threads)
and the whole process's (`process_cpu_s`)."""
from __future__ import annotations

import resource
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
from prometheus_client import CollectorRegistry, Counter as PCounter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from common.coalesce import HOLD_BUCKETS_MS, hold_quantile_ms
from common.scheduling import health_factor

LINK_IDLE_S = 600.0
MAX_LINKS_SHOWN = 64
RTT_BUCKETS_MS = (5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000)
HEALTH_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass
class LinkState:
    """One edge link as the cloud sees it."""
    name: str
    transport: str
    rtt_ms: Optional[float] = None
    rttvar_ms: Optional[float] = None
    rounds: int = 0
    frames_in: int = 0
    frames_out: int = 0
    last_seen: float = 0.0

    def observe(self, rtt_ms: Optional[float], rttvar_ms: Optional[float]) -> None:
        self.rounds += 1
        self.last_seen = time.monotonic()
        if rtt_ms is not None:
            self.rtt_ms, self.rttvar_ms = rtt_ms, rttvar_ms

    @property
    def health_factor(self) -> float:
        return health_factor(self.rtt_ms)

    def as_dict(self) -> dict:
        r = lambda x: None if x is None else round(x, 3)   # noqa: E731
        return {"link": self.name, "transport": self.transport, "rtt_ms": r(self.rtt_ms), "rttvar_ms": r(self.rttvar_ms),
                "health_factor": round(self.health_factor, 4), "rounds": self.rounds,
                "frames_in": self.frames_in, "frames_out": self.frames_out}


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 3)


def frontend_cpu_s() -> float:
    """CPU time of the calling thread (call it on the event loop: the front end's own work)."""
    return time.thread_time()


class _LinkCollector:
    """The distribution across links, computed at scrape time."""

    def __init__(self, stats: "CloudStats"):
        self.stats = stats

    def collect(self):
        links = self.stats.live_links()
        rtts = [x.rtt_ms for x in links if x.rtt_ms is not None]
        g = GaugeMetricFamily("tandem_links", "Edge links heard from lately (WebSockets and HTTP clients)")
        g.add_metric([], len(links))
        yield g
        yield _histogram("tandem_link_rtt_ms", "Edge links by the RTT their edge reports (SRTT, ms)", rtts, RTT_BUCKETS_MS)
        yield _histogram("tandem_link_health_factor", "Edge links by health factor exp(-RTT/500 ms)",
                         [health_factor(x) for x in rtts], HEALTH_BUCKETS)
        c = GaugeMetricFamily("tandem_frontend_cpu_seconds", "CPU time of the front end's event-loop thread")
        c.add_metric([], self.stats.frontend_cpu_s)
        yield c


def _histogram(name: str, text: str, values: list[float], buckets) -> HistogramMetricFamily:
    counts = [sum(v <= b for v in values) for b in buckets]
    h = HistogramMetricFamily(name, text)
    h.add_metric([], [(str(float(b)), c) for b, c in zip(buckets, counts)] + [("+Inf", len(values))],
                 sum_value=float(sum(values)))
    return h


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
        self.links: dict[str, LinkState] = {}
        self.frames = Counter()     # ws_frames_in/out, ws_bytes_in/out, ws_messages_in/out, ws_held_ms
        self.hold_counts = [0] * len(HOLD_BUCKETS_MS)   # answers by how long they waited for company (rtt_batching)
        self.frontend_cpu_s = 0.0   # the event loop thread's CPU time, as of the last update_cpu()
        self.queue_ms: deque[float] = deque(maxlen=window)
        self.registry = CollectorRegistry()
        self.registry.register(_LinkCollector(self))
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

    def link(self, name: str, transport: str) -> LinkState:
        state = self.links.get(name)
        if state is None:
            self._forget_idle_links()
            state = self.links[name] = LinkState(name, transport, last_seen=time.monotonic())
        return state

    def _forget_idle_links(self) -> None:
        now = time.monotonic()
        for name in [n for n, x in self.links.items() if now - x.last_seen > LINK_IDLE_S]:
            del self.links[name]

    def live_links(self) -> list[LinkState]:
        self._forget_idle_links()
        return list(self.links.values())

    def frame_in(self, link: LinkState, nbytes: int, messages: int) -> None:
        link.frames_in += 1
        self.frames["ws_frames_in"] += 1
        self.frames["ws_bytes_in"] += nbytes
        self.frames["ws_messages_in"] += messages

    def frame_out(self, link: LinkState, nbytes: int, messages: int, held_ms: float = 0.0) -> None:
        link.frames_out += 1
        self.frames["ws_frames_out"] += 1
        self.frames["ws_bytes_out"] += nbytes
        self.frames["ws_messages_out"] += messages
        self.frames["ws_held_ms"] += held_ms

    def update_cpu(self) -> None:
        """Read the front end's CPU time (call on the event loop thread: /stats and /metrics do)."""
        self.frontend_cpu_s = frontend_cpu_s()

    def _links_summary(self) -> dict:
        links = sorted(self.live_links(), key=lambda x: -x.last_seen)
        rtts = [x.rtt_ms for x in links if x.rtt_ms is not None]
        return {"count": len(links), "rtt_ms": self._percentiles(rtts),
                "health_factor": self._percentiles([health_factor(x) for x in rtts]),
                "links": [x.as_dict() for x in links[:MAX_LINKS_SHOWN]]}

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
            "links": self._links_summary(),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in sorted(self.frames.items())},
            "ws_hold_counts": list(self.hold_counts),
            "ws_hold_ms": {"p50": _r(hold_quantile_ms(self.hold_counts, 0.5)),
                           "p99": _r(hold_quantile_ms(self.hold_counts, 0.99))},
            "frontend_cpu_s": round(self.frontend_cpu_s, 6),
            "process_cpu_s": round(time.process_time(), 6),
            "process_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            **(extra or {}),
        }

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)
