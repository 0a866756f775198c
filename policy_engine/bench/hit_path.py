"""The servicer alone, in process: µs per Check and per batch item, cached and uncached.

No gRPC and no threads: `servicer.Check(request, context)` called in a loop, as a profile of
the hit path sees it. The gap to the gRPC rows is what the gRPC stack costs; the gap between
the cached and uncached lines is what the cache saves (request conversion, the engine, the
response builder). Run it under cProfile to see where a hit's time goes:

    python -m cProfile -s tottime -m policy_engine.bench.hit_path
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _time(call: Callable[[], Any], seconds: float, repeats: int = 5) -> tuple[float, int]:
    loops, elapsed = 1, 0.0
    while elapsed < 0.02:
        loops *= 2
        start = time.perf_counter()
        for _ in range(loops):
            call()
        elapsed = time.perf_counter() - start
    loops = max(1, int(loops * (seconds / repeats) / elapsed))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            call()
        samples.append((time.perf_counter() - start) / loops * 1e6)
    return statistics.median(samples), loops * repeats


def measure(policy_dir: Path, seconds: float) -> list[HitPathResult]:
    """Each case for about `seconds / 4`; every cached case is checked to be a real hit."""
    from policy_engine.bench.workloads import BATCH_SIZE, allow_tuple, mixed_batch
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
    context: Any = None

    cached.Check(single, context)
    cached.CheckBatch(batch, context)
    if cached.Check(single, context).cache_level != pdp_pb2.CACHE_LEVEL_LOCAL:
        raise AssertionError("the cached Check case is not a local hit")
    warm = cached.CheckBatch(batch, context)
    if {r.cache_level for r in warm.results} != {pdp_pb2.CACHE_LEVEL_LOCAL}:
        raise AssertionError("the cached CheckBatch case is not all local hits")

    cases: Sequence[tuple[str, Callable[[], Any], int]] = (
        ("servicer.Check, local hit", lambda: cached.Check(single, context), 1),
        ("servicer.Check, uncached (cache off)", lambda: uncached.Check(single, context), 1),
        (
            f"servicer.CheckBatch {BATCH_SIZE}, local hits",
            lambda: cached.CheckBatch(batch, context),
            BATCH_SIZE,
        ),
        (
            f"servicer.CheckBatch {BATCH_SIZE}, uncached (cache off)",
            lambda: uncached.CheckBatch(batch, context),
            BATCH_SIZE,
        ),
    )
    results = []
    for name, call, items in cases:
        per_call, calls = _time(call, seconds / len(cases))
        results.append(HitPathResult(name, per_call, items, calls))
    cached.close()
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
