"""What every endpoint of the edge's HTTP API shares: the app's keys, OpenAI-shaped errors, the JSON
body reader, the client-disconnect watcher and the record of a finished generation.

Errors on every path have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so one
client-side check reads them all (the NDJSON /v1/generate included).
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, Awaitable, Optional, TypeVar

from aiohttp import web

from common.http_limits import read_body
from common.jsonbody import BadBody, check_content_type, parse_json_object
from edge.metrics import EdgeMetrics

log = logging.getLogger("tandem.edge")

NODE = web.AppKey("node", object)               # the EdgeNode
TOTALS = web.AppKey("totals", Counter)          # the JSON /stats counters
METRICS = web.AppKey("metrics", EdgeMetrics)    # the Prometheus registry of /metrics
ARRIVED = web.RequestKey("arrived", float)      # time.perf_counter() when the request came in

DISCONNECT_POLL_S = 0.05                        # how often a running generation checks for its client

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          408: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}


class ApiError(Exception):
    """An HTTP error answer in OpenAI's shape; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError 4xx (never a 500, whatever the bytes):
    common/jsonbody.py decides (415: not application/json or not UTF-8; 400: bad UTF-8, bad JSON, too
    deep, over-long integers, not an object); common/http_limits.py reads it (408: too slow, 413: over
    edge.max_body_bytes)."""
    edge = request.app[NODE].cfg.edge
    try:
        check_content_type(request.content_type, request.charset)    # 415 before reading a byte
        raw = await read_body(request, edge.limits, edge.max_body_bytes)
        return parse_json_object(raw, request.content_type, request.charset)
    except BadBody as e:
        raise ApiError(e.status, e.message, code=_BODY_CODES.get(e.status, "invalid_json")) from None


_BODY_CODES = {408: "body_timeout", 413: "body_too_large", 415: "unsupported_media_type"}


class ClientGone(Exception):
    """The client closed its connection; the generation was stopped."""


T = TypeVar("T")


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def unless_client_gone(request: web.Request, work: Awaitable[T]) -> T:
    """Run `work`; cancel it as soon as the client's connection closes (raises ClientGone).

    Cancelling the task closes the node's stream iterator (`aclosing`), which stops the generation and
    frees its sequence, or drops it from the queue if its turn had not come.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if client_gone(request):
                task.cancel()
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is None:
                    return task.result()
                raise ClientGone()
    finally:
        if not task.done():       # this handler was cancelled itself (server shutdown)
            task.cancel()


def record_generation(app: web.Application, endpoint: str, stats: Optional[dict]) -> None:
    """Count a finished generation in /stats and /metrics."""
    if not stats:
        return
    totals = app[TOTALS]
    totals["generations"] += 1
    for key in ("tokens", "rounds", "drafted", "accepted", "fallbacks"):
        totals[key] += stats.get(key) or 0
    totals["errors"] += bool(stats.get("error"))
    for source, n in (stats.get("tokens_by_source") or {}).items():
        totals[f"tokens_{source}"] += n or 0
    app[METRICS].generation(endpoint, stats)
