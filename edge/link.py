"""The edge's one link to its cloud, shared by all of the edge's sessions.

Rounds: the verify rounds of every session travel over ONE WebSocket (GET /v1/ws). Each round waits
on a future keyed by (session_id, seq); one reader task resolves them as the cloud's answers come
(in the order the cloud decides them, not the order sent). While the WebSocket cannot be had (not
yet connected, lost, or a cloud without /v1/ws), rounds go as HTTP POST /v1/verify, the fallback
transport, and a background task reconnects with capped exponential backoff. `edge.transport: http`
uses POST only.

Failures: rounds are idempotent (the cloud replays a repeated (session_id, seq)), so a round lost
with its connection, timed out or answered 5xx is sent again, up to `edge.retries` more times with
`edge.retry_backoff_s` doubling. A 4xx answer raises CloudError at once. Past the budget the round
raises CloudUnavailable and the link is down: while down, rounds raise CloudUnavailable at once
(sessions go on edge-only without each waiting out a budget) until the probe sees the cloud again.

Cloud state: a probe task GETs /health every `edge.rtt_probe_interval_s` while up and every
`edge.probe_down_interval_s` while down (and at once when the WebSocket drops). It notices a dead
cloud between rounds and its return ("cloud down" / "cloud back" in the log; `down_events`,
`up_events`); on the return it reopens the WebSocket, then sets `became_up` (`wait_up()`).
The edge starts when its cloud is not up yet: entering the link never raises for that.

RTT belongs to the link (a property of the path, not of a session): RFC 6298 SRTT/RTTVAR
(common/rtt.py) over each round's wall time minus the cloud's own time (timing.server_ms), and, while
no round has given a sample for edge.rtt_probe_interval_s, over a WebSocket ping/pong (over /health
probes while there is no WebSocket). Every round carries SRTT and RTTVAR to the cloud (rtt_ms,
rttvar_ms). Experiments put a network between edge and cloud with the link
emulator (ablations/linkemu.py), a process on the path, not a sleep in here.

Coalescing (switches.rtt_batching, common/coalesce.py): rounds of several sessions that are ready
together go in one frame ({"batch": [...]}); on a link at or above coalesce.min_rtt_ms a round may wait,
at most min(rtt_fraction x SRTT, max_wait_ms), until every session of this edge that is generating has
its round on the wire. The WebSocket is opened with `?coalesce=1`, so the cloud coalesces the answers it
sends this link by the same rule (without it, each answer is a frame of its own).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from contextlib import suppress
from typing import AsyncIterator, Optional

import aiohttp

from common.cloud_identity import check_cloud_health
from common.errors import CloudError, CloudUnavailable
from common.config import EdgeConfig
from common.coalesce import HOLD_BUCKETS_MS, WS_QUERY, Coalescer, Policy
from common.protocol import (PROTOCOL_VERSION, GenerateChunk, GenerateRequest, VerifyRequest, VerifyResponse,
                             batch_frame, unbatch)
from common.rtt import RttEstimator
from common.scheduling import health_factor

__all__ = ["CloudLink", "CloudError", "CloudUnavailable"]

log = logging.getLogger("tandem.edge.link")

# what a resend can cure: no connection, a dropped one, a timeout (5xx answers are handled apart)
RETRYABLE = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)
JSON = {"Content-Type": "application/json"}
SESSION_IDLE_S = 10.0     # a session that sent no round for this long no longer counts as drafting (coalescing)


class _Channel:
    """One open WebSocket and the rounds waiting on it, keyed by (session_id, seq)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, link: "CloudLink"):
        self.ws = ws
        self.link = link
        self.waiting: dict[tuple, list[asyncio.Future]] = {}
        self.closed = False
        self.finished = asyncio.Event()
        self.opened_s = time.monotonic()
        self._pings: dict[bytes, float] = {}      # ping payload -> when sent (perf_counter)
        self._ping_no = 0
        self.outbox = None if link.coalesce is None else Coalescer(
            link.coalesce, self._send_frame, lambda: link.rtt_ms, self._missing, batch_frame, "edge-ws")
        if self.outbox is not None:
            self.outbox.hold_counts = link.hold_counts     # counted for the link, across reconnects
        self.reader = asyncio.create_task(self._read(), name="tandem-link-reader")

    async def _send_frame(self, text: str, messages: int = 1, held_ms: float = 0.0) -> None:
        await self.ws.send_str(text)
        self.link.count_frame("out", len(text), messages)

    def _missing(self) -> int:
        """Sessions of this edge generating now with no round on the wire (still drafting): those that sent
        a round lately (a session that ended without a drop, e.g. while the cloud was down, ages out)."""
        busy = {key[0] for key in self.waiting}
        since = time.monotonic() - SESSION_IDLE_S
        return sum(1 for sid, t in self.link.sessions.items() if t >= since and sid not in busy)

    async def ping(self) -> None:
        """One WebSocket ping; its pong is an RTT sample (the reader takes it)."""
        self._ping_no += 1
        payload = self._ping_no.to_bytes(8, "big")
        self._pings = {payload: time.perf_counter()}    # an older ping still out is no sample any more
        await self.ws.ping(payload)

    async def round(self, key: tuple, text: str, timeout_s: float) -> dict:
        """Send one round, wait for its answer (a VerifyResponse or an error object, as a dict)."""
        if self.closed:
            raise ConnectionResetError("the WebSocket closed")
        fut = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(key, []).append(fut)
        try:
            if self.outbox is not None:
                self.outbox.put(text)
                if self.outbox.closed:
                    raise ConnectionResetError("the WebSocket closed")
            else:
                await self._send_frame(text)
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            waiters = self.waiting.get(key)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self.waiting[key]

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.ERROR:
                    break
                if msg.type is aiohttp.WSMsgType.PING:       # autoping is off (so that pongs reach us)
                    await self.ws.pong(msg.data)
                    continue
                if msg.type is aiohttp.WSMsgType.PONG:
                    sent = self._pings.pop(msg.data, None)
                    if sent is not None:
                        self.link.observe_ping((time.perf_counter() - sent) * 1e3)
                    continue
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    log.warning("the cloud sent a WebSocket message that is not JSON: %.200s", msg.data)
                    continue
                items = unbatch(data)
                self.link.count_frame("in", len(msg.data), len(items))
                for item in items:
                    key = (item.get("session_id"), item.get("seq")) if isinstance(item, dict) else None
                    fut = next((f for f in self.waiting.get(key, ()) if not f.done()), None)
                    if fut is None:     # its round timed out or was cancelled; or an error about no round
                        log.debug("WebSocket answer with no round waiting for it: %.200s", item)
                        continue
                    fut.set_result(item)
        finally:
            self.closed = True
            lost = ConnectionResetError("the WebSocket closed with the round in flight")
            for waiters in self.waiting.values():
                for f in waiters:
                    if not f.done():
                        f.set_exception(lost)
            self.finished.set()

    async def close(self) -> None:
        if self.outbox is not None:
            await self.outbox.close()
        self.reader.cancel()
        with suppress(asyncio.CancelledError):
            await self.reader
        with suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.ws.close()


class CloudLink:
    """One per edge node: `async with CloudLink(url, cfg.edge) as link: await link.verify(req)`."""

    def __init__(self, base_url: str, cfg: EdgeConfig, coalesce: Optional[Policy] = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--cloud-url needs http:// or https:// (got '{base_url}')")
        self.base_url = base_url.rstrip("/")
        self.cfg = cfg
        self.coalesce = coalesce           # None: every round its own frame (switches.rtt_batching off)
        self.rtt = RttEstimator()
        self.sessions: dict[str, float] = {}   # sessions that sent rounds, not dropped -> last sent (monotonic)
        self.hold_counts = [0] * len(HOLD_BUCKETS_MS)   # rounds by how long they waited for company
        self.frames = {"frames_out": 0, "bytes_out": 0, "rounds_out": 0, "frames_in": 0, "bytes_in": 0, "answers_in": 0}
        self.up = False                   # the cloud answers (False until the first probe says so)
        self.down_events = 0              # up (or not yet known) -> down
        self.up_events = 0                # down -> up: "cloud back"
        self.reconnects = 0               # WebSockets opened after the first
        self.rounds_by_transport = {"ws": 0, "http": 0}
        self.became_up = asyncio.Event()  # set while up
        self._known = False               # a probe or round has told whether the cloud is up
        self._down_since: Optional[float] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._channel: Optional[_Channel] = None
        self._ws_opened = 0
        self._connect_lock = asyncio.Lock()
        self._wake_probe = asyncio.Event()      # probe now (the WebSocket dropped) or re-time (cloud down)
        self._rearm_probe = False
        self._wake_ws = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._drops: set[asyncio.Task] = set()
        self._last_sample_s = -math.inf
        self._backoff0_s = max(cfg.retry_backoff_s, 0.05)

    # --- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> "CloudLink":
        headers = {"Authorization": f"Bearer {self.cfg.auth_token}"} if self.cfg.auth_token else {}
        self._session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s))
        await self._probe()             # never raises: up or down, the edge starts
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="tandem-link-probe"))
        if self.cfg.transport == "ws":
            self._tasks.append(asyncio.create_task(self._ws_loop(), name="tandem-link-ws"))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._drops:                  # let the last DELETEs reach the cloud, briefly
            _, late = await asyncio.wait(self._drops, timeout=1.0)
            for task in late:
                task.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- state ---------------------------------------------------------------------------------
    @property
    def transport(self) -> str:
        """'ws' while the WebSocket is open, else 'http' (the fallback)."""
        return "ws" if self._channel is not None and not self._channel.closed else "http"

    @property
    def rtt_ms(self) -> Optional[float]:
        """Smoothed RTT (RFC 6298 SRTT); None before the first sample."""
        return self.rtt.srtt_ms

    @property
    def rttvar_ms(self) -> Optional[float]:
        return self.rtt.rttvar_ms

    @property
    def health_factor(self) -> float:
        """exp(-RTT / 500 ms), as the cloud's scheduler sees it (common/scheduling.py)."""
        return health_factor(self.rtt_ms)

    async def wait_up(self, timeout: Optional[float] = None) -> bool:
        """Wait until the cloud is up (the WebSocket reopened where it can be); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self.became_up.wait()
        except TimeoutError:
            return False
        return True

    def snapshot(self) -> dict:
        """The link's state for /stats."""
        r = lambda x: None if x is None else round(x, 3)   # noqa: E731
        return {"url": self.base_url, "up": self.up, "transport": self.transport,
                "rtt_ms": r(self.rtt_ms), "rttvar_ms": r(self.rttvar_ms), "health_factor": round(self.health_factor, 4),
                "down_events": self.down_events, "up_events": self.up_events, "reconnects": self.reconnects,
                "rounds_ws": self.rounds_by_transport["ws"], "rounds_http": self.rounds_by_transport["http"],
                "rtt_samples": self.rtt.samples, "coalescing": self.coalesce is not None, **self.frames,
                "hold_counts": list(self.hold_counts)}

    def count_frame(self, way: str, nbytes: int, messages: int) -> None:
        self.frames["frames_" + way] += 1
        self.frames["bytes_" + way] += nbytes
        self.frames["rounds_out" if way == "out" else "answers_in"] += messages

    def observe_ping(self, wall_ms: float) -> None:
        """A WebSocket ping's pong: an RTT sample when no round gave one lately."""
        if time.monotonic() - self._last_sample_s >= self.cfg.rtt_probe_interval_s:
            self._observe_rtt(wall_ms)

    def _observe_rtt(self, sample_ms: float) -> None:
        self.rtt.observe(sample_ms)
        self._last_sample_s = time.monotonic()

    def _mark_up(self) -> None:
        if self.up:
            return
        back = self._known
        self._known, self.up = True, True
        self.became_up.set()
        if self.transport != "ws":
            self._wake_ws.set()                 # the WebSocket upkeep: try now, not after its backoff
        if back:
            self.up_events += 1
            log.info("cloud back at %s after %.1f s down (transport %s)", self.base_url,
                     time.monotonic() - self._down_since, self.transport)
        else:
            log.info("cloud up at %s (transport %s)", self.base_url, self.transport)

    def _mark_down(self, reason: str) -> None:
        if self._known and not self.up:
            return
        self._known, self.up = True, False
        self.became_up.clear()
        self._down_since = time.monotonic()
        self.down_events += 1
        self._rearm_probe = True                # probe at the down interval from now on
        self._wake_probe.set()
        log.warning("cloud down at %s: %s", self.base_url, reason)

    # --- verify rounds -------------------------------------------------------------------------
    async def verify(self, req: VerifyRequest) -> tuple[VerifyResponse, float]:
        """One round: the response and its wall time in ms as the edge saw it. 4xx -> CloudError;
        unreachable or failing past the retry budget, or the link down -> CloudUnavailable."""
        if self._session is None:
            raise RuntimeError("CloudLink used outside 'async with' (or after close())")
        if self._known and not self.up:
            raise CloudUnavailable(f"cloud at {self.base_url} is down (probing every "
                                   f"{self.cfg.probe_down_interval_s:g} s)")
        if req.rtt_ms is not None and req.rttvar_ms is None and self.rttvar_ms is not None:
            req = req.model_copy(update={"rttvar_ms": self.rttvar_ms})
        text = req.model_dump_json(exclude_none=True)
        key = (req.session_id, req.seq)
        now = time.monotonic()
        if len(self.sessions) > 4 * self.cfg.max_sessions:       # forget the ones long gone
            self.sessions = {sid: t for sid, t in self.sessions.items() if now - t < SESSION_IDLE_S}
        self.sessions[req.session_id] = now
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            t0 = time.perf_counter()
            try:
                status, data = await self._send(key, text)
            except RETRYABLE as e:
                last = e
                continue
            wall_ms = (time.perf_counter() - t0) * 1e3
            if status < 400:
                resp = VerifyResponse.model_validate(data)
                self._observe_rtt(wall_ms - resp.timing.server_ms)
                self._mark_up()
                return resp, wall_ms
            last = CloudError(status, data)
            if status < 500:
                self._mark_up()               # it answered: reachable
                raise last
        reason = (f"{self.cfg.retries + 1} tries of round {req.seq} of session {req.session_id} failed, "
                  f"the last: {type(last).__name__}: {last}")
        self._mark_down(reason)
        raise CloudUnavailable(f"cloud at {self.base_url}: {reason}") from last

    async def _send(self, key: tuple, text: str) -> tuple[int, dict]:
        """(status, body) of one round over the WebSocket if open, else over HTTP POST."""
        channel = self._channel
        if channel is not None and not channel.closed:
            data = await channel.round(key, text, self.cfg.request_timeout_s)
            self.rounds_by_transport["ws"] += 1
            return (int(data.get("status", 500)) if "error" in data else 200), data
        async with self._session.post(self.base_url + "/v1/verify", data=text, headers=JSON) as r:
            raw, status = await r.read(), r.status
        self.rounds_by_transport["http"] += 1
        return status, _json_object(raw)

    # --- WebSocket upkeep ----------------------------------------------------------------------
    async def _connect_ws(self) -> bool:
        """Open the WebSocket unless one is open; False (rounds go over HTTP) when it cannot be."""
        async with self._connect_lock:
            if self._channel is not None and not self._channel.closed:
                return True
            try:
                ws = await self._session.ws_connect(self.base_url + "/v1/ws", heartbeat=self.cfg.ws_heartbeat_s,
                                                    autoping=False,    # pongs reach the reader: RTT samples
                                                    params={WS_QUERY: "1"} if self.coalesce is not None else None)
            except RETRYABLE as e:
                log.debug("no WebSocket to %s (%s: %s): rounds go over HTTP POST", self.base_url, type(e).__name__, e)
                return False
            self._channel = _Channel(ws, self)
            self._wake_ws.clear()               # a wake-up was for this connection
            self._ws_opened += 1
            if self._ws_opened > 1:
                self.reconnects += 1
            log.info("WebSocket to %s open%s", self.base_url, f" (reconnect {self.reconnects})" if self.reconnects else "")
            return True

    async def _pause(self, seconds: float, event: asyncio.Event) -> bool:
        """Sleep up to `seconds`; True if `event` cut it short (and clear it)."""
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            return False
        event.clear()
        return True

    async def _ws_loop(self) -> None:
        """Keep one WebSocket open while the cloud is up: reconnect at once after a long-lived one
        drops, else after a backoff that doubles up to edge.reconnect_max_backoff_s."""
        delay = self._backoff0_s
        while True:
            try:
                channel = self._channel
                if channel is not None and not channel.closed:
                    await channel.finished.wait()
                    log.info("WebSocket to %s closed: rounds go over HTTP POST until it reopens", self.base_url)
                    self._wake_probe.set()      # is it the cloud, or only the socket?
                    if time.monotonic() - channel.opened_s < self.cfg.reconnect_max_backoff_s:
                        await self._pause(delay, self._wake_ws)     # it did not last: don't flap
                        delay = min(delay * 2, self.cfg.reconnect_max_backoff_s)
                    else:
                        delay = self._backoff0_s
                    continue
                await self.became_up.wait()
                if await self._connect_ws():
                    continue
                if await self._pause(delay, self._wake_ws):
                    delay = self._backoff0_s      # the cloud is back: start the backoff afresh
                else:
                    delay = min(delay * 2, self.cfg.reconnect_max_backoff_s)
            except asyncio.CancelledError:
                raise
            except Exception:                   # never let the upkeep die
                log.exception("WebSocket upkeep failed; retrying")
                await asyncio.sleep(self.cfg.reconnect_max_backoff_s)

    # --- probing -------------------------------------------------------------------------------
    async def _probe(self) -> bool:
        try:
            await self.check_identity()
        except (CloudUnavailable, CloudError, ValueError) as e:     # CloudError: 401, a wrong token
            self._mark_down(str(e))
            return False
        if not self.up:
            if self.cfg.transport == "ws":
                await self._connect_ws()        # rounds that see `up` find the WebSocket open
            self._mark_up()
        return True

    async def _probe_loop(self) -> None:
        while True:
            try:
                interval = self.cfg.rtt_probe_interval_s if self.up else self.cfg.probe_down_interval_s
                await self._pause(interval, self._wake_probe)
                if self._rearm_probe:           # woken by the cloud going down: wait the down interval
                    self._rearm_probe = False
                    continue
                await self._probe()
                channel = self._channel
                if (self.up and channel is not None and not channel.closed
                        and time.monotonic() - self._last_sample_s >= self.cfg.rtt_probe_interval_s):
                    await channel.ping()        # idle: the WebSocket's own ping/pong measures the path
            except asyncio.CancelledError:
                raise
            except Exception:                   # never let the probe die
                log.exception("cloud probe failed")

    async def health(self) -> dict:
        """GET /health. CloudUnavailable when unreachable (or 5xx), CloudError on 401 (a wrong token),
        ValueError when not JSON. An RTT sample too, when no round has given one lately."""
        t0 = time.perf_counter()
        try:
            async with self._session.get(self.base_url + "/health",
                                         timeout=aiohttp.ClientTimeout(total=self.cfg.connect_timeout_s)) as r:
                raw, status = await r.read(), r.status
        except RETRYABLE as e:
            raise CloudUnavailable(f"cloud at {self.base_url} unreachable: {type(e).__name__}: {e}") from e
        wall_ms = (time.perf_counter() - t0) * 1e3
        if status >= 500:
            raise CloudUnavailable(f"cloud at {self.base_url}: /health answered {status}")
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if status == 401:
            raise CloudError(401, data if isinstance(data, dict) else {"error": "missing or wrong bearer token"})
        if not isinstance(data, dict):
            raise ValueError(f"{self.base_url} is not a Tandem cloud: its /health answered {status} "
                             f"without a JSON object ({raw[:80]!r})")
        if self.transport != "ws" and time.monotonic() - self._last_sample_s >= self.cfg.rtt_probe_interval_s:
            self._observe_rtt(wall_ms)          # with a WebSocket open its ping/pong samples instead
        return data

    async def check_identity(self) -> dict:
        """The cloud's /health, checked to be a Tandem cloud speaking our protocol
        (common/cloud_identity.py); CloudUnavailable if it cannot be reached."""
        return check_cloud_health(self.base_url, 200, await self.health(), self.cfg.auth_token)

    # --- the rest: target-only streams, session drops --------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Target-only tokens, streamed as NDJSON lines over HTTP (no retries: a stream is not idempotent)."""
        try:
            # a stream may last longer than any one request: bound each read, not the whole answer
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s,
                                            sock_read=self.cfg.request_timeout_s)
            async with self._session.post(self.base_url + "/v1/generate", data=req.model_dump_json(),
                                          headers=JSON, timeout=timeout) as r:
                if r.status >= 400:
                    raise CloudError(r.status, _json_object(await r.read()))
                async for line in r.content:
                    if line.strip():
                        yield GenerateChunk.model_validate(json.loads(line))
        except RETRYABLE as e:
            self._wake_probe.set()
            raise CloudUnavailable(f"cloud at {self.base_url}: {type(e).__name__}: {e}") from e

    async def drop(self, session_id: str) -> None:
        """Tell the cloud to forget a session: best effort, in the background (the cloud also
        evicts idle sessions), so an ending session does not wait for it."""
        self.sessions.pop(session_id, None)
        if not self.up or self._session is None:
            return
        task = asyncio.create_task(self._delete(session_id), name="tandem-link-drop")
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _delete(self, session_id: str) -> None:
        with suppress(*RETRYABLE):
            async with self._session.delete(f"{self.base_url}/v1/sessions/{session_id}") as r:
                await r.read()


def _json_object(raw: bytes) -> dict:
    """An answer body as a dict; a body that is not a JSON object becomes {"error": <its text>}."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {"error": raw.decode(errors="replace")[:500]}
    return data if isinstance(data, dict) else {"error": str(data)[:500]}
