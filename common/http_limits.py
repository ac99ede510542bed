"""Connection limits for every Tandem HTTP server (the cloud's and the edge's), on aiohttp.

aiohttp closes an idle keep-alive connection (`keepalive_timeout`) but has no timeout on reading a
request's head: a client that sends one header line every few seconds, or only the request line,
held a connection for as long as it liked. Here a RequestHandler subclass adds:

  - header timeout: from the moment a connection opens, or the first byte of a new request arrives,
    the request's whole head (request line + headers) must arrive within `header_timeout_s`, or
    the connection is closed;
  - keep-alive timeout: an idle connection between requests is closed after `keepalive_timeout_s`
    (aiohttp's own timer);
  - a cap on concurrent connections: a connection over `max_connections` gets one
    `503 {"error": ...}` with Retry-After and is closed, without reaching the app;
  - body timeout: `read_body()` gives 408 when a body does not arrive within `body_timeout_s`, and
    the connection is closed once the 408 is sent (no lingering read of the rest);
  - errors aiohttp answers itself (a malformed request line or header: 400, ...) are JSON too.

A WebSocket connection, once upgraded, is the handler's: none of these timers apply to it.

    runner, url = await start_site(app, host, port, cfg.cloud.limits)    # ServerLimitsConfig
    raw = await read_body(request, cfg.cloud.limits, max_bytes)           # bytes, or BadBody(408/413)
"""
from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Optional

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from common.config import ServerLimitsConfig
from common.jsonbody import BadBody

REFUSED_LINGER_S = 1.0     # a refused connection may still read its 503 for this long


def _refusal(max_connections: int) -> bytes:
    body = json.dumps({"error": f"too many connections (max_connections {max_connections}); retry later"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class LimitedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol with a header-read timeout, a connection cap and JSON errors."""

    def __init__(self, manager: "LimitedServer", *, limits: ServerLimitsConfig, **kwargs):
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._refused: Optional[asyncio.Transport] = None

    # --- the connection cap ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        manager = self._manager
        if manager is not None and manager.open_connections() >= self._limits.max_connections:
            self._refused = transport
            transport.write(_refusal(self._limits.max_connections))
            if transport.can_write_eof():
                transport.write_eof()             # the client reads the 503, then we close
            self._loop.call_later(REFUSED_LINGER_S, transport.close)
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        if self._refused is not None:
            self._refused = None
            return
        super().connection_lost(exc)

    # --- the header timeout --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return                                # ignored: the 503 is on its way
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:          # a request's head is complete (or rejected by the parser)
            self._cancel_header_timer()
        elif data and self._waiting_for_head():   # bytes of a head that is not complete yet
            self._arm_header_timer()

    def _waiting_for_head(self) -> bool:
        """Idle between requests (start() waits for the next head): any bytes belong to a head."""
        return self._waiter is not None and not self._waiter.done()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self._loop.call_later(self._limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is not None and self._waiting_for_head():
            self.force_close()

    # --- no lingering after a 408 ------------------------------------------------------------------------
    async def _handle_request(self, request, start_time, request_handler):
        resp, reset = await super()._handle_request(request, start_time, request_handler)
        if resp is not None and resp.status == 408 and not reset:
            self.force_close()      # aiohttp would read the rest of the slow body for up to 10 s (lingering)
        return resp, reset

    # --- JSON for the errors aiohttp answers itself ------------------------------------------------------
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:                                     # a client's malformed request: its answer says it all
            self.logger.debug("Bad request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status >= 500:
            error = "internal error"
        else:
            detail = " ".join(line.strip() for line in (message or "").splitlines() if line.strip())
            error = f"bad HTTP request: {detail[:200]}" if detail else HTTPStatus(status).phrase
        resp = web.json_response({"error": error}, status=status)
        resp.force_close()
        return resp


class LimitedServer(web.Server):
    """aiohttp's low-level server, handing each connection to a LimitedRequestHandler."""

    def __init__(self, handler, *, limits: ServerLimitsConfig, **kwargs):
        super().__init__(handler, **kwargs)
        self.limits = limits

    def open_connections(self) -> int:
        return len(self._connections)

    def __call__(self) -> LimitedRequestHandler:
        return LimitedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class LimitedAppRunner(web.AppRunner):
    """web.AppRunner whose server is a LimitedServer (keep-alive timeout from the limits)."""

    def __init__(self, app: web.Application, limits: ServerLimitsConfig, **kwargs):
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()      # the app's handler, request factory and handler kwargs
        return LimitedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                             limits=self._limits, **plain._kwargs)


async def start_site(app: web.Application, host: str, port: int, limits: ServerLimitsConfig, *,
                     reuse_port: bool = False, handler_cancellation: bool = False) -> tuple[web.AppRunner, str]:
    """Serve `app` on host:port (0 = any free port) under `limits`; returns the runner (await
    runner.cleanup() to stop) and the base URL. reuse_port: SO_REUSEPORT (several processes on one
    port). handler_cancellation: cancel a handler when its client disconnects."""
    runner = LimitedAppRunner(app, limits, access_log=None, handler_cancellation=handler_cancellation)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    bound_host, bound_port = site._server.sockets[0].getsockname()[:2]
    return runner, f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"


async def read_body(request: web.Request, limits: ServerLimitsConfig, max_bytes: int) -> bytes:
    """The request's body, within `limits.body_timeout_s` (else BadBody 408) and the app's
    client_max_size `max_bytes` (else BadBody 413)."""
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise BadBody(408, f"the request body did not arrive within {limits.body_timeout_s:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BadBody(413, f"body exceeds {max_bytes} bytes") from None
