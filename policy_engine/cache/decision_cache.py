"""The two-level decision cache: an in-process LRU in front of Redis shared by all replicas.

Reads go local first, then Redis (one GET for a Check, one MGET for a batch's local misses);
a Redis hit fills the local level. Writes go to the local level at once and to Redis through
the write-behind task (one pipeline per drained queue). Every Redis call passes the circuit
breaker first and reports its outcome to it.

Lookups are coroutines on the process's event loop (`policy_engine.lifecycle.event_loop()`),
where the Redis client lives. A caller's deadline bounds its wait for Redis: when it passes,
the lookup raises `DeadlinePassed` at once, while the Redis command itself runs on in its own
task until Redis answers or `redis_timeout_ms` passes, and reports to the breaker then. A
command is never cancelled for a caller's sake (see `redis_backend.py` for why), so a Redis
that hangs holds no call past its deadline and leaves no connection in a broken state.

Nothing in here may fail a request or change an answer: a Redis error, a timeout, a value it
cannot verify (forged, copied onto another key, signed by a key it does not hold, corrupt), an
entry past its expiry are all a miss, and the engine decides. The Redis level needs signing
keys (`signing.py`): `build_cache` reads them and refuses to build it without. The cache stores
only what the decision pipeline (`policy_engine.decision`) hands it; what may be cached is the
pipeline's call.

It is a lifecycle `Component` ("cache"): the constructor does no I/O and starts nothing;
`start()` starts the write-behind task on the process's loop; `stop(deadline)` writes what is
queued until the deadline, then closes the Redis connections; `status()` is DEGRADED while
the breaker keeps Redis off the path (still ready: an outage costs hits, not answers). A cache
that is never started still works (tests, tools): its first Redis write starts the task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from policy_engine.cache.breaker import BreakerState, CircuitBreaker
from policy_engine.cache.entry import Codec, Entry
from policy_engine.cache.key import NO_KEY_SETS, KeyBuilder
from policy_engine.cache.local import LocalLRU
from policy_engine.cache.redis_backend import DeadlinePassed, RedisBackend, bounded
from policy_engine.cache.signing import SigningKeys, load_signing_keys
from policy_engine.cache.writer import Write, WriteBehind
from policy_engine.config import CacheSettings, ConfigError
from policy_engine.lifecycle import ComponentStatus, State, event_loop
from policy_engine.metrics import BREAKER_STATE, CACHE_LOOKUPS, REDIS_ERRORS

if TYPE_CHECKING:
    from policy_engine.auth.keys import KeySource

log = logging.getLogger(__name__)

T = TypeVar("T")

# After the stop deadline: time for the cancelled writer and the connections to close.
_STOP_SLACK_SECONDS = 1.0


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
    """The two levels behind one facade, and the "cache" lifecycle component (see the module
    docstring). The Redis level is on when `keys` are given with a `redis_backend` (or a
    `settings.redis_url`); raises ConfigError when it is configured without `keys`
    (`build_cache` reads them)."""

    name = "cache"

    def __init__(
        self,
        settings: CacheSettings,
        *,
        fingerprint: bytes = b"",
        max_id_length: int = 256,
        keys: SigningKeys | None = None,
        redis_backend: RedisBackend | None = None,
    ) -> None:
        self.settings = settings
        self.keys_builder = KeyBuilder(settings.key_prefix, fingerprint, max_id_length)
        self._local_ttl = settings.local_ttl_seconds
        self._redis_ttl = settings.redis_ttl_seconds
        use_local = settings.local_max_entries > 0 and self._local_ttl > 0
        self.local: LocalLRU | None = LocalLRU(settings.local_max_entries) if use_local else None
        redis_on = redis_backend is not None or bool(settings.redis_url.strip())
        if redis_on and keys is None:
            raise ConfigError(
                "setting cache.redis_signing_key: the Redis level needs its signing keys "
                "(build_cache reads them from the settings)"
            )
        if redis_on and redis_backend is None:
            redis_backend = RedisBackend(settings)  # checks the settings; connects nothing
        self.redis = redis_backend
        self._codec = Codec(keys) if keys is not None and redis_on else None
        self._breaker_was_closed = True  # so only the first opening after a close warns
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold,
            settings.breaker_reset_seconds,
            on_change=self._breaker_changed,
        )
        self._writer = WriteBehind(self._write) if redis_backend is not None else None
        self._process_loop: asyncio.AbstractEventLoop | None = None  # see _loop
        self._started = False
        self._stopped = False
        self._stopped_clean = True
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

    async def get(self, key: str, now: float, deadline: float | None = None) -> Hit | None:
        """The entry under `key` valid at `now` (unix s), local level first; None on a miss
        or any Redis fault. `deadline` (`time.monotonic()` s, None: none) bounds the wait for
        Redis: past it, raises `DeadlinePassed`."""
        local = self.local
        if local is not None:
            entry = local.get(key, now)
            if entry is not None:
                self._local_hit.inc()
                return Hit(entry, CacheLevel.LOCAL)
            self._local_miss.inc()
        redis, codec = self.redis, self._codec  # both set, or neither (see __init__)
        if redis is None or codec is None or not self._redis_allowed():
            return None
        try:
            raw = await self._bounded("get", redis.get(key), deadline)
        except DeadlinePassed:
            raise
        except Exception as exc:
            self._failed("get", exc)
            return None
        self.breaker.success()
        if raw is None:
            self._lookups["redis", "miss"].inc()
            return None
        entry = codec.decode(key, raw)
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

    async def get_many(
        self, keys: Sequence[str | None], now: float, deadline: float | None = None
    ) -> list[Hit | None]:
        """One result per key, in order: local level per key, then one MGET for the rest
        (`deadline` as for `get`)."""
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
        redis, codec = self.redis, self._codec  # both set, or neither (see __init__)
        if not misses or redis is None or codec is None:
            return hits
        if not self._redis_allowed(len(misses)):
            return hits
        # Distinct, in order (misses hold no None key: the walrus only tells the type).
        wanted = list(dict.fromkeys(key for i in misses if (key := keys[i]) is not None))
        try:
            values = await self._bounded("mget", redis.mget(wanted), deadline)
        except DeadlinePassed:
            raise
        except Exception as exc:
            self._failed("mget", exc, len(misses))
            return hits
        self.breaker.success()
        by_key: dict[str | None, Entry] = {}  # read with keys[index]: never None there
        fills: list[tuple[str, Entry]] = []
        decode = codec.decode
        rejected: list[str] = []
        for key, raw in zip(wanted, values, strict=True):
            if raw is None:
                continue
            entry = decode(key, raw)
            if entry is None:
                rejected.append(key)
            elif entry.expires_at > now:
                by_key[key] = entry
                if local is not None:
                    expiry = min(entry.expires_at, now + self._local_ttl)
                    fills.append((key, entry.with_expiry(expiry)))
        redis_level = CacheLevel.REDIS
        found_count = 0
        for index in misses:
            entry = by_key.get(keys[index])
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
        if fills and local is not None:
            local.put_many(fills)
        return hits

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The process's event loop, where the Redis level lives (looked up once)."""
        loop = self._process_loop
        if loop is None:
            loop = self._process_loop = event_loop().loop
        return loop

    def _redis_allowed(self, lookups: int = 1) -> bool:
        """May these lookups go to Redis now? False (counted as skips) while the breaker is
        open or after `stop`. Raises RuntimeError off the process's event loop."""
        if asyncio.get_running_loop() is not self._loop():
            raise RuntimeError(
                "the decision cache's Redis level runs on the process's event loop "
                "(policy_engine.lifecycle.event_loop()); decide there (Decider.decide_sync)"
            )
        if self._stopped or not self.breaker.allow():
            self._lookups["redis", "skip"].inc(lookups)
            return False
        return True

    async def _bounded(
        self, operation: str, command: Coroutine[Any, Any, T], deadline: float | None
    ) -> T:
        """`command`'s result, waited for until `deadline` at most; raises DeadlinePassed
        then (see `redis_backend.bounded`: the command is never cancelled here, and one the
        caller stops waiting for reports to the breaker when it ends)."""
        return await bounded(operation, command, deadline, partial(self._late, operation))

    def _late(self, operation: str, exc: Exception | None) -> None:
        """A command nobody waits for any more ended: its outcome still tells the breaker
        whether Redis answers."""
        if exc is None:
            self.breaker.success()
        else:
            self._failed(operation, exc, lookups=0)

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
        local, writer, codec = self.local, self._writer, self._codec
        for store in stores:
            key, template, effect, code = store.key, store.template, store.effect, store.code
            valid_until = store.valid_until
            bound = math.inf if valid_until is None else valid_until - now
            if bound <= 0:
                continue  # the token's verdict flips now or already has
            if local is not None:
                expiry = now + min(self._local_ttl, bound)
                local_items.append((key, Entry(template, expiry, effect, code)))
            if writer is not None and codec is not None:  # both set with redis, or neither
                ttl = min(self._redis_ttl, bound)
                ttl_ms = int(ttl * 1000)
                if ttl_ms > 0:
                    entry = Entry(template, now + ttl, effect, code)
                    value = codec.encode(key, entry)
                    redis_items.append((key, value, ttl_ms))
        if local_items and local is not None:
            local.put_many(local_items)
        if (
            redis_items
            and writer is not None
            and self.breaker.state is BreakerState.CLOSED
            and not self._stopped
        ):
            if not writer.started:  # never started
                writer.start(self._loop())
            writer.submit(redis_items)

    async def _write(self, batch: list[Write]) -> None:
        """The write-behind task's sink: one pipeline, through the breaker."""
        if self.redis is None or not self.breaker.allow():
            return
        try:
            await self.redis.set_many(batch)
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
        if operation != "set" and lookups:
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
        """Wait up to `timeout` s for queued Redis writes (tests and benchmarks warming
        Redis); from any thread but the event loop's."""
        writer = self._writer
        if writer is None or not writer.started:
            return True
        return event_loop().call(writer.flush(timeout), timeout + _STOP_SLACK_SECONDS)

    def clear_local(self) -> None:
        if self.local is not None:
            self.local.clear()

    # --- the lifecycle component ------------------------------------------------------------

    def start(self) -> None:
        """Start the write-behind task on the process's event loop (no connection is made:
        the first command connects). Raises nothing; a second call is a no-op."""
        if self._writer is not None and not self._stopped:
            self._writer.start(self._loop())
        self._started = True

    def stop(self, deadline: float) -> bool:
        """Write what is queued until `deadline` (`time.monotonic()` s), then close the Redis
        connections; False when writes were left unwritten (counted in
        `pdp_cache_writes_dropped_total{reason="shutdown"}`). Lookups after it skip Redis.
        Safe to call twice or unstarted; from any thread but the event loop's."""
        if self._stopped:
            return self._stopped_clean
        self._stopped = True
        if self.redis is None:
            return True
        wait = max(0.0, deadline - time.monotonic()) + _STOP_SLACK_SECONDS
        try:
            self._stopped_clean = event_loop().call(self._stop(deadline), wait)
        except TimeoutError:
            log.error("decision cache: Redis connections still closing at the stop deadline")
            self._stopped_clean = False
        return self._stopped_clean

    async def _stop(self, deadline: float) -> bool:
        clean = True
        if self._writer is not None:
            clean = await self._writer.close(deadline)
            if not clean:
                log.warning("decision cache: Redis writes still queued at the stop were dropped")
        assert self.redis is not None
        await self.redis.aclose()
        return clean

    def status(self) -> ComponentStatus:
        """Never blocks. Always ready: without Redis the engine decides every miss."""
        levels = []
        if self.local is not None:
            levels.append(f"in-process {len(self.local)}/{self.settings.local_max_entries}")
        if self.redis is None:
            state = State.STOPPED if self._stopped else State.RUNNING
            return ComponentStatus(self.name, state, True, ", ".join(levels) or "off")
        levels.append(f"redis {self.redis.mode}")
        dropped = self._writer.dropped if self._writer is not None else 0
        detail = ", ".join(levels) + f"; {dropped} writes dropped"
        if self._stopped:
            return ComponentStatus(self.name, State.STOPPED, True, detail)
        degraded = self.breaker.degraded(self.name, detail, "deciding without Redis")
        if degraded is not None:
            return degraded
        running = self._started or (self._writer is not None and self._writer.started)
        return ComponentStatus(self.name, State.RUNNING if running else State.NEW, True, detail)


def build_cache(
    settings: CacheSettings, *, fingerprint: bytes = b"", max_id_length: int = 256
) -> DecisionCache | None:
    """The configured cache, or None when caching is off (`enabled: false`, or no level).

    Reads the Redis level's signing keys (files included) when it is configured: raises
    ConfigError naming the setting when they are missing or unusable, or when a Redis
    setting is malformed. Connects nothing and starts nothing."""
    if not settings.enabled:
        return None
    local = settings.local_max_entries > 0 and settings.local_ttl_seconds > 0
    redis_on = bool(settings.redis_url.strip())
    if not local and not redis_on:
        return None
    keys = load_signing_keys(settings) if redis_on else None  # checked before Redis is
    return DecisionCache(settings, fingerprint=fingerprint, max_id_length=max_id_length, keys=keys)
