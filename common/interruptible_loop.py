"""An asyncio loop that the main thread runs piece by piece, so that a terminal program can read input
in the main thread (readline, Ctrl-C raising KeyboardInterrupt there) and still stop one piece of async
work with Ctrl-C without leaving a worker thread inside native code.

Cancelling an `await asyncio.to_thread(f)` does not stop `f`: the thread runs on inside llama.cpp. The
loop's default executor here records every job, and `drain()` waits until all jobs submitted so far
have left; `run_interruptible` drains after each piece and `close` before anything is freed, so no
llama.cpp context is reused or closed while a thread is still inside it.
"""
from __future__ import annotations

import asyncio
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


class TrackedExecutor(ThreadPoolExecutor):
    """A ThreadPoolExecutor that knows which of its jobs have not finished."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._pending: set[Future] = set()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut = super().submit(fn, *args, **kwargs)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._pending)

    async def drain(self) -> None:
        """Return once every job submitted before this call has finished (or was cancelled unstarted)."""
        with self._lock:
            pending = list(self._pending)
        if pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending])


class Interrupted(Exception):
    """Ctrl-C stopped the piece of work (it was cancelled and has unwound)."""


class InterruptibleLoop:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.executor = TrackedExecutor(thread_name_prefix="tandem-worker")
        self.loop.set_default_executor(self.executor)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run to completion; Ctrl-C behaves as Python's default (KeyboardInterrupt)."""
        return self.loop.run_until_complete(coro)

    def run_interruptible(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run as a task that Ctrl-C cancels; then wait for it to unwind and for every worker thread to
        leave, and raise Interrupted. Another Ctrl-C meanwhile is ignored (the wait is short)."""
        task = self.loop.create_task(coro)
        self.loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            raise Interrupted() from None
        finally:
            self.loop.add_signal_handler(signal.SIGINT, lambda: None)
            try:
                self.loop.run_until_complete(self.executor.drain())
            finally:
                self.loop.remove_signal_handler(signal.SIGINT)

    def close(self) -> None:
        """Wait for the worker threads, finish async generators, stop the executor, close the loop."""
        self.loop.run_until_complete(self.executor.drain())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def __enter__(self) -> "InterruptibleLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
