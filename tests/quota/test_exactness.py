"""Quotas hold exactly across processes: 2 real processes (multiprocessing spawn), each with
its own RedisQuotaStore, 8 asyncio clients each, hammer one bucket of a limit-50 quota on a
real redis-server: exactly 50 ALLOWs are counted in the window, never more, whether the
calls carry one item or batches of 20; a batch is one EVALSHA (Redis' `INFO commandstats`).
"""

from __future__ import annotations

import multiprocessing

import pytest
import redis

from policy_engine.bench.redis_server import RedisServer
from policy_engine.quota.redis_store import SCRIPT, counter_key
from tests.quota.support import FIXED, SLIDING, charge, hammer, spec

PROCESSES, CLIENTS, LIMIT = 2, 8, 50


def _command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@pytest.mark.parametrize("algorithm", [FIXED, SLIDING])
@pytest.mark.parametrize(("calls", "batch"), [(10, 1), (3, 20)], ids=["single", "batch20"])
def test_two_processes_of_eight_clients_get_exactly_the_limit(
    shared_redis: RedisServer, algorithm: object, calls: int, batch: int
) -> None:
    quota = spec(limit=LIMIT, algorithm=algorithm)  # type: ignore[arg-type]
    admin = redis.Redis(port=shared_redis.port, socket_timeout=5)
    admin.script_load(SCRIPT)  # so every call below is exactly one EVALSHA
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(PROCESSES), context.Queue()
    args = (shared_redis.url, quota, CLIENTS, calls, batch, ready, results)
    workers = [context.Process(target=hammer, args=args) for _ in range(PROCESSES)]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=180) for _ in workers]
    finally:
        for worker in workers:
            worker.join(30)
    assert all(worker.exitcode == 0 for worker in workers)
    demand = PROCESSES * CLIENTS * calls * batch
    assert demand > LIMIT
    assert sum(outcome[0] for outcome in outcomes) == LIMIT  # exactly, never more
    assert sum(outcome[1] for outcome in outcomes) == 0  # Redis answered every call
    # One round trip per call: one pipeline, one EVALSHA, whatever the batch size.
    call_count = sum(outcome[2] for outcome in outcomes)
    assert sum(outcome[3] for outcome in outcomes) == call_count
    assert _command_calls(admin)["evalsha"] == call_count
    # Items are counted in order: what a batch got is its first items.
    for outcome in outcomes:
        for positions in outcome[4]:
            assert positions == list(range(len(positions)))
    key = counter_key("pdp:quota", charge(quota))
    assert key is not None
    held = admin.zcard(key) if algorithm is SLIDING else int(admin.get(key))  # type: ignore[arg-type]
    assert held == LIMIT
    admin.close()
