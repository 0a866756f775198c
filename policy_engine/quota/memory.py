"""The in-process quota counters: used when no Redis is configured.

PER PROCESS: every server process (each of `--workers`, each replica) counts on its own, so
N processes allow up to N times a quota. Configure `quota.redis_url` (or `cache.redis_url`)
to share the counters (`redis_store.py`).

Semantics are the Redis store's (see `model.py`): fixed windows aligned to multiples of
`window_ms` since the Unix epoch; sliding windows as an exact log of ALLOW times (an ALLOW at
`t` counts while `now - t < window_ms`); an item is counted in all its charges or in none.

Memory is bounded: a bucket is dropped once its window has passed (a heap of expiry times,
one entry per bucket, is drained on every call), a sliding log is trimmed to its window, and
`max_units` caps buckets plus sliding log entries together. A charge that would need more
than that is unavailable (the caller applies `when_unavailable`, deny by default), never
admitted uncounted.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import repeat

from policy_engine.lifecycle import ComponentStatus, State
from policy_engine.quota.counting import CounterId, counter_id, distinct, unavailable_all
from policy_engine.quota.model import (
    ADMITTED,
    UNAVAILABLE,
    Algorithm,
    Charge,
    QuotaSpec,
    Verdict,
)

DEFAULT_MAX_UNITS = 1_000_000  # buckets + sliding log entries: tens of MB at most


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _Fixed:
    """One fixed window's count; `end` is the window's end (epoch ms)."""

    __slots__ = ("count", "end")
    units = 1  # a new one holds one unit, as its count does

    def __init__(self, now: int, window_ms: int) -> None:
        self.end = _window_end(now, window_ms)
        self.count = 0

    def refusal(self, spec: QuotaSpec, now: int) -> Verdict | None:
        """The verdict when the window is full, None when it has room. A window ahead of now
        (the wall clock stepped back) keeps its count (fail closed)."""
        if self.count < spec.limit or self.end < _window_end(now, spec.window_ms):
            return None
        return Verdict(False, spec, max(1, min(self.end - now, spec.window_ms)))

    def room(self, spec: QuotaSpec, now: int) -> int:
        """How many more ALLOWs fit at `now` (the whole limit once the window has passed)."""
        if self.end < _window_end(now, spec.window_ms):
            return spec.limit
        return max(0, spec.limit - self.count)

    def add(self, now: int, window_ms: int, times: int = 1) -> int:
        """Count `times` ALLOWs at `now`; returns the units they took (none)."""
        end = _window_end(now, window_ms)
        if self.end < end:  # the bucket's window has passed: a new window
            self.end, self.count = end, 0
        self.count += times
        return 0

    def expiry(self, now: int, window_ms: int) -> int:
        return self.end


class _Sliding:
    """The ALLOW times (epoch ms, oldest first) still inside the window."""

    __slots__ = ("log",)
    units = 2  # a new one holds its bucket and its first entry

    def __init__(self, now: int, window_ms: int) -> None:
        self.log: deque[int] = deque()

    def trim(self, now: int, window_ms: int) -> int:
        """Drop the entries outside the window ending at `now`; returns how many."""
        log, oldest_kept, dropped = self.log, now - window_ms, 0
        while log and log[0] <= oldest_kept:
            log.popleft()
            dropped += 1
        return dropped

    def refusal(self, spec: QuotaSpec, now: int) -> Verdict | None:
        """The verdict when the log is full (after `trim`), None when it has room. It frees
        when enough entries leave to make room for one (a lowered limit can leave more than
        `limit` inside the window)."""
        log = self.log
        if len(log) < spec.limit:
            return None
        freed_at = log[len(log) - spec.limit] + spec.window_ms
        return Verdict(False, spec, max(1, min(freed_at - now, spec.window_ms)))

    def room(self, spec: QuotaSpec, now: int) -> int:
        """How many more ALLOWs fit (after `trim`)."""
        return max(0, spec.limit - len(self.log))

    def add(self, now: int, window_ms: int, times: int = 1) -> int:
        """Log `times` ALLOWs at `now`; returns the units they took (their entries)."""
        if times == 1:
            self.log.append(now)
        else:
            self.log.extend(repeat(now, times))
        return times

    def expiry(self, now: int, window_ms: int) -> int:
        return self.log[-1] + window_ms if self.log else now


def _window_end(now: int, window_ms: int) -> int:
    """The end of the fixed window holding `now` (windows are aligned to the epoch)."""
    return now - now % window_ms + window_ms


class InProcessQuotaStore:
    """A `QuotaStore` in this process's memory (see the module docstring); thread-safe: one
    lock around each call, so a call is atomic against every other thread's.

    `clock` returns epoch milliseconds (tests and `pdp test` inject one; default the wall
    clock). `max_units` bounds buckets plus sliding log entries."""

    name = "quota"

    def __init__(
        self,
        *,
        clock: Callable[[], int] = _wall_clock_ms,
        max_units: int = DEFAULT_MAX_UNITS,
    ) -> None:
        self._clock = clock
        self._max_units = max(1, max_units)
        self._lock = threading.Lock()
        self._buckets: dict[CounterId, _Fixed | _Sliding] = {}
        self._windows: dict[CounterId, int] = {}  # window_ms of each bucket (for its expiry)
        self._heap: list[tuple[int, CounterId]] = []  # (expiry ms, key): one entry per bucket
        self.units = 0  # buckets + sliding log entries held now
        self._stopped = False

    # --- counting ---------------------------------------------------------------------------

    async def consume(
        self, items: Sequence[Sequence[Charge]], deadline: float | None
    ) -> list[Verdict]:
        """See `QuotaStore.consume`; answers at once (no I/O)."""
        return self.consume_sync(items, deadline)

    def consume_sync(
        self, items: Sequence[Sequence[Charge]], deadline: float | None = None
    ) -> list[Verdict]:
        """`consume` for synchronous callers (any thread): one `Verdict` per item, in order.
        A `deadline` (`time.monotonic()` s) already passed: every item unavailable."""
        if deadline is not None and deadline <= time.monotonic():
            return unavailable_all(items)
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            return [self._item(distinct(charges), now) for charges in items]

    def _item(self, charges: Sequence[Charge], now: int) -> Verdict:
        """Check every charge, then count all of them or none (under the lock)."""
        found: list[tuple[Charge, CounterId, _Fixed | _Sliding | None]] = []
        needed = 0
        for charge in charges:
            spec = charge.spec
            key = counter_id(charge)
            bucket = self._buckets.get(key)
            found.append((charge, key, bucket))
            kind = _Fixed if spec.algorithm is Algorithm.FIXED else _Sliding
            if bucket is None:
                needed += kind.units
                continue
            if isinstance(bucket, _Sliding):
                self.units -= bucket.trim(now, spec.window_ms)
            refused = bucket.refusal(spec, now)
            if refused is not None:
                return refused
            needed += kind.units - 1
        if self.units + needed > self._max_units:
            return UNAVAILABLE
        for charge, key, bucket in found:
            if bucket is None:
                self._add_bucket(charge, key, now, 1)
            else:
                self.units += bucket.add(now, charge.spec.window_ms)
        return ADMITTED

    def _add_bucket(self, charge: Charge, key: CounterId, now: int, times: int) -> None:
        """A new bucket for `charge` at `key` holding `times` ALLOWs at `now` (under the
        lock; the caller checked the units)."""
        window = charge.spec.window_ms
        kind = _Fixed if charge.spec.algorithm is Algorithm.FIXED else _Sliding
        new = self._buckets[key] = kind(now, window)
        self._windows[key] = window
        self.units += 1 + new.add(now, window, times)
        heapq.heappush(self._heap, (new.expiry(now, window), key))

    def top_up(self, charge: Charge, count: int) -> int:
        """Count up to `count` ALLOWs in `charge`'s bucket at once, as `count` one-charge
        items of `consume_sync` would (as many as fit, the rest refused; the units bound
        holds), in O(1) for a fixed window and one C-speed extend for a sliding one: `pdp
        test`'s `quota_used` (up to 100,000 per case) costs microseconds per case, where
        `count` items cost most of a second. Returns how many were counted (0 <= n <=
        count)."""
        if count <= 0:
            return 0
        spec = charge.spec
        sliding = spec.algorithm is not Algorithm.FIXED
        key = counter_id(charge)
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                room, spare = spec.limit, self._max_units - self.units - 1
            else:
                if isinstance(bucket, _Sliding):
                    self.units -= bucket.trim(now, spec.window_ms)
                room, spare = bucket.room(spec, now), self._max_units - self.units
            taken = min(count, room, spare) if sliding else (min(count, room) if spare >= 0 else 0)
            if taken <= 0:
                return 0
            if bucket is None:
                self._add_bucket(charge, key, now, taken)
            else:
                self.units += bucket.add(now, spec.window_ms, taken)
            return taken

    def _drop_expired(self, now: int) -> None:
        """Drop the buckets whose window has passed; re-file the ones that moved on (a
        sliding log with newer entries, a fixed bucket rolled to a later window)."""
        heap, buckets = self._heap, self._buckets
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            bucket = buckets[key]
            window = self._windows[key]
            if isinstance(bucket, _Sliding):
                self.units -= bucket.trim(now, window)
            expiry = bucket.expiry(now, window)
            if expiry > now:
                heapq.heappush(heap, (expiry, key))
                continue
            del buckets[key], self._windows[key]
            self.units -= 1

    # --- the lifecycle component ------------------------------------------------------------

    def start(self) -> None:
        """Nothing to start (no I/O, no thread)."""

    def stop(self, deadline: float) -> bool:
        """Nothing to stop: the counters live as long as the process. True."""
        self._stopped = True
        return True

    def status(self) -> ComponentStatus:
        detail = f"in-process (per process), {len(self._buckets)} buckets, {self.units} units"
        state = State.STOPPED if self._stopped else State.RUNNING
        return ComponentStatus(self.name, state, True, detail)
