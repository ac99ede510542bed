"""A running cloud: backend + verifier + aiohttp server (used by start_cloud.py and the embedded mode)."""
from __future__ import annotations

import asyncio

from cloud.backends.base import make_backend
from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import TandemConfig


class CloudNode:
    def __init__(self, verifier: Verifier, runner, url: str):
        self.verifier, self._runner, self.url = verifier, runner, url

    @classmethod
    async def start(cls, cfg: TandemConfig, host: str | None = None, port: int | None = None) -> "CloudNode":
        backend = await asyncio.to_thread(make_backend, cfg)
        verifier = Verifier(backend, cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, host or cfg.cloud.host,
                                        cfg.cloud.port if port is None else port)
        return cls(verifier, runner, url)

    async def close(self) -> None:
        await self._runner.cleanup()
        self.verifier.backend.close()
