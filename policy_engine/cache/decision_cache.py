"""The two-level decision cache: an in-process LRU in front of Redis shared by all replicas.

Reads go local first, then Redis (one GET for a Check, one MGET for a batch's local misses);
a Redis hit fills the local level. Writes go to the local level at once and to Redis through
the write-behind thread (one pipeline per drained queue). Every Redis call passes the circuit
breaker first and reports its outcome to it.

Nothing in here may fail a request or change an answer: a Redis error, a timeout, a value it
cannot verify (forged, copied onto another key, signed by a key it does not hold, corrupt), an
entry past its expiry are all a miss, and the engine decides. The Redis level needs a signing
key (`signing.py`): without one it refuses to start. The cache stores only what the decision
pipeline (`policy_engine.decision`) hands it; what may be cached is the pipeline's call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from policy_engine.cache.breaker import BreakerState, CircuitBreaker
from policy_engine.cache.entry import Codec, Entry
from policy_engine.cache.key import NO_KEY_SETS, KeyBuilder
from policy_engine.cache.local import LocalLRU
from policy_engine.cache.redis_backend import RedisBackend
from policy_engine.cache.signing import load_signing_keys
from policy_engine.cache.writer import Write, WriteBehind
from policy_engine.config import CacheSettings
from policy_engine.metrics import BREAKER_STATE, CACHE_LOOKUPS, REDIS_ERRORS

if TYPE_CHECKING:
    from policy_engine.auth.keys import KeySource

log = logging.getLogger(__name__)


class CacheLevel(IntEnum):
    """Which level answered; the numbers are the API's `CacheLevel` values."""

    LOCAL = 1
    REDIS = 2


@dataclass(slots=True)
class Hit:
    """A lookup's answer: the entry, and the level it came from."""

    entry: Entry
    level: CacheLevel


@dataclass(slots=True)
class Store:
    """What the decision pipeline stores: the answer's template under `key`, with the proto
    effect number and first reason code a hit counts, and the instant (unix s) the answer
    stops being valid (a subject token's expiry), None when only the TTLs bound it."""

    key: str
    template: bytes
    effect: int
    code: str
    valid_until: float | None = None


_LOOKUP_RESULTS = {
    "local": ("hit", "miss", "skip"),
    # rejected: a value was there but failed verification (see entry.py), answered as a miss.
    "redis": ("hit", "miss", "rejected", "error", "skip"),
}


class DecisionCache:
    """The two levels behind one facade; raises ConfigError when the Redis level is configured
    without a usable signing key (see `signing.load_signing_keys`)."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        fingerprint: bytes = b"",
        max_id_length: int = 256,
        redis_backend: RedisBackend | None = None,
    ) -> None:
        self.settings = settings
        self.keys_builder = KeyBuilder(settings.key_prefix, fingerprint, max_id_length)
        self._local_ttl = settings.local_ttl_seconds
        self._redis_ttl = settings.redis_ttl_seconds
        use_local = settings.local_max_entries > 0 and self._local_ttl > 0
        self.local: LocalLRU | None = LocalLRU(settings.local_max_entries) if use_local else None
        # Checked before any connection is made: no key, no Redis level.
        redis_on = redis_backend is not None or bool(settings.redis_url.strip())
        keys = load_signing_keys(settings) if redis_on else None
        if redis_backend is None and keys is not None:
            redis_backend = RedisBackend(settings)
        self.redis = redis_backend
        self._codec = Codec(keys) if keys is not None else None
        self._breaker_was_closed = True  # so only the first opening after a close warns
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold,
            settings.breaker_reset_seconds,
            on_change=self._breaker_changed,
        )
        self._writer = WriteBehind(self._write) if redis_backend is not None else None
        self.pipelines = 0  # Redis write pipelines executed (for tests and diagnostics)
        # Labelled metric children, bound once: `labels()` is a dict lookup under a lock.
        self._lookups = {
            (level, result): CACHE_LOOKUPS.labels(level, result)
            for level, results in _LOOKUP_RESULTS.items()
            for result in results
        }
        self._local_hit = self._lookups["local", "hit"]
        self._local_miss = self._lookups["local", "miss"]
        self._local_skip = self._lookups["local", "skip"]
        self._redis_errors = {op: REDIS_ERRORS.labels(op) for op in ("get", "mget", "set")}
        BREAKER_STATE.set(0)

    # --- keys -------------------------------------------------------------------------------

    def key(
        self, msg: object, revision: str, key_sets: Mapping[str, KeySource] = NO_KEY_SETS
    ) -> str | None:
        """The request's key under `revision` and the current fingerprint of its
        organization's key set in `key_sets` (see `KeyBuilder.key`); None when it must
        bypass the cache."""
        return self.keys_builder.key(msg, revision, key_sets)

    def keys(
        self,
        msgs: Sequence[object],
        revision: str,
        key_sets: Mapping[str, KeySource] = NO_KEY_SETS,
    ) -> list[str | None]:
        """`key` for each request of a batch; None for explain requests too."""
        return self.keys_builder.keys(msgs, revision, key_sets)

    def skipped(self, count: int = 1) -> None:
        """Record requests that bypassed the cache (explain, or not cacheable by their shape)."""
        self._local_skip.inc(count)

    # --- reads ------------------------------------------------------------------------------

    def get(self, key: str, now: float) -> Hit | None:
        local = self.local
        if local is not None:
            entry = local.get(key, now)
            if entry is not None:
                self._local_hit.inc()
                return Hit(entry, CacheLevel.LOCAL)
            self._local_miss.inc()
        redis = self.redis
        if redis is None:
            return None
        if not self.breaker.allow():
            self._lookups["redis", "skip"].inc()
            return None
        try:
            raw = redis.get(key)
        except Exception as exc:
            self._failed("get", exc)
            return None
        self.breaker.success()
        if raw is None:
            self._lookups["redis", "miss"].inc()
            return None
        entry = self._codec.decode(key, raw)  # type: ignore[union-attr]  # set with redis
        if entry is None:
            self._rejected(1, [key])
            return None
        if entry.expires_at <= now:
            self._lookups["redis", "miss"].inc()
            return None
        self._lookups["redis", "hit"].inc()
        if local is not None:
            local.put(key, entry.with_expiry(min(entry.expires_at, now + self._local_ttl)))
        return Hit(entry, CacheLevel.REDIS)

    def get_many(self, keys: Sequence[str | None], now: float) -> list[Hit | None]:
        """One result per key, in order: local level per key, then one MGET for the rest."""
        count = len(keys)
        hits: list[Hit | None] = [None] * count
        local = self.local
        if local is not None:
            found = local.get_many(keys, now)
            local_level = CacheLevel.LOCAL
            hit_count = 0
            for index, entry in enumerate(found):
                if entry is not None:
                    hits[index] = Hit(entry, local_level)
                    hit_count += 1
            if hit_count:
                self._local_hit.inc(hit_count)
            misses = [i for i in range(count) if found[i] is None and keys[i] is not None]
            if misses:
                self._local_miss.inc(len(misses))
        else:
            misses = [i for i in range(count) if keys[i] is not None]
        redis = self.redis
        if not misses or redis is None:
            return hits
        if not self.breaker.allow():
            self._lookups["redis", "skip"].inc(len(misses))
            return hits
        wanted = list(dict.fromkeys(keys[i] for i in misses))  # distinct, in order
        try:
            values = redis.mget(wanted)  # type: ignore[arg-type]  # no None in `wanted`
        except Exception as exc:
            self._failed("mget", exc, len(misses))
            return hits
        self.breaker.success()
        by_key: dict[str, Entry] = {}
        fills: list[tuple[str, Entry]] = []
        decode = self._codec.decode  # type: ignore[union-attr]  # set with redis
        rejected: list[str] = []
        for key, raw in zip(wanted, values, strict=True):
            if raw is None:
                continue
            entry = decode(key, raw)  # type: ignore[arg-type]
            if entry is None:
                rejected.append(key)  # type: ignore[arg-type]
            elif entry.expires_at > now:
                by_key[key] = entry  # type: ignore[index]
                if local is not None:
                    expiry = min(entry.expires_at, now + self._local_ttl)
                    fills.append((key, entry.with_expiry(expiry)))  # type: ignore[arg-type]
        redis_level = CacheLevel.REDIS
        found_count = 0
        for index in misses:
            entry = by_key.get(keys[index])  # type: ignore[arg-type]
            if entry is not None:
                hits[index] = Hit(entry, redis_level)
                found_count += 1
        if found_count:
            self._lookups["redis", "hit"].inc(found_count)
        rejected_count = 0
        if rejected:
            bad = set(rejected)
            rejected_count = sum(1 for index in misses if keys[index] in bad)
            self._rejected(rejected_count, rejected)
        if found_count + rejected_count < len(misses):
            self._lookups["redis", "miss"].inc(len(misses) - found_count - rejected_count)
        if fills:
            local.put_many(fills)  # type: ignore[union-attr]
        return hits

    # --- writes -----------------------------------------------------------------------------

    def put(
        self,
        key: str,
        template: bytes,
        effect: int,
        code: str,
        now: float,
        valid_until: float | None = None,
    ) -> None:
        self.put_many([Store(key, template, effect, code, valid_until)], now)

    def put_many(self, stores: Sequence[Store], now: float) -> None:
        """Local entries at once; Redis entries queued as one job (one pipeline)."""
        local_items: list[tuple[str, Entry]] = []
        redis_items: list[Write] = []
        local, writer = self.local, self._writer
        for store in stores:
            key, template, effect, code = store.key, store.template, store.effect, store.code
            valid_until = store.valid_until
            bound = math.inf if valid_until is None else valid_until - now
            if bound <= 0:
                continue  # the token's verdict flips now or already has
            if local is not None:
                expiry = now + min(self._local_ttl, bound)
                local_items.append((key, Entry(template, expiry, effect, code)))
            if writer is not None:
                ttl = min(self._redis_ttl, bound)
                ttl_ms = int(ttl * 1000)
                if ttl_ms > 0:
                    entry = Entry(template, now + ttl, effect, code)
                    value = self._codec.encode(key, entry)  # type: ignore[union-attr]
                    redis_items.append((key, value, ttl_ms))
        if local_items:
            local.put_many(local_items)  # type: ignore[union-attr]
        if redis_items and self.breaker.state is BreakerState.CLOSED:
            writer.submit(redis_items)  # type: ignore[union-attr]

    def _write(self, batch: list[Write]) -> None:
        """The write-behind thread's sink: one pipeline, through the breaker."""
        if self.redis is None or not self.breaker.allow():
            return
        try:
            self.redis.set_many(batch)
        except Exception as exc:
            self._failed("set", exc)
            return
        self.pipelines += 1
        self.breaker.success()

    # --- faults, lifecycle ------------------------------------------------------------------

    def _rejected(self, lookups: int, keys: Sequence[str]) -> None:
        """Values that failed verification: during a key rotation, entries signed with a key
        not (yet, or no longer) held here; otherwise corruption or someone writing into Redis."""
        self._lookups["redis", "rejected"].inc(lookups)
        log.debug("redis values failed verification (answered as misses): %s", ", ".join(keys))

    def _failed(self, operation: str, exc: Exception, lookups: int = 1) -> None:
        self._redis_errors[operation].inc()
        if operation != "set":
            self._lookups["redis", "error"].inc(lookups)
        log.debug("redis %s failed: %s: %s", operation, type(exc).__name__, exc)
        self.breaker.failure()

    def _breaker_changed(self, state: BreakerState) -> None:
        """Gauge and log; a failed probe re-opening it is not news (logged at debug)."""
        BREAKER_STATE.set(0 if state is BreakerState.CLOSED else 1)
        if state is BreakerState.OPEN:
            log.log(
                logging.WARNING if self._breaker_was_closed else logging.DEBUG,
                "redis circuit breaker open: deciding without Redis, probing every %.1fs",
                self.settings.breaker_reset_seconds,
            )
            self._breaker_was_closed = False
        elif state is BreakerState.CLOSED:
            self._breaker_was_closed = True
            log.warning("redis circuit breaker closed: using Redis again")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait for queued Redis writes (tests and benchmarks warming Redis)."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def clear_local(self) -> None:
        if self.local is not None:
            self.local.clear()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.redis is not None:
            self.redis.close()


def build_cache(
    settings: CacheSettings, *, fingerprint: bytes = b"", max_id_length: int = 256
) -> DecisionCache | None:
    """The configured cache, or None when caching is off (`enabled: false`, or no level)."""
    if not settings.enabled:
        return None
    local = settings.local_max_entries > 0 and settings.local_ttl_seconds > 0
    if not local and not settings.redis_url.strip():
        return None
    return DecisionCache(settings, fingerprint=fingerprint, max_id_length=max_id_length)
