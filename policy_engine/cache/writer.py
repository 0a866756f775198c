"""Write-behind for the Redis level: responses never wait for a cache write.

The pipeline hands its writes (one job per call: a Check's one entry, a CheckBatch's misses)
to a bounded queue and returns at once; one asyncio task on the process's event loop drains
whatever is queued and writes it through the sink in one pipeline, so under load many calls'
writes share a round trip, and a batch's writes are never split across round trips. Nothing
here blocks the loop: `submit` appends or drops, the task awaits the sink.

Why this is safe: an entry is a pure function of its key (the policy revision is in the key),
so writing it a few milliseconds late only costs a replica a miss it would have had anyway,
and writes reordered between calls cannot make anything wrong. When the queue is full (Redis
slower than the miss rate) jobs are dropped and counted, never blocking a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from policy_engine.metrics import CACHE_WRITES_DROPPED

log = logging.getLogger(__name__)

Write = tuple[str, bytes, int]  # key, value, ttl in ms
Sink = Callable[[list[Write]], Awaitable[None]]

_FLUSH_POLL_SECONDS = 0.005
_CANCEL_WAIT_SECONDS = 0.5  # after the deadline: how long a cancelled write may take to end


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class WriteBehind:
    """A bounded queue of writes drained by one task into `sink` (an async callable that
    counts its own failures; an exception it raises is logged and the task goes on).

    `start(loop)` creates the task on `loop` (from any thread); `submit` may be called from
    any thread and never blocks; `flush` and `close` are coroutines on that loop. Writes
    submitted before `start` wait in the queue.
    """

    def __init__(self, sink: Sink, *, max_pending: int = 10_000) -> None:
        self._sink = sink
        self._max_pending = max(1, max_pending)
        self._jobs: deque[Sequence[Write]] = deque()
        self._pending = 0  # queued writes (not jobs)
        self._in_flight = 0  # writes handed to the sink and not yet done
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0  # writes dropped (queue full, closed, or unwritten at the deadline)

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def pending(self) -> int:
        """Writes queued or being written."""
        return self._pending + self._in_flight

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the draining task on `loop` (once); from `loop`'s thread or any other."""
        if _running_loop() is loop:
            self._start_here(loop)
        else:
            asyncio.run_coroutine_threadsafe(self._start_async(loop), loop).result()

    async def _start_async(self, loop: asyncio.AbstractEventLoop) -> None:
        self._start_here(loop)

    def _start_here(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._task is not None or self._closed:
                return
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="pdp-cache-writer")
            if self._jobs:
                self._wake.set()

    def submit(self, writes: Sequence[Write]) -> bool:
        """Queue one job; False (dropped and counted) when the queue is full or closed."""
        count = len(writes)
        if not count:
            return True
        with self._lock:
            if self._closed or self._pending + count > self._max_pending:
                self.dropped += count
                reason = "shutdown" if self._closed else "queue_full"
                full = True
            else:
                self._jobs.append(writes)
                self._pending += count
                full = False
            loop, wake = self._loop, self._wake
        if full:
            CACHE_WRITES_DROPPED.labels(reason).inc(count)
            return False
        if wake is not None and loop is not None:
            if _running_loop() is loop:
                wake.set()
            else:
                loop.call_soon_threadsafe(wake.set)
        return True

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far has been written (or failed); False when
        `timeout` seconds pass first."""
        give_up = time.monotonic() + timeout
        while self.pending:
            if time.monotonic() >= give_up:
                return False
            await asyncio.sleep(_FLUSH_POLL_SECONDS)
        return True

    async def close(self, deadline: float) -> bool:
        """Take no more writes, write what is queued until `deadline` (`time.monotonic()`),
        then stop the task; returns False when writes were left unwritten (counted)."""
        with self._lock:
            self._closed = True
            task, wake = self._task, self._wake
        if task is not None and wake is not None:
            wake.set()
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.wait((task,), timeout=remaining)
            if not task.done():
                task.cancel()
                # Not awaited blindly: a cancelled Redis write may take its socket timeout.
                await asyncio.wait((task,), timeout=_CANCEL_WAIT_SECONDS)
            if task.done() and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()
        with self._lock:
            left = self._pending + self._in_flight
            self._jobs.clear()
            self._pending = self._in_flight = 0
            self.dropped += left
        if left:
            CACHE_WRITES_DROPPED.labels("shutdown").inc(left)
        return left == 0

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None  # set with the task
        while True:
            await wake.wait()
            wake.clear()
            with self._lock:
                batch = [write for job in self._jobs for write in job]
                self._jobs.clear()
                self._in_flight, self._pending = len(batch), 0
                closed = self._closed
            if batch:
                try:
                    await self._sink(batch)
                except Exception:  # the sink counts its own failures; the task goes on
                    log.exception("decision cache write failed")
                # Not on cancellation (close at its deadline): those writes count as dropped.
                self._in_flight = 0
            with self._lock:
                if self._jobs:
                    wake.set()  # queued while the sink ran
                elif closed or self._closed:
                    return
