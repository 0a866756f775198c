"""Helpers for the quota counter tests: specs, charges, stores on a test's redis-server, and
the worker that spawned processes run to hammer one quota together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from policy_engine.config import CacheSettings, QuotaSettings
from policy_engine.lifecycle import event_loop
from policy_engine.quota import Algorithm, Charge, QuotaSpec, QuotaStore, Verdict, WhenUnavailable
from policy_engine.quota.redis_store import RedisQuotaStore

FIXED, SLIDING = Algorithm.FIXED, Algorithm.SLIDING
MONTH_MS = 31 * 86_400_000  # the longest window: no window edge falls inside a test
BUCKET = "ab" * 32  # the shape of a bucket (hex SHA-256)


def spec(
    name: str = "q",
    limit: int = 3,
    window_ms: int = MONTH_MS,
    algorithm: Algorithm = FIXED,
    organization: str = "acme",
) -> QuotaSpec:
    return QuotaSpec(organization, name, limit, window_ms, algorithm, WhenUnavailable.DENY)


def charge(quota: QuotaSpec, bucket: str = BUCKET) -> Charge:
    return Charge(quota, bucket)


def redis_store(url: str, **cache: Any) -> RedisQuotaStore:
    """A Redis store at `url`; timeouts generous (CI boxes stall: faults are tested apart),
    the breaker as `cache` says (default: it never opens)."""
    quota_settings = QuotaSettings(redis_url=url, redis_timeout_ms=cache.pop("timeout_ms", 2000))
    values: dict[str, Any] = {"breaker_failure_threshold": 1_000_000, "breaker_reset_seconds": 0.2}
    values.update(cache)
    return RedisQuotaStore(quota_settings, CacheSettings(**values))


def consume(
    store: QuotaStore, items: Sequence[Sequence[Charge]], timeout: float = 10.0
) -> list[Verdict]:
    """`store.consume(items)` on the process's event loop, with a deadline `timeout` away."""
    return event_loop().call(store.consume(items, time.monotonic() + timeout), timeout + 5)


def admitted(verdicts: Sequence[Verdict]) -> int:
    return sum(1 for verdict in verdicts if verdict.admitted)


def hammer(
    url: str,
    quota: QuotaSpec,
    clients: int,
    calls: int,
    batch: int,
    ready: Any,
    results: Any,
) -> None:
    """A spawned process's work: its own RedisQuotaStore, `clients` asyncio clients each
    making `calls` calls of `batch` one-charge items, all against `quota`'s one bucket;
    starts once every process is `ready` (a Barrier), puts (admitted, unavailable, calls,
    round trips, per call the positions of its admitted items) on `results`."""
    store = redis_store(url)

    async def client() -> tuple[int, int, list[list[int]]]:
        taken = unavailable = 0
        positions: list[list[int]] = []
        for _ in range(calls):
            verdicts = await store.consume([[charge(quota)]] * batch, time.monotonic() + 20)
            taken += admitted(verdicts)
            unavailable += sum(1 for verdict in verdicts if verdict.unavailable)
            positions.append([i for i, verdict in enumerate(verdicts) if verdict.admitted])
        return taken, unavailable, positions

    async def everyone() -> list[tuple[int, int, list[list[int]]]]:
        return list(await asyncio.gather(*(client() for _ in range(clients))))

    ready.wait(60)
    outcome = event_loop().call(everyone(), 120)
    positions = [p for _, _, found in outcome for p in found]
    results.put(
        (
            sum(t for t, _, _ in outcome),
            sum(u for _, u, _ in outcome),
            clients * calls,
            store.round_trips,
            positions,
        )
    )
    store.stop(time.monotonic() + 5)
