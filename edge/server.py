"""The edge's HTTP API (aiohttp).

  GET  /                       the chat page (edge/web/), streaming over /v1/chat/completions
  POST /v1/chat/completions    OpenAI-compatible (edge/openai_api.py), also /v1/completions, GET /v1/models
  POST /v1/generate            Tandem's NDJSON API (below)
  GET  /health                 liveness and the cloud's state: status "ok", or "degraded" while a mode that
                               needs the cloud cannot reach it (HTTP 200 either way); service "tandem-edge"
  GET  /stats                  JSON totals and the link's live figures (the page polls it)
  GET  /metrics                Prometheus (edge/metrics.py)

Security: with `edge.api_keys` set, every path but /, /health and the page's static files needs
"Authorization: Bearer <key>" (compared in constant time; 401 otherwise). POST bodies must be
application/json in UTF-8 (415 otherwise), so a web page in a user's browser cannot start a generation
with a "simple" cross-site request; no CORS headers are sent, so no other origin can read an answer.
Errors everywhere are JSON in OpenAI's shape; a client that disconnects stops its generation (or leaves
the queue) and leaves no traceback in the log.

POST /v1/generate request: {"prompt": "text" | "prompt_ids": [ids], "raw": false, "max_tokens": 128,
"temperature": 0.0, "top_p": null, "seed": null, "mode": "edge_cloud"|"edge_only"|"cloud_only"|null,
"stream": true}. Stream lines: {"token_ids": [...], "text": "...", "sources": [...]} as tokens are
committed, then {"done": true, "ok": true|false, "error": null|"why", "stats": {...}}. Without
stream: one JSON object {"text", "token_ids", "sources", "ok", ...stats}.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from contextlib import aclosing
from pathlib import Path
from typing import Annotated, Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.auth import bearer_matches
from common.protocol import Seed, validation_message
from edge import openai_api
from edge.generator import EdgeBusy, Mode, resolve_mode
from edge.metrics import CONTENT_TYPE, EdgeMetrics
from edge.serving import (ARRIVED, METRICS, NODE, TOTALS, ApiError, ClientGone, error_body, read_json_object,
                          record_generation, unless_client_gone)

log = logging.getLogger("tandem.edge")
WEB = Path(__file__).resolve().parent / "web"
PAGE_FILES = {"/": ("index.html", "text/html"), "/static/app.js": ("app.js", "text/javascript"),
              "/static/style.css": ("style.css", "text/css")}
OPEN_PATHS = frozenset({"/health", *PAGE_FILES})     # open even when edge.api_keys is set
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


class EdgeGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Optional[str] = Field(None, min_length=1)
    prompt_ids: Optional[list[Annotated[int, Field(ge=0)]]] = Field(None, min_length=1)
    raw: bool = False
    max_tokens: Optional[int] = Field(None, ge=1, le=8192)
    temperature: Optional[float] = Field(None, ge=0.0, le=10.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[Seed] = None
    mode: Optional[Mode] = Field(None, strict=False)
    stream: bool = True

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of 'prompt' and 'prompt_ids'")
        return self


def _ndjson(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


async def generate(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    try:
        req = EdgeGenerateRequest.model_validate(await read_json_object(request))
    except ValidationError as e:
        message, field = validation_message(e)
        raise ApiError(422, message, param=field, code="invalid_value") from None
    ids = req.prompt_ids or node.encode(req.prompt, req.raw)
    if any(t >= node.n_vocab for t in ids):
        raise ApiError(422, f"a token id is outside the vocabulary of {node.n_vocab}", param="prompt_ids",
                       code="invalid_value")
    if len(ids) >= node.cfg.draft.n_ctx:
        raise ApiError(413, f"prompt of {len(ids)} tokens exceeds the context of {node.cfg.draft.n_ctx}",
                       param="prompt", code="context_length_exceeded")
    sampling = node.sampling(req.temperature, req.seed, req.top_p)
    max_tokens = req.max_tokens or node.cfg.sampling.max_tokens
    box, state = [], {"resp": None, "started": False}

    async def run() -> web.StreamResponse:
        toks, sources, text = [], [], []
        failure = None
        async with aclosing(node.stream(ids, max_tokens, sampling, req.mode, box, request.get(ARRIVED))) as it:
            try:
                piece = await it.__anext__()
            except StopAsyncIteration:
                piece = None
            except EdgeBusy as e:
                raise ApiError(429, str(e), code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}) from None
            except ValueError as e:
                raise ApiError(422, str(e), param="mode", code="invalid_value") from None
            state["started"] = True
            resp = None
            if req.stream:
                resp = state["resp"] = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await resp.prepare(request)
            try:
                while piece is not None:
                    toks += piece.token_ids
                    sources += piece.sources
                    text.append(piece.text)
                    if resp is not None:
                        await resp.write(_ndjson({"token_ids": list(piece.token_ids), "text": piece.text,
                                                  "sources": list(piece.sources)}))
                    piece = await anext(it, None)
            except ConnectionError:
                raise
            except Exception as e:           # the tokens already sent stand; the last line says why it ended
                failure = f"{type(e).__name__}: {e}"
                log.warning("generation failed mid-stream: %s", failure)
        stats = box[0].as_dict() if box else {}
        error = failure or stats.get("error")
        if error:
            stats["error"] = error
        if resp is None:
            if error and not toks:
                raise ApiError(502, f"the generation failed: {error}", code="generation_failed")
            return web.json_response({"text": "".join(text), "token_ids": toks, "sources": sources,
                                      "ok": error is None, **stats})
        await resp.write(_ndjson({"done": True, "ok": error is None, "error": error, "stats": stats}))
        await resp.write_eof()
        return resp

    try:
        return await unless_client_gone(request, run())
    except (ClientGone, ConnectionError):
        log.info("%s: the client went away; its generation was stopped", request.path)
        return state["resp"] or web.Response(status=499)
    finally:
        if state["started"]:
            record_generation(request.app, "generate", box[0].as_dict() if box else None)


def _cloud_state(node) -> tuple[bool, Optional[dict]]:
    link = getattr(node, "link", None)
    if link is None:
        return False, None
    return bool(link.up), {"status": "ok" if link.up else "unreachable", "up": bool(link.up),
                           "transport": getattr(link, "transport", None), "rtt_ms": link.rtt_ms,
                           "health_factor": getattr(link, "health_factor", None),
                           "down_events": getattr(link, "down_events", 0), "up_events": getattr(link, "up_events", 0)}


async def health(request: web.Request) -> web.Response:
    """Liveness (always 200) and the truth about the cloud: "degraded" while the configured mode needs a
    cloud that is not reachable (the edge then answers per edge.fallback)."""
    node = request.app[NODE]
    mode = resolve_mode(node.cfg)
    up, cloud = _cloud_state(node)
    ok = up or mode is Mode.EDGE_ONLY
    return web.json_response({
        "status": "ok" if ok else "degraded", "service": "tandem-edge", "model": node.model_name,
        "draft_model": node.cfg.models.draft,
        "mode": mode.value, "fallback": getattr(node.cfg.edge, "fallback", None),
        "cloud": cloud if cloud is not None else {"status": "not configured", "up": False},
        "active_sessions": node.active_sessions, "queue_depth": node.queue_depth})


async def stats(request: web.Request) -> web.Response:
    t, node = request.app[TOTALS], request.app[NODE]
    _, cloud = _cloud_state(node)
    return web.json_response({
        **t, "acceptance_rate": round(t["accepted"] / t["drafted"], 4) if t["drafted"] else None,
        "mean_accepted_length": round((t["accepted"] + t["rounds"]) / t["rounds"], 3) if t["rounds"] else None,
        "model": node.model_name, "active_sessions": node.active_sessions, "queue_depth": node.queue_depth,
        "link": cloud, "rtt_ms": cloud["rtt_ms"] if cloud else None,
        "drafting": node.drafting_stats(),
        "link_frames": {**getattr(node.link, "frames", {}), "hold_counts": list(getattr(node.link, "hold_counts", []))}
        if cloud else None})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE})


async def page(request: web.Request) -> web.Response:
    name, ctype = PAGE_FILES[request.path]
    return web.Response(body=(WEB / name).read_bytes(), content_type=ctype, charset="utf-8", headers=PAGE_HEADERS)


def _endpoint(request: web.Request) -> str:
    """A bounded label for /metrics: the route's pattern, or 'other' for paths that match none."""
    route = request.match_info.route
    return route.resource.canonical if route.resource is not None else "other"


@web.middleware
async def api_edges(request: web.Request, handler):
    """Arrival time, API keys, OpenAI-shaped errors (aiohttp's own 404/405/413 too), request metrics."""
    request[ARRIVED] = time.perf_counter()
    try:
        keys = request.app[API_KEYS]
        if keys and request.path not in OPEN_PATHS and not bearer_matches(request.headers.get("Authorization"), keys):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        resp = await handler(request)
    except ApiError as e:
        resp = e.response()
    except web.HTTPException as e:      # aiohttp's: 404 no route, 405 wrong method, 413 body too large, ...
        if e.status < 400:
            raise
        message = {404: f"no such endpoint: {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}",
                   413: "the request body is too large"}.get(e.status, e.reason)
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        resp = web.json_response(error_body(e.status, message, code={404: "not_found", 405: "method_not_allowed",
                                                                   413: "body_too_large"}.get(e.status)),
                                 status=e.status, headers=headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        resp = web.json_response(error_body(500, "internal error (logged on the edge)", code="internal_error"),
                                 status=500)
    request.app[METRICS].request(_endpoint(request), resp.status)
    return resp


API_KEYS = web.AppKey("api_keys", list)


def make_app(node) -> web.Application:
    cfg = node.cfg.edge
    app = web.Application(middlewares=[api_edges], client_max_size=cfg.max_body_bytes)
    app[NODE] = node
    app[TOTALS] = Counter()
    app[METRICS] = EdgeMetrics(node)
    app[API_KEYS] = list(cfg.api_keys)
    openai_api.add_routes(app)
    app.router.add_post("/v1/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    for path in PAGE_FILES:
        app.router.add_get(path, page)
    return app
