"""The process's asyncio event loop, run in a dedicated thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from policy_engine.lifecycle.component import ComponentStatus, State

T = TypeVar("T")


class EventLoop:
    """The process's asyncio event loop, running in a daemon thread ("pdp-loop"): every
    grpc.aio server of the process, the asyncio Redis client and the JWKS fetcher live on it,
    and synchronous code drives them through `call`. The process's one loop is started by the
    first `event_loop()`.

    A `Component` (the first a server starts): `start()` starts the thread (once; again is a
    no-op). `stop()` leaves the loop running: it is the process's, shared by every server and
    client in it (tests run several servers in one process), and its daemon thread ends with
    the process; what runs on it is stopped by its own component.
    """

    name = "event_loop"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pdp-loop", daemon=True)
        self._start_lock = threading.Lock()

    def start(self) -> None:
        with self._start_lock:
            if self._thread.ident is None:
                self._thread.start()

    def stop(self, deadline: float) -> bool:
        """Leaves the process's loop running (see the class docstring); True."""
        return True

    def status(self) -> ComponentStatus:
        if self._thread.ident is None:
            return ComponentStatus(self.name, State.NEW, False, "not started")
        if not self._thread.is_alive() or self.loop.is_closed():
            return ComponentStatus(self.name, State.FAILED, False, "the loop's thread has ended")
        return ComponentStatus(self.name, State.RUNNING, True)

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


def process_event_loop() -> EventLoop:
    """The process's `EventLoop`, made (not started) on first use: what a server's lifecycle
    starts as its first component."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = EventLoop()
        return _loop


def event_loop() -> EventLoop:
    """The process's `EventLoop`, started on first use."""
    loop = process_event_loop()
    loop.start()
    return loop
