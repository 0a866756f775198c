"""The process's asyncio event loop, run in a dedicated thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class EventLoop:
    """The process's asyncio event loop, running in a daemon thread ("pdp-loop"): every
    grpc.aio server of the process, the asyncio Redis client and the JWKS fetcher live on it,
    and synchronous code drives them through `call`. Started by the first `event_loop()`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pdp-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_loop(self) -> bool:
        """Is the caller running on the loop's thread (where `call` would deadlock)?"""
        return threading.current_thread() is self._thread

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and return its result (its exception is raised here).

        Raises RuntimeError when called from the loop's own thread (it would deadlock) and
        TimeoutError when `timeout` seconds pass first (the coroutine is then cancelled)."""
        if self.on_loop():
            coro.close()
            raise RuntimeError("EventLoop.call from the loop's own thread would deadlock")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


_loop: EventLoop | None = None
_loop_lock = threading.Lock()


def event_loop() -> EventLoop:
    """The process's `EventLoop`, started on first use."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = EventLoop()
        return _loop
