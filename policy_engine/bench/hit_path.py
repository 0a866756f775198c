"""The servicer alone, in process: µs per Check and per batch item, cached and uncached.

No gRPC: `servicer.Check(request, context)` called in a loop on one event loop (awaited when
the servicer's handlers are coroutines, as on the asyncio server), as a profile of the hit
path sees it. The gap to the gRPC rows is what the gRPC stack costs; the gap between the
cached and uncached lines is what the cache saves (request conversion, the engine, the
response builder). Run it under cProfile to see where a hit's time goes:

    python -m cProfile -s tottime -m policy_engine.bench.hit_path
"""

from __future__ import annotations

import asyncio
import inspect
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from policy_engine.api import pdp_pb2
from policy_engine.config import CacheSettings, Settings


@dataclass(frozen=True, slots=True)
class HitPathResult:
    name: str
    per_call_us: float  # median over repeats of the mean per call
    items: int  # decisions per call
    calls: int

    @property
    def per_decision_us(self) -> float:
        return self.per_call_us / self.items


class NoDeadline:
    """The context of a call without a deadline that is never aborted (the bench's requests
    are valid): what the servicer's handlers use of a gRPC context."""

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: object, details: str = "") -> NoReturn:
        raise AssertionError(f"the in-process bench call was aborted: {code} {details}")

    def abort_with_status(self, status: object) -> NoReturn:
        raise AssertionError(f"the in-process bench call was aborted: {status}")


async def _answer(value: Any) -> Any:
    """A handler's answer, awaited when the handler is a coroutine."""
    return (await value) if inspect.isawaitable(value) else value


async def _time(
    call: Callable[[], Awaitable[Any]], seconds: float, repeats: int = 5
) -> tuple[float, int]:
    """Median µs per `await call()` over `repeats` loops sized to take `seconds` in all, and
    the number of calls timed."""
    loops, elapsed = 1, 0.0
    while elapsed < 0.02:
        loops *= 2
        start = time.perf_counter()
        for _ in range(loops):
            await call()
        elapsed = time.perf_counter() - start
    loops = max(1, int(loops * (seconds / repeats) / elapsed))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            await call()
        samples.append((time.perf_counter() - start) / loops * 1e6)
    return statistics.median(samples), loops * repeats


def measure(policy_dir: Path, seconds: float) -> list[HitPathResult]:
    """Each case for about `seconds / 4`; every cached case is checked to be a real hit."""
    return asyncio.run(_measure(policy_dir, seconds))


async def _measure(policy_dir: Path, seconds: float) -> list[HitPathResult]:
    from policy_engine.bench.workloads import (
        BATCH_SIZE,
        IN_PROCESS_BATCH_HITS,
        IN_PROCESS_BATCH_UNCACHED,
        IN_PROCESS_HIT,
        IN_PROCESS_UNCACHED,
        allow_tuple,
        mixed_batch,
    )
    from policy_engine.policy import load_policy_set
    from policy_engine.server.service import PolicyDecisionServicer

    policies = load_policy_set(policy_dir)
    local = Settings(cache=CacheSettings(redis_url=""))
    cached = PolicyDecisionServicer(lambda: policies, local)
    uncached = PolicyDecisionServicer(lambda: policies, local, cache=None)
    single = allow_tuple()
    single.request_id = "bench-1"
    batch, _ = mixed_batch(BATCH_SIZE)
    for index, item in enumerate(batch.items):
        item.request_id = f"bench-{index}"
    context: Any = NoDeadline()

    await _answer(cached.Check(single, context))
    await _answer(cached.CheckBatch(batch, context))
    hit = await _answer(cached.Check(single, context))
    if hit.cache_level != pdp_pb2.CACHE_LEVEL_LOCAL:
        raise AssertionError("the cached Check case is not a local hit")
    warm = await _answer(cached.CheckBatch(batch, context))
    if {r.cache_level for r in warm.results} != {pdp_pb2.CACHE_LEVEL_LOCAL}:
        raise AssertionError("the cached CheckBatch case is not all local hits")

    cases: Sequence[tuple[str, Callable[[], Awaitable[Any]], int]] = (
        (IN_PROCESS_HIT, lambda: _answer(cached.Check(single, context)), 1),
        (IN_PROCESS_UNCACHED, lambda: _answer(uncached.Check(single, context)), 1),
        (IN_PROCESS_BATCH_HITS, lambda: _answer(cached.CheckBatch(batch, context)), BATCH_SIZE),
        (
            IN_PROCESS_BATCH_UNCACHED,
            lambda: _answer(uncached.CheckBatch(batch, context)),
            BATCH_SIZE,
        ),
    )
    results = []
    for name, call, items in cases:
        per_call, calls = await _time(call, seconds / len(cases))
        results.append(HitPathResult(name, per_call, items, calls))
    cached.close()
    uncached.close()
    return results


def hit_path_table(results: Sequence[HitPathResult]) -> str:
    lines = [
        "| in-process servicer (no gRPC) | µs per call | µs per decision | decisions/s per core |",
        "|---|--:|--:|--:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.per_call_us:.1f} | {r.per_decision_us:.2f} | "
            f"{1e6 / r.per_decision_us:,.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    from policy_engine.bench.cli import REPO

    print(hit_path_table(measure(REPO / "policies", 4.0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
