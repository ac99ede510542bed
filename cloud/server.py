"""The cloud's aiohttp app: POST /v1/verify, GET /v1/ws (verify rounds over one WebSocket),
POST /v1/generate, DELETE /v1/sessions/{id}, GET /health, GET /stats, GET /metrics. Every error is
JSON {"error", "field"?}: 400/401/404/405/408/409/412/413/415/422/429/503 (over the WebSocket: the
same, plus "status"); bodies and frames go through common/jsonbody.py, so no input reaches a 500.

Access (cloud.auth_token; cloud.metrics_token): with auth_token set, /v1/* needs
"Authorization: Bearer <auth_token>"; /stats and /metrics need auth_token or metrics_token (either
set closes them); GET /health stays open as a liveness probe ({"status": "ok", "auth_required":
true}) and gives its details (backend, window, sessions, pid) only to a valid token. Tokens are
compared in constant time. Connections are bounded by cloud.limits (common/http_limits.py)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time

from aiohttp import web
from pydantic import ValidationError

from cloud.verifier import ApiError, Verifier
from common.auth import bearer_matches
from common.coalesce import COMPUTED, WS_QUERY, Cadence, Coalescer, Policy
from common.config import TandemConfig
from common.http_limits import read_body, start_site
from common.jsonbody import BadBody, check_content_type, parse_json_object
from common.protocol import (PROTOCOL_VERSION, ErrorResponse, GenerateChunk, GenerateRequest, Timing,
                             VerifyRequest, batch_frame, unbatch, validation_message)

log = logging.getLogger("tandem.cloud")
VERIFIER = web.AppKey("verifier", Verifier)
CONFIG = web.AppKey("config", TandemConfig)
TOKENIZER = web.AppKey("tokenizer", object)
COALESCE = web.AppKey("coalesce", object)      # Policy (common/coalesce.py): for the links whose edge asks for it
MONITORING = ("/stats", "/metrics")
WS_ROUNDS_IN_FLIGHT = 256      # per WebSocket: past this the socket is not read until a round ends


def error_body(verifier: Verifier, status: int, message: str, field: str | None = None, **extra) -> dict:
    """Count the error and build its JSON body (HTTP responses and WebSocket answers alike)."""
    verifier.stats.error(status)
    return ErrorResponse(error=message, field=field).model_dump(exclude_none=True) | extra


def error_response(verifier: Verifier, status: int, message: str, field: str | None = None,
                   headers: dict | None = None, **extra) -> web.Response:
    headers = dict(headers or {})
    if "retry_after_s" in extra:
        headers["Retry-After"] = str(extra["retry_after_s"])
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    resp = web.json_response(error_body(verifier, status, message, field, **extra), status=status, headers=headers)
    if status == 408:
        resp.force_close()               # the rest of a late body is not worth waiting for
    return resp


async def _parse(request: web.Request, model):
    cfg = request.app[CONFIG].cloud
    try:
        check_content_type(request.content_type, request.charset)     # before reading the body
        raw = await read_body(request, cfg.limits, cfg.max_body_bytes)
    except BadBody as e:
        raise ApiError(e.status, e.message) from None
    return _validate(raw, model, request.content_type, request.charset)


def _validate(raw, model, content_type: str | None = "application/json", charset: str | None = None):
    """A typed message from a body (bytes) or a WebSocket text frame (str); ApiError 400/415/422."""
    try:
        data = parse_json_object(raw, content_type, charset)
    except BadBody as e:
        raise ApiError(e.status, e.message) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, field = validation_message(e)
        raise ApiError(422, message, field) from None


def _authorized(request: web.Request, *tokens) -> bool:
    """Whether the request carries one of the configured tokens (True when none is configured)."""
    tokens = [t for t in tokens if t]
    return not tokens or bearer_matches(request.headers.get("Authorization"), tokens)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    verifier = request.app[VERIFIER]
    cfg = request.app[CONFIG].cloud
    if request.path.startswith("/v1/"):
        allowed = _authorized(request, cfg.auth_token)
    elif request.path in MONITORING:
        allowed = _authorized(request, cfg.auth_token, cfg.metrics_token)
    else:                                 # /health (open: its details are decided there), 404s
        allowed = True
    if not allowed:
        return error_response(verifier, 401, "missing or wrong bearer token")
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(verifier, e.status, e.message, e.field, **e.extra)
    except web.HTTPException as e:
        if e.status >= 400:
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            return error_response(verifier, e.status, f"{e.reason}: {request.method} {request.path}"
                                  if e.status in (404, 405) else e.reason, headers=allow)
        raise
    except Exception as e:  # a bug or backend failure: report it, keep serving
        log.exception("internal error on %s", request.path)
        return error_response(verifier, 500, f"internal error: {type(e).__name__}: {e}")


async def verify(request: web.Request) -> web.Response:
    req = await _parse(request, VerifyRequest)
    request.app[VERIFIER].stats.link(f"http:{request.remote}", "http").observe(req.rtt_ms, req.rttvar_ms)
    resp = await request.app[VERIFIER].verify(req, client=request.remote)
    return web.json_response(text=resp.model_dump_json())


def _ws_messages(raw: str) -> list:
    """The messages of one text frame: the items of a batch envelope {"batch": [...]}, or the frame's
    object itself. ApiError 400 if the frame is no JSON object."""
    try:
        return unbatch(parse_json_object(raw, "application/json", None))
    except BadBody as e:
        raise ApiError(e.status, e.message) from None


def _validate_item(item, model):
    """One parsed message as `model`; ApiError 400/422."""
    if not isinstance(item, dict):
        raise ApiError(400, "each item of a batch must be a JSON object")
    try:
        return model.model_validate(item)
    except ValidationError as e:
        message, field = validation_message(e)
        raise ApiError(422, message, field) from None


async def verify_ws(request: web.Request) -> web.WebSocketResponse:
    """Verify rounds over one WebSocket: each text message is a VerifyRequest (or a batch of them,
    {"batch": [...]}), each answer a VerifyResponse or an error object {"error", "field", "status",
    "session_id", "seq"}. Rounds run concurrently (a draft-ahead round while the one before is in flight),
    so answers come in the order they are decided: match them by (session_id, seq). The same rounds as
    POST /v1/verify for less CPU per round (no HTTP request to parse, no response headers, no handler per
    round: ablations/results/frontend_cost.md).

    Coalescing (common/coalesce.py), on a link whose edge asks for it (`?coalesce=1`: its
    switches.rtt_batching): answers of this link decided together go in one frame ({"batch": [...]}, one
    answer alone still bare); on a link whose edge reports an RTT at or above coalesce.min_rtt_ms an answer
    may wait, at most min(rtt_fraction x RTT, max_wait_ms), for the answers of the link's other rounds this
    cloud holds (received, not yet answered: on a CPU backend the rounds queued behind the one verifying, on
    an in-engine backend the step's), and goes as soon as they are in, or at once when the link's answers
    have been coming further apart than the window has left, unless some of them are computed already
    (the rest of the step that is ending: `due`)."""
    verifier = request.app[VERIFIER]
    stats = verifier.stats
    policy: Policy | None = request.app[COALESCE] if request.query.get(WS_QUERY) in ("1", "true") else None
    ws = web.WebSocketResponse(max_msg_size=request.app[CONFIG].cloud.max_body_bytes)
    await ws.prepare(request)
    rounds: set[asyncio.Task] = set()
    client = request.remote
    link = stats.link(f"ws:{client}:{id(ws):x}", "ws")
    unanswered = [0]                 # rounds of this link received whose answer is not out yet
    due = [0]                        # ... of which the target's work is done (their answers are being finished)
    cadence = Cadence()              # how far apart this link's answers come while it has rounds here

    async def send(text: str, messages: int = 1, held_ms: float = 0.0) -> None:
        if not ws.closed:
            await ws.send_str(text)
            stats.frame_out(link, len(text), messages, held_ms)

    outbox = None if policy is None else Coalescer(policy, send, lambda: link.rtt_ms, lambda: unanswered[0],
                                                   batch_frame, "cloud-ws", cadence.next_in_ms, lambda: due[0])
    if outbox is not None:
        outbox.hold_counts = stats.hold_counts       # counted for the whole cloud

    async def one(item) -> None:
        ids, step = {}, []

        def computed(batch: int) -> None:        # COMPUTED: the backend has done this round's target work
            if not step:
                step.append(batch)
                due[0] += 1

        if outbox is not None:
            COMPUTED.set(computed)               # this task's context: seen by the backend path it awaits
        try:
            req = _validate_item(item, VerifyRequest)
            ids = {"session_id": req.session_id, "seq": req.seq}
            link.observe(req.rtt_ms, req.rttvar_ms)
            answer = (await verifier.verify(req, client=client)).model_dump_json()
        except ApiError as e:
            answer = json.dumps(error_body(verifier, e.status, e.message, e.field, **ids, **e.extra) | {"status": e.status})
        except Exception as e:  # a bug or backend failure: report it, keep serving
            log.exception("internal error on a WebSocket round")
            answer = json.dumps(error_body(verifier, 500, f"internal error: {type(e).__name__}: {e}", **ids) | {"status": 500})
        finally:
            unanswered[0] -= 1
            if step:
                due[0] -= 1
            cadence.item(more_outstanding=unanswered[0] > 0, step=step[0] if step else None)
        if outbox is not None:
            outbox.put(answer)
        else:
            await send(answer)

    try:
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                try:
                    items = _ws_messages(msg.data)
                except ApiError as e:
                    stats.frame_in(link, len(msg.data), 1)
                    await send(json.dumps(error_body(verifier, e.status, e.message) | {"status": e.status}))
                    continue
                stats.frame_in(link, len(msg.data), len(items))
                for item in items:
                    if len(rounds) >= WS_ROUNDS_IN_FLIGHT:       # back-pressure: stop reading until one ends
                        await asyncio.wait(rounds, return_when=asyncio.FIRST_COMPLETED)
                    unanswered[0] += 1
                    task = asyncio.create_task(one(item))
                    rounds.add(task)
                    task.add_done_callback(rounds.discard)
            elif msg.type == web.WSMsgType.BINARY:
                await send(json.dumps(error_body(verifier, 400, "send VerifyRequest JSON as text messages") | {"status": 400}))
    finally:                             # rounds still running finish (the session state stays right), unsent
        stats.links.pop(link.name, None)
        if outbox is not None:
            await outbox.close()
    return ws


async def generate(request: web.Request) -> web.StreamResponse:
    """NDJSON: one line per token, then {"done": true, "timing"}; a failure after the stream started
    ends it with {"done": true, "error": ...} (the status line already said 200). A client that
    leaves stops the generation."""
    req = await _parse(request, GenerateRequest)
    verifier = request.app[VERIFIER]
    async with contextlib.aclosing(verifier.generate(req)) as stream:
        first = await anext(stream, None)    # validation errors surface before the stream starts
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        t0, total, error = time.perf_counter(), Timing(), None
        try:
            while first is not None:
                tok, timing = first
                total.queue_ms += timing.queue_ms
                total.compute_ms += timing.compute_ms
                await resp.write(GenerateChunk(token_ids=[tok]).model_dump_json(exclude_none=True).encode() + b"\n")
                first = await anext(stream, None)
        except ConnectionError:              # the client is gone: no more tokens for nobody
            return resp
        except Exception as e:  # a backend failure mid-stream: say so in the last line
            log.exception("internal error in a /v1/generate stream")
            error = error_body(verifier, 500, f"internal error: {type(e).__name__}: {e}")["error"]
        total.server_ms = round((time.perf_counter() - t0) * 1e3, 3)
        try:
            await resp.write(GenerateChunk(done=True, timing=total, error=error).model_dump_json(
                exclude_none=True).encode() + b"\n")
            await resp.write_eof()
        except ConnectionError:
            pass
    return resp


async def drop_session(request: web.Request) -> web.Response:
    existed = request.app[VERIFIER].drop(request.match_info["sid"])
    return web.json_response({"dropped": existed})


async def health(request: web.Request) -> web.Response:
    """Liveness for anyone; the details only for a valid token (or when the cloud has none)."""
    cfg = request.app[CONFIG].cloud
    if not _authorized(request, cfg.auth_token, cfg.metrics_token):
        if request.headers.get("Authorization") is not None:     # a wrong token is an error, not a probe
            return error_response(request.app[VERIFIER], 401, "missing or wrong bearer token")
        return web.json_response({"status": "ok", "auth_required": True})
    v = request.app[VERIFIER]
    return web.json_response({"status": "ok", "protocol": PROTOCOL_VERSION, "backend": v.backend.name,
                              "n_vocab": v.backend.n_vocab, "n_ctx": v.backend.n_ctx,
                              "max_draft": v.cfg.max_draft, "sessions": len(v.sessions),
                              "tokenizer": request.app[TOKENIZER], "frontend_pid": os.getpid()})


async def stats(request: web.Request) -> web.Response:
    v = request.app[VERIFIER]
    v.stats.update_cpu()
    return web.json_response(v.stats.snapshot({"backend": v.backend.name, "sessions": len(v.sessions),
                                               "queue_waiting": v.queue.waiting}))


async def metrics(request: web.Request) -> web.Response:
    request.app[VERIFIER].stats.update_cpu()
    return web.Response(body=request.app[VERIFIER].stats.prometheus(), content_type="text/plain")


def target_tokenizer(cfg: TandemConfig):
    """The target's tokenizer fingerprint, published on /health so that an edge can refuse a cloud whose
    vocabulary is not its draft's (None where the target is no GGUF of ours, e.g. a vLLM model_dir)."""
    from common.assets import AssetError, cache_dir, model_file
    from common.tokenizer_check import fingerprint_file, public
    if cfg.cloud.backend == "vllm" and cfg.cloud.vllm.model_dir:
        return None
    try:
        return public(fingerprint_file(model_file(cfg.models, "target"), cache=cache_dir(cfg.models.cache_dir)))
    except (AssetError, OSError, ValueError):
        return None


def make_app(verifier: Verifier, cfg: TandemConfig) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=cfg.cloud.max_body_bytes)
    app[VERIFIER] = verifier
    app[CONFIG] = cfg
    app[TOKENIZER] = target_tokenizer(cfg)
    app[COALESCE] = Policy.of(cfg.coalesce)      # used for the links that ask (switches.rtt_batching is the edge's)
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
    """Start serving on host:port (port 0 = any free port) under cloud.limits; returns the runner and
    the base URL. reuse_port: other processes may serve the same port (SO_REUSEPORT; cloud/frontends.py)."""
    return await start_site(make_app(verifier, cfg), host, port, cfg.cloud.limits, reuse_port=reuse_port)
