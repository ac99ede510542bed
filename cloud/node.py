"""A running cloud: backend + verifier + aiohttp server (used by start_cloud.py and the embedded mode)."""
from __future__ import annotations

import asyncio

from cloud.backends.base import make_backend
from cloud.frontends import start_frontends, stop_frontends
from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import TandemConfig


class CloudNode:
    def __init__(self, verifier: Verifier, runner, url: str, frontends: list):
        self.verifier, self._runner, self.url, self._frontends = verifier, runner, url, frontends

    @classmethod
    async def start(cls, cfg: TandemConfig, host: str | None = None, port: int | None = None,
                    backend=None) -> "CloudNode":
        """backend: one already built (tests, benchmarks); by default cfg's, built here."""
        backend = backend or await asyncio.to_thread(make_backend, cfg)
        verifier = Verifier(backend, cfg.cloud, cfg.switches)
        more = bool(getattr(backend, "frontend_conns", None))      # the engine process takes more front ends
        host = host or cfg.cloud.host
        runner, url = await start_cloud(verifier, cfg, host, cfg.cloud.port if port is None else port, reuse_port=more)
        frontends = await asyncio.to_thread(start_frontends, backend, cfg, host, int(url.rsplit(":", 1)[1])) if more else []
        return cls(verifier, runner, url, frontends)

    async def close(self) -> None:
        stop_frontends(self._frontends)
        await self._runner.cleanup()
        self.verifier.backend.close()
