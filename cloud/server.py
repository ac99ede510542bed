"""The cloud's aiohttp app: POST /v1/verify, GET /v1/ws (verify rounds over one WebSocket),
POST /v1/generate, DELETE /v1/sessions/{id}, GET /health, GET /stats, GET /metrics. Bad input gets a
JSON {"error", "field"} with 400/401/409/412/413/422 (over the WebSocket: the same, plus "status")."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from aiohttp import web
from pydantic import ValidationError

from cloud.verifier import ApiError, Verifier
from common.config import TandemConfig
from common.protocol import (PROTOCOL_VERSION, ErrorResponse, GenerateChunk, GenerateRequest, Timing,
                             VerifyRequest, validation_message)

log = logging.getLogger("tandem.cloud")
VERIFIER = web.AppKey("verifier", Verifier)
CONFIG = web.AppKey("config", TandemConfig)


def error_body(verifier: Verifier, status: int, message: str, field: str | None = None, **extra) -> dict:
    """Count the error and build its JSON body (HTTP responses and WebSocket answers alike)."""
    verifier.stats.error(status)
    return ErrorResponse(error=message, field=field).model_dump(exclude_none=True) | extra


def error_response(verifier: Verifier, status: int, message: str, field: str | None = None, **extra) -> web.Response:
    return web.json_response(error_body(verifier, status, message, field, **extra), status=status)


async def _parse(request: web.Request, model):
    if request.content_type != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got '{request.content_type}'")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"body exceeds {request.app[CONFIG].cloud.max_body_bytes} bytes") from None
    return _validate(raw, model)


def _validate(raw, model):
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, field = validation_message(e)
        raise ApiError(422, message, field) from None


@web.middleware
async def errors_middleware(request: web.Request, handler):
    verifier = request.app[VERIFIER]
    token = request.app[CONFIG].cloud.auth_token
    if token and request.path.startswith("/v1/") and request.headers.get("Authorization") != f"Bearer {token}":
        return error_response(verifier, 401, "missing or wrong bearer token")
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(verifier, e.status, e.message, e.field, **e.extra)
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(verifier, e.status, e.reason)
        raise
    except Exception as e:  # a bug or backend failure: report it, keep serving
        log.exception("internal error on %s", request.path)
        return error_response(verifier, 500, f"internal error: {type(e).__name__}: {e}")


async def verify(request: web.Request) -> web.Response:
    req = await _parse(request, VerifyRequest)
    resp = await request.app[VERIFIER].verify(req)
    return web.json_response(text=resp.model_dump_json())


async def verify_ws(request: web.Request) -> web.WebSocketResponse:
    """Verify rounds over one WebSocket: each text message is a VerifyRequest, each answer a
    VerifyResponse or an error object {"error", "field", "status", "session_id", "seq"}. Rounds run
    concurrently (a draft-ahead round while the one before is in flight), so answers come in the
    order they are decided: match them by (session_id, seq). The same rounds as POST /v1/verify for less
    CPU per round (no HTTP request to parse, no response headers, no handler per round:
    ablations/results/frontend_cost.md)."""
    verifier = request.app[VERIFIER]
    ws = web.WebSocketResponse(max_msg_size=request.app[CONFIG].cloud.max_body_bytes)
    await ws.prepare(request)
    rounds: set[asyncio.Task] = set()

    async def one(raw) -> None:
        ids = {}
        try:
            req = _validate(raw, VerifyRequest)
            ids = {"session_id": req.session_id, "seq": req.seq}
            answer = (await verifier.verify(req)).model_dump_json()
        except ApiError as e:
            answer = json.dumps(error_body(verifier, e.status, e.message, e.field, **ids, **e.extra) | {"status": e.status})
        except Exception as e:  # a bug or backend failure: report it, keep serving
            log.exception("internal error on a WebSocket round")
            answer = json.dumps(error_body(verifier, 500, f"internal error: {type(e).__name__}: {e}", **ids) | {"status": 500})
        if not ws.closed:
            await ws.send_str(answer)

    async for msg in ws:
        if msg.type == web.WSMsgType.TEXT:
            task = asyncio.create_task(one(msg.data))
            rounds.add(task)
            task.add_done_callback(rounds.discard)
        elif msg.type == web.WSMsgType.BINARY:
            await ws.send_str(json.dumps(error_body(verifier, 400, "send VerifyRequest JSON as text messages") | {"status": 400}))
    return ws                          # rounds still running finish (the session state stays right), unsent


async def generate(request: web.Request) -> web.StreamResponse:
    req = await _parse(request, GenerateRequest)
    verifier = request.app[VERIFIER]
    stream = verifier.generate(req)
    first = await anext(stream, None)    # validation errors surface before the stream starts
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    t0, total = time.perf_counter(), Timing()
    while first is not None:
        tok, timing = first
        total.queue_ms += timing.queue_ms
        total.compute_ms += timing.compute_ms
        await resp.write(GenerateChunk(token_ids=[tok]).model_dump_json().encode() + b"\n")
        first = await anext(stream, None)
    total.server_ms = round((time.perf_counter() - t0) * 1e3, 3)
    await resp.write(GenerateChunk(done=True, timing=total).model_dump_json().encode() + b"\n")
    await resp.write_eof()
    return resp


async def drop_session(request: web.Request) -> web.Response:
    existed = request.app[VERIFIER].drop(request.match_info["sid"])
    return web.json_response({"dropped": existed})


async def health(request: web.Request) -> web.Response:
    v = request.app[VERIFIER]
    return web.json_response({"status": "ok", "protocol": PROTOCOL_VERSION, "backend": v.backend.name,
                              "n_vocab": v.backend.n_vocab, "n_ctx": v.backend.n_ctx,
                              "max_draft": v.cfg.max_draft, "sessions": len(v.sessions),
                              "frontend_pid": os.getpid()})


async def stats(request: web.Request) -> web.Response:
    v = request.app[VERIFIER]
    return web.json_response(v.stats.snapshot({"backend": v.backend.name, "sessions": len(v.sessions),
                                               "queue_waiting": v.queue.waiting}))


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[VERIFIER].stats.prometheus(), content_type="text/plain")


def make_app(verifier: Verifier, cfg: TandemConfig) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=cfg.cloud.max_body_bytes)
    app[VERIFIER] = verifier
    app[CONFIG] = cfg
    app.router.add_post("/v1/verify", verify)
    app.router.add_get("/v1/ws", verify_ws)
    app.router.add_post("/v1/generate", generate)
    app.router.add_delete("/v1/sessions/{sid}", drop_session)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    return app


async def start_cloud(verifier: Verifier, cfg: TandemConfig, host: str, port: int,
                      reuse_port: bool = False) -> tuple[web.AppRunner, str]:
    """Start serving on host:port (port 0 = any free port); returns the runner and the base URL.
    reuse_port: other processes may serve the same port (SO_REUSEPORT; cloud/frontends.py)."""
    runner = web.AppRunner(make_app(verifier, cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    sock = site._server.sockets[0]
    bound_host, bound_port = sock.getsockname()[:2]
    return runner, f"http://{bound_host}:{bound_port}"
