"""For the slow edge-server tests: a real edge (EdgeNode + embedded cloud, tests/realmodels.py) behind
the edge's HTTP app on a loopback port, served from an event loop in a background thread, so a test
can talk to it with ordinary synchronous clients (the openai SDK, a browser) and still reach the node."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Awaitable

from common.http_limits import start_site
from edge.server import make_app
from tests.realmodels import edge_and_cloud


@dataclass
class EdgeServer:
    edge: Any            # the EdgeNode
    cloud: Any           # the CloudNode
    url: str
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Awaitable, timeout: float = 600):
        """Run a coroutine on the server's loop (e.g. edge.generate) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def edge_server(cfg):
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future = concurrent.futures.Future()
    stop: dict = {}

    async def serve():
        try:
            async with edge_and_cloud(cfg) as (edge, cloud):
                runner, url = await start_site(make_app(edge), "127.0.0.1", 0, cfg.edge.limits)
                stop["event"] = asyncio.Event()
                ready.set_result(EdgeServer(edge, cloud, url, loop))
                try:
                    await stop["event"].wait()
                finally:
                    await runner.cleanup()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), name="edge-server", daemon=True)
    thread.start()
    server = ready.result(timeout=900)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop["event"].set)
        thread.join(120)
        loop.close()
