"""The decision cache as a lifecycle component, against a real redis-server: a constructor
that touches nothing, start, stop by a deadline (with Redis answering, and frozen), status."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY

from policy_engine.bench.redis_server import RedisServer, free_port
from policy_engine.cache import DecisionCache, Store, build_cache
from policy_engine.lifecycle import Component, State, deadline_in, event_loop
from policy_engine.policy import CompiledPolicySet, load_policy_set
from tests.cache.support import admin, servicer_for, settings, tuple_request
from tests.server.harness import EXAMPLE_POLICIES

ALLOW = 1


@pytest.fixture(scope="module")
def policies() -> CompiledPolicySet:
    return load_policy_set(EXAMPLE_POLICIES)


def _cache(**cache: object) -> DecisionCache:
    built = build_cache(settings(**cache).cache)  # type: ignore[arg-type]
    assert isinstance(built, DecisionCache)
    return built


def _stores(count: int, prefix: str = "k") -> list[Store]:
    return [Store(f"{prefix}{i}", b"template", ALLOW, "") for i in range(count)]


def _clients(server: RedisServer) -> int:
    """Connections the redis-server has, besides the one asking."""
    client = admin(server)
    try:
        return len(client.client_list()) - 1
    finally:
        client.close()


def _dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("pdp_cache_writes_dropped_total", {"reason": reason}) or 0.0


def test_the_constructor_connects_nothing_and_starts_nothing(redis_server: RedisServer) -> None:
    before = _clients(redis_server)
    cache = _cache(redis_url=redis_server.url, redis_signing_key="5e1f" * 16)
    assert isinstance(cache, Component)
    assert _clients(redis_server) == before
    tasks = event_loop().call(_task_names())
    assert "pdp-cache-writer" not in tasks
    status = cache.status()
    assert (status.name, status.state, status.ready) == ("cache", State.NEW, True)
    cache.start()
    assert event_loop().call(_task_names()).count("pdp-cache-writer") == 1
    assert cache.status().state is State.RUNNING
    assert _clients(redis_server) == before  # started, still no connection: the first command
    assert cache.stop(deadline_in(5))


async def _task_names() -> list[str]:
    import asyncio

    return [task.get_name() for task in asyncio.all_tasks()]


def test_stop_writes_what_is_queued_then_closes_the_connections(
    redis_server: RedisServer,
) -> None:
    cache = _cache(redis_url=redis_server.url, redis_signing_key="5e1f" * 16)
    cache.start()
    cache.put_many(_stores(50), time.time())  # from this thread: queued, never waited for
    assert cache.stop(deadline_in(5))
    assert _clients(redis_server) == 0  # the pool is closed
    client = admin(redis_server)
    assert client.dbsize() == 50  # every queued write made it before the stop returned
    status = cache.status()
    assert (status.state, status.ready) == (State.STOPPED, True)
    assert cache.stop(deadline_in(5))  # again: a no-op with the same answer
    cache.put_many(_stores(5, "late"), time.time())  # after the stop: local level only
    assert client.dbsize() == 50


def test_stop_returns_by_its_deadline_when_redis_hangs(redis_server: RedisServer) -> None:
    cache = _cache(
        redis_url=redis_server.url, redis_signing_key="5e1f" * 16, redis_timeout_ms=60_000
    )
    cache.start()
    cache.put_many(_stores(1, "warm"), time.time())
    assert cache.flush(10)  # connected
    shutdown_before = _dropped("shutdown")
    with redis_server.frozen():
        cache.put_many(_stores(10), time.time())
        time.sleep(0.1)  # the writer sends them and waits for a reply that does not come
        started = time.monotonic()
        assert not cache.stop(deadline_in(0.3))  # writes left unwritten: said so
        elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed  # the deadline (plus slack), not the 60 s Redis timeout
    assert _dropped("shutdown") - shutdown_before == 10
    assert cache.status().state is State.STOPPED


def test_a_full_write_queue_drops_and_counts_without_blocking(redis_server: RedisServer) -> None:
    cache = _cache(
        redis_url=redis_server.url, redis_signing_key="5e1f" * 16, redis_timeout_ms=60_000
    )
    cache.start()
    cache.put_many(_stores(1, "warm"), time.time())
    assert cache.flush(10)
    full_before = _dropped("queue_full")
    with redis_server.frozen():
        cache.put_many(_stores(1, "stuck"), time.time())  # in flight, never answered
        time.sleep(0.1)
        writer = threading.Thread(
            target=lambda: [
                cache.put_many(_stores(1, f"w{i}-"), time.time()) for i in range(12_000)
            ]
        )
        writer.start()
        writer.join(30)  # a blocking queue would hang here until Redis comes back
        assert not writer.is_alive()
        dropped = _dropped("queue_full") - full_before
        assert dropped == 12_000 - 10_000  # the queue holds 10,000 writes; the rest dropped
        assert f"{int(dropped)} writes dropped" in cache.status().detail
        assert not cache.stop(deadline_in(0.2))


def test_status_is_degraded_while_the_breaker_is_open_and_still_ready(
    policies: CompiledPolicySet,
) -> None:
    config = settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        breaker_failure_threshold=1,
        breaker_reset_seconds=60,
    )
    servicer = servicer_for(policies, config)
    cache = servicer.cache
    try:
        assert cache.status().state is State.NEW
        servicer.decider.decide_sync([tuple_request()])  # the GET fails: the breaker opens
        status = cache.status()
        assert (status.state, status.ready) == (State.DEGRADED, True)
        assert "breaker open" in status.detail and "without Redis" in status.detail
    finally:
        servicer.close()  # a cache the decider built is stopped with it
    assert cache.status().state is State.STOPPED


def test_a_cache_passed_in_is_its_owners_to_stop(policies: CompiledPolicySet) -> None:
    cache = _cache()
    servicer = servicer_for(policies, settings(), cache=cache)
    servicer.decider.decide_sync([tuple_request()])
    servicer.close()
    assert cache.status().state is not State.STOPPED
    assert cache.stop(deadline_in(1))
