"""Helpers for the slow tests: real models, real HTTP on loopback."""
import asyncio
import contextlib

from cloud.node import CloudNode
from common.config import load_config
from edge.node import EdgeNode


def config(**overrides):
    return load_config(overrides={"cloud.n_ctx": 2048, "draft.n_ctx": 2048, **overrides})


@contextlib.asynccontextmanager
async def edge_and_cloud(cfg):
    cloud = await CloudNode.start(cfg, "127.0.0.1", 0)
    try:
        async with EdgeNode(cfg, cloud.url) as edge:
            yield edge, cloud
    finally:
        await cloud.close()


def run(coro):
    return asyncio.run(coro)
