"""The edge's HTTP API (aiohttp): POST /v1/generate (NDJSON stream or one JSON), GET /health, GET /stats.

Request: {"prompt": "text" | "prompt_ids": [ids], "raw": false, "max_tokens": 128, "temperature": 0.0,
"seed": null, "mode": "edge_cloud"|"edge_only"|"cloud_only"|null, "stream": true}.
Stream lines: {"token_ids": [...], "text": "..."} as tokens are committed, then {"done": true, "stats": {...}}.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Annotated, Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.protocol import validation_message
from edge.generator import Mode
from edge.node import EdgeNode

NODE = web.AppKey("node", EdgeNode)
TOTALS = web.AppKey("totals", Counter)


class EdgeGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Optional[str] = Field(None, min_length=1)
    prompt_ids: Optional[list[Annotated[int, Field(ge=0)]]] = Field(None, min_length=1)
    raw: bool = False
    max_tokens: Optional[int] = Field(None, ge=1, le=8192)
    temperature: Optional[float] = Field(None, ge=0.0, le=10.0)
    seed: Optional[int] = None
    mode: Optional[Mode] = Field(None, strict=False)
    stream: bool = True

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of 'prompt' and 'prompt_ids'")
        return self


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    return web.json_response({"error": message, **({"field": field} if field else {})}, status=status)


async def generate(request: web.Request) -> web.StreamResponse:
    node: EdgeNode = request.app[NODE]
    try:
        body = await request.json()
        req = EdgeGenerateRequest.model_validate(body if isinstance(body, dict) else None)
    except json.JSONDecodeError as e:
        return _error(400, f"malformed JSON: {e}")
    except ValidationError as e:
        return _error(422, *validation_message(e))
    ids = req.prompt_ids or node.encode(req.prompt, req.raw)
    bad = [t for t in ids if t >= node.drafter.runner.n_vocab]
    if bad:
        return _error(422, f"token id {bad[0]} is outside the vocabulary", "prompt_ids")
    if len(ids) >= node.cfg.draft.n_ctx:
        return _error(413, f"prompt of {len(ids)} tokens exceeds the context of {node.cfg.draft.n_ctx}", "prompt")
    sampling = node.sampling(req.temperature, req.seed)
    max_tokens = req.max_tokens or node.cfg.sampling.max_tokens
    box, toks, text = [], [], []
    resp = None
    if req.stream:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
    try:
        async for t, piece in node.stream(ids, max_tokens, sampling, req.mode, box):
            toks += t
            text.append(piece)
            if resp is not None:
                await resp.write(json.dumps({"token_ids": t, "text": piece}).encode() + b"\n")
    except ValueError as e:
        if resp is None:
            return _error(422, str(e), "mode")
        await resp.write(json.dumps({"error": str(e)}).encode() + b"\n")
    stats = box[0].as_dict() if box else {}
    totals = request.app[TOTALS]
    totals["generations"] += 1
    for key in ("tokens", "rounds", "drafted", "accepted"):
        totals[key] += stats.get(key, 0) or 0
    totals["errors"] += bool(stats.get("error"))
    if resp is None:
        return web.json_response({"text": "".join(text), "token_ids": toks, **stats},
                                 status=502 if stats.get("error") and not toks else 200)
    await resp.write(json.dumps({"done": True, "stats": stats}).encode() + b"\n")
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    node: EdgeNode = request.app[NODE]
    cloud = None
    if node.client:
        try:
            cloud = await node.client.health()
        except Exception as e:
            cloud = {"status": "unreachable", "error": str(e)}
    return web.json_response({"status": "ok", "draft_model": node.cfg.models.draft, "cloud": cloud,
                              "rtt_ms": node.client.rtt_ms if node.client else None})


async def stats(request: web.Request) -> web.Response:
    t = request.app[TOTALS]
    node: EdgeNode = request.app[NODE]
    return web.json_response({**t, "acceptance_rate": round(t["accepted"] / t["drafted"], 4) if t["drafted"] else None,
                              "rtt_ms": node.client.rtt_ms if node.client else None})


async def probe_rtt(app: web.Application):
    """Keep the RTT estimate fresh between generations (it is reported to the cloud each round)."""
    node = app[NODE]
    async def loop():
        while True:
            await asyncio.sleep(node.cfg.edge.rtt_probe_interval_s)
            try:
                await node.client.health()
            except Exception:
                pass
    task = asyncio.create_task(loop()) if node.client else None
    yield
    if task:
        task.cancel()


def make_app(node: EdgeNode) -> web.Application:
    app = web.Application()
    app[NODE] = node
    app[TOTALS] = Counter()
    app.cleanup_ctx.append(probe_rtt)
    app.router.add_post("/v1/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app
