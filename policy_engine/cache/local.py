"""The in-process level: a bounded, thread-safe LRU with per-entry expiry.

An `OrderedDict` under one lock: every operation is O(1) (C-level dict plus linked list), and
the lock is held for a few hundred nanoseconds, so gRPC handler threads barely contend for it.
A batch takes the lock once for all its keys. Expired entries are dropped when met; the entry
bound evicts the least recently used ones, so memory stays bounded whatever the traffic.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from policy_engine.cache.entry import Entry


class LocalLRU:
    __slots__ = ("_data", "_lock", "_max")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max = max_entries
        self._data: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, now: float) -> Entry | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry.expires_at <= now:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return entry

    def get_many(self, keys: Sequence[str | None], now: float) -> list[Entry | None]:
        """One lookup per key (None keys give None), under a single lock acquisition."""
        data = self._data
        found: list[Entry | None] = []
        append = found.append
        with self._lock:
            get, touch = data.get, data.move_to_end
            for key in keys:
                if key is None:
                    append(None)
                    continue
                entry = get(key)
                if entry is not None:
                    if entry.expires_at <= now:
                        del data[key]
                        entry = None
                    else:
                        touch(key)
                append(entry)
        return found

    def put(self, key: str, entry: Entry) -> None:
        with self._lock:
            self._data[key] = entry
            self._data.move_to_end(key)
            if len(self._data) > self._max:
                self._data.popitem(last=False)

    def put_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        data = self._data
        with self._lock:
            for key, entry in items:
                data[key] = entry
                data.move_to_end(key)
            while len(data) > self._max:
                data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
