"""The edge's HTTP client for the cloud: one pooled aiohttp session, timeouts, bounded retries, and a
running RTT estimate (round wall time minus the server's own time, smoothed)."""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Optional

import aiohttp

from common.config import EdgeConfig
from common.protocol import GenerateChunk, GenerateRequest, VerifyRequest, VerifyResponse


class CloudError(RuntimeError):
    """The cloud answered with an error (4xx/5xx)."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"cloud answered {status}: {body.get('error', body)}")
        self.status, self.body = status, body


class CloudUnavailable(RuntimeError):
    """The cloud could not be reached (after retries)."""


RETRYABLE = (aiohttp.ClientConnectionError, asyncio.TimeoutError)


class CloudClient:
    def __init__(self, base_url: str, cfg: EdgeConfig):
        self.base_url = base_url.rstrip("/")
        self.cfg = cfg
        self.rtt_ms: Optional[float] = None
        self._session: Optional[aiohttp.ClientSession] = None

    async def __aenter__(self) -> "CloudClient":
        headers = {"Authorization": f"Bearer {self.cfg.auth_token}"} if self.cfg.auth_token else {}
        self._session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _observe_rtt(self, wall_ms: float, server_ms: float) -> None:
        sample = max(wall_ms - server_ms, 0.0)
        self.rtt_ms = sample if self.rtt_ms is None else 0.8 * self.rtt_ms + 0.2 * sample

    async def _post_json(self, path: str, body: str) -> tuple[dict, float]:
        """POST with bounded retries on connection errors, timeouts and 5xx; 4xx raise at once."""
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            t0 = time.perf_counter()
            try:
                if self.cfg.emulated_rtt_ms:
                    await asyncio.sleep(self.cfg.emulated_rtt_ms / 2e3)      # uplink
                async with self._session.post(self.base_url + path, data=body,
                                              headers={"Content-Type": "application/json"}) as r:
                    data = await r.json(content_type=None)
                    if self.cfg.emulated_rtt_ms:
                        await asyncio.sleep(self.cfg.emulated_rtt_ms / 2e3)  # downlink
                    wall_ms = (time.perf_counter() - t0) * 1e3
                    if r.status < 400:
                        return data, wall_ms
                    last = CloudError(r.status, data if isinstance(data, dict) else {"error": str(data)})
                    if r.status < 500:
                        raise last
            except RETRYABLE as e:
                last = e
        if isinstance(last, CloudError):
            raise last
        raise CloudUnavailable(f"cloud at {self.base_url} unreachable after {self.cfg.retries + 1} tries: "
                               f"{type(last).__name__}: {last}")

    async def verify(self, req: VerifyRequest) -> tuple[VerifyResponse, float]:
        """Returns the response and the round's wall time in ms (as seen by the edge)."""
        data, wall_ms = await self._post_json("/v1/verify", req.model_dump_json(exclude_none=True))
        resp = VerifyResponse.model_validate(data)
        self._observe_rtt(wall_ms, resp.timing.server_ms)
        return resp, wall_ms

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Target-only tokens, streamed as NDJSON lines (no retries: a stream is not idempotent)."""
        try:
            async with self._session.post(self.base_url + "/v1/generate", data=req.model_dump_json(),
                                          headers={"Content-Type": "application/json"}) as r:
                if r.status >= 400:
                    raise CloudError(r.status, await r.json(content_type=None))
                async for line in r.content:
                    if line.strip():
                        yield GenerateChunk.model_validate(json.loads(line))
        except RETRYABLE as e:
            raise CloudUnavailable(f"cloud at {self.base_url}: {type(e).__name__}: {e}") from e

    async def health(self) -> dict:
        """GET /health; also a pure RTT probe."""
        t0 = time.perf_counter()
        try:
            async with self._session.get(self.base_url + "/health") as r:
                data = await r.json(content_type=None)
        except RETRYABLE as e:
            raise CloudUnavailable(f"cloud at {self.base_url} unreachable: {type(e).__name__}: {e}") from e
        self._observe_rtt((time.perf_counter() - t0) * 1e3, 0.0)
        return data

    async def drop(self, session_id: str) -> None:
        try:
            async with self._session.delete(f"{self.base_url}/v1/sessions/{session_id}") as r:
                await r.read()
        except RETRYABLE:
            pass   # best effort: the cloud also evicts idle sessions
