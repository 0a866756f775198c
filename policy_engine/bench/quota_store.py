"""What counting costs: microseconds per `RedisQuotaStore.consume()` against a throwaway local
redis-server, one call at a time (latency, one round trip each), for one item with one charge
and for a 100-item batch; the in-process store's for comparison.

    python -m policy_engine.bench.quota_store [--calls N]

The gRPC rows of `make bench` measure a quota check inside a decision; this isolates the
store. Every bucket is distinct per call so no quota fills (an exhausted quota costs the same
round trip, without the writes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from policy_engine.bench.redis_server import RedisServer
from policy_engine.config import CacheSettings, QuotaSettings
from policy_engine.lifecycle import event_loop
from policy_engine.quota import (
    Algorithm,
    Charge,
    InProcessQuotaStore,
    QuotaSpec,
    QuotaStore,
    WhenUnavailable,
)
from policy_engine.quota.redis_store import RedisQuotaStore

WINDOW_MS = 3_600_000


def _items(call: int, size: int, algorithm: Algorithm) -> list[list[Charge]]:
    quota = QuotaSpec("acme", "bench", 1_000, WINDOW_MS, algorithm, WhenUnavailable.DENY)
    return [[Charge(quota, f"{call:08x}{item:04x}")] for item in range(size)]


async def _run(
    store: QuotaStore, calls: int, size: int, algorithm: Algorithm
) -> tuple[float, float]:
    """Mean wall and CPU microseconds (every thread of this process: the client's share, not
    Redis's) per consume() of `size` items, over `calls` sequential calls."""
    batches: Sequence[list[list[Charge]]] = [_items(c, size, algorithm) for c in range(calls)]
    await store.consume(_items(calls, size, algorithm), None)  # connect, load the script
    started, cpu = time.perf_counter(), time.process_time()
    for items in batches:
        verdicts = await store.consume(items, None)
        if not all(v.admitted for v in verdicts):
            raise RuntimeError("the bench's quota refused or was unavailable")
    wall = (time.perf_counter() - started) / calls * 1e6
    return wall, (time.process_time() - cpu) / calls * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m policy_engine.bench.quota_store")
    parser.add_argument("--calls", type=int, default=2000, help="calls per row")
    args = parser.parse_args(argv)
    loop = event_loop()
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir)).start()
        try:
            redis_store = RedisQuotaStore(
                QuotaSettings(redis_url=server.url, redis_timeout_ms=1000), CacheSettings()
            )
            memory_store = InProcessQuotaStore()
            print("| store | algorithm | items per call | µs per consume() | client CPU µs |")
            print("| --- | --- | --- | --: | --: |")
            for name, store in (("redis", redis_store), ("in-process", memory_store)):
                for algorithm in (Algorithm.FIXED, Algorithm.SLIDING):
                    for size, calls in ((1, args.calls), (100, max(1, args.calls // 10))):
                        wall, cpu = loop.call(_run(store, calls, size, algorithm))
                        print(f"| {name} | {algorithm.value} | {size} | {wall:.0f} | {cpu:.0f} |")
            redis_store.stop(time.monotonic() + 5)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
