"""Busy polling for an asyncio loop (`cloud.vllm.busy_poll_ms`): after activity, the loop keeps
polling its sockets (epoll with a zero timeout) for a while instead of sleeping in epoll.

Why: a process that sleeps in epoll takes a while to run again once data arrives. On the device's
VM (H200 host, 16 cores; `ablations/wake_probe.py`), a loopback HTTP round trip whose server paused
3 ms (an engine step) cost 690 µs beyond the pause with both sides sleeping, 249 µs with both
polling, 175 µs with no pause at all. A verify round crosses four such hops (edge -> front end ->
engine process -> front end -> edge), each waking a process that slept through the engine step.
The window bounds the cost: an idle cloud sleeps as before.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional


class BusyPoll:
    def __init__(self, window_s: float):
        self.window_s = window_s
        self.until = 0.0
        self.task: Optional[asyncio.Task] = None

    def poke(self) -> None:
        """Activity: poll for window_s from now (call it on the loop's thread)."""
        if self.window_s <= 0:
            return
        self.until = time.monotonic() + self.window_s
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._spin())

    async def _spin(self) -> None:
        try:
            while time.monotonic() < self.until:
                await asyncio.sleep(0)      # a ready task makes the loop poll with a zero timeout
        finally:
            self.task = None
