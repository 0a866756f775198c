"""Write-behind for the Redis level: responses never wait for a cache write.

Handlers hand their writes (one job per RPC: a Check's one entry, a CheckBatch's misses) to a
small daemon thread through a bounded queue and return at once. The thread drains whatever is
queued and writes it in one pipeline, so under load many RPCs' writes share a round trip, and
a batch's writes are never split across round trips.

Why this is safe: an entry is a pure function of its key (the policy revision is in the key),
so writing it a few milliseconds late only costs a replica a miss it would have had anyway,
and writes reordered between RPCs cannot make anything wrong. When the queue is full (Redis
slower than the miss rate) jobs are dropped, never blocking a request.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

Write = tuple[str, bytes, int]  # key, value, ttl in ms
Sink = Callable[[list[Write]], None]


class WriteBehind:
    def __init__(self, sink: Sink, *, max_pending: int = 10_000, name: str = "pdp-cache") -> None:
        self._sink = sink
        self._max_pending = max(1, max_pending)
        self._jobs: deque[Sequence[Write]] = deque()
        self._pending = 0  # queued writes (not jobs)
        self._busy = False
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self.dropped = 0  # writes dropped because the queue was full
        self._thread = threading.Thread(target=self._run, name=f"{name}-writer", daemon=True)
        self._thread.start()

    def submit(self, writes: Sequence[Write]) -> bool:
        """Queue one job; False (and dropped) when the queue is full or closed."""
        count = len(writes)
        if not count:
            return True
        with self._cond:
            if self._closed or self._pending + count > self._max_pending:
                self.dropped += count
                return False
            self._jobs.append(writes)
            self._pending += count
            self._cond.notify()
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far has been written (or failed). For tests."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._jobs and not self._closed:
                    cond.wait()
                if not self._jobs:
                    return  # closed and drained
                batch: list[Write] = []
                while self._jobs:
                    batch.extend(self._jobs.popleft())
                self._pending = 0
                self._busy = True
            try:
                self._sink(batch)
            except Exception:  # the sink counts its own failures; never let the thread die
                log.exception("decision cache write failed")
            finally:
                with cond:
                    self._busy = False
                    cond.notify_all()
