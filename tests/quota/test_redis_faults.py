"""A Redis that cannot count (killed, frozen, breaker open, stopped store) or that holds
garbage where a counter should be: every item is unavailable, never admitted, never an
exception, and the call returns by its deadline. A real redis-server per test."""

from __future__ import annotations

import time

import pytest
import redis

from policy_engine.bench.redis_server import RedisServer, free_port
from policy_engine.cache.breaker import BreakerState
from policy_engine.lifecycle import State
from policy_engine.quota import UNAVAILABLE, Charge, Verdict
from policy_engine.quota import redis_store as redis_store_module
from policy_engine.quota.redis_store import counter_key
from tests.quota.support import FIXED, SLIDING, admitted, charge, consume, redis_store, spec

REDIS_TIMEOUT_MS = 3000  # far beyond the deadlines below: only the deadline can end a wait


def test_a_frozen_redis_makes_items_unavailable_by_the_deadline(
    redis_server: RedisServer,
) -> None:
    store = redis_store(redis_server.url, timeout_ms=REDIS_TIMEOUT_MS)
    quota = spec(limit=5)
    try:
        assert consume(store, [[charge(quota)]])[0].admitted  # connected, script loaded
        with redis_server.frozen():
            started = time.monotonic()
            verdicts = consume(store, [[charge(quota)], [], [charge(quota)]], timeout=0.2)
            waited = time.monotonic() - started
            assert verdicts == [UNAVAILABLE, Verdict(True), UNAVAILABLE]
            # Given up at the deadline, not at Redis's own timeout.
            assert waited < REDIS_TIMEOUT_MS / 1000 - 0.5, waited
        # The abandoned script may still have counted (fail closed), never past the limit.
        deadline = time.monotonic() + 10
        while not (verdicts := consume(store, [[charge(quota)]] * 5))[0].admitted:
            assert time.monotonic() < deadline, verdicts
        assert 1 <= admitted(verdicts) <= 4
        assert consume(store, [[charge(quota)]])[0].exhausted == quota
    finally:
        store.stop(time.monotonic() + 5)


def test_a_killed_redis_opens_the_breaker_and_a_restarted_one_counts_again(
    redis_server: RedisServer,
) -> None:
    store = redis_store(redis_server.url, breaker_failure_threshold=2, breaker_reset_seconds=0.3)
    quota = spec(limit=100, algorithm=SLIDING)
    try:
        assert consume(store, [[charge(quota)]])[0].admitted
        assert store.status().state is State.NEW
        redis_server.kill()
        for _ in range(2):
            assert consume(store, [[charge(quota)]] * 3) == [UNAVAILABLE] * 3
        assert store.breaker.state is BreakerState.OPEN
        status = store.status()
        assert status.state is State.DEGRADED and status.ready
        assert "breaker open" in status.detail
        round_trips = store.round_trips
        assert consume(store, [[charge(quota)]]) == [UNAVAILABLE]
        assert store.round_trips == round_trips  # an open breaker: not even tried
        redis_server.start()  # same port, empty
        deadline = time.monotonic() + 10
        while not consume(store, [[charge(quota)]])[0].admitted:
            assert time.monotonic() < deadline, "the breaker never let a probe through"
            time.sleep(0.05)
        assert store.breaker.state is BreakerState.CLOSED
    finally:
        store.stop(time.monotonic() + 5)


def test_a_stopped_store_counts_nothing(redis_server: RedisServer) -> None:
    store = redis_store(redis_server.url)
    store.start()
    assert store.status().state is State.RUNNING
    assert consume(store, [[charge(spec())]])[0].admitted
    assert store.stop(time.monotonic() + 5) and store.stop(time.monotonic() + 5)
    assert store.status().state is State.STOPPED
    assert consume(store, [[charge(spec())]]) == [UNAVAILABLE]


def test_no_redis_at_all_is_unavailable_not_an_exception() -> None:
    store = redis_store(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert consume(store, [[charge(spec())], []]) == [UNAVAILABLE, Verdict(True)]
    finally:
        store.stop(time.monotonic() + 5)


GARBAGE = ["abc", "-5", "1e3", "12.0", " 7", "9" * 16, ""]


@pytest.mark.parametrize("value", GARBAGE, ids=repr)
def test_garbage_at_a_fixed_counter_is_unavailable_and_counts_nothing_else(
    shared_redis: RedisServer, value: str
) -> None:
    admin = redis.Redis(port=shared_redis.port)
    bad, good = spec("bad", limit=10), spec("good", limit=10)
    bad_key, good_key = (
        counter_key("pdp:quota", charge(bad)),
        counter_key("pdp:quota", charge(good)),
    )
    assert bad_key and good_key
    admin.set(bad_key, value)
    store = redis_store(shared_redis.url)
    try:
        verdicts = consume(store, [[charge(good), charge(bad)], [charge(good)]])
    finally:
        store.stop(time.monotonic() + 5)
    assert verdicts == [UNAVAILABLE, Verdict(True)]
    assert admin.get(good_key) == b"1"  # the first item counted nowhere
    assert admin.get(bad_key) == value.encode()
    admin.close()


WRONG_TYPES = {
    "list": lambda admin, key: admin.lpush(key, "1"),
    "hash": lambda admin, key: admin.hset(key, "n", "1"),
    "set": lambda admin, key: admin.sadd(key, "1"),
    "zset": lambda admin, key: admin.zadd(key, {"1": 1}),
    "string": lambda admin, key: admin.set(key, "1"),
}


@pytest.mark.parametrize("algorithm", [FIXED, SLIDING])
@pytest.mark.parametrize("kind", list(WRONG_TYPES))
def test_a_wrong_type_at_a_counter_key_is_unavailable(
    shared_redis: RedisServer, algorithm: object, kind: str
) -> None:
    quota = spec(limit=10, algorithm=algorithm)  # type: ignore[arg-type]
    key = counter_key("pdp:quota", charge(quota))
    assert key
    native = "zset" if algorithm is SLIDING else "string"
    admin = redis.Redis(port=shared_redis.port)
    WRONG_TYPES[kind](admin, key)
    store = redis_store(shared_redis.url)
    try:
        verdict = consume(store, [[charge(quota)]])[0]
    finally:
        store.stop(time.monotonic() + 5)
    if kind == native:  # a counter of the right type is a count (fail closed: it counts)
        assert verdict.admitted
    else:
        assert verdict == UNAVAILABLE
    assert store.breaker.state is BreakerState.CLOSED  # Redis answered: not a Redis fault
    admin.close()


@pytest.mark.parametrize(
    ("offset_ms", "absolute"),
    [(10**12 + 0.5, None), (0.25, None), (0, float("inf")), (0, 1e300)],
    ids=["future-fractional", "now-fractional", "inf", "huge"],
)
def test_an_allow_dated_in_the_future_never_promises_a_wait_past_the_window(
    shared_redis: RedisServer, offset_ms: float, absolute: float | None
) -> None:
    quota = spec(limit=1, window_ms=5000, algorithm=SLIDING)
    key = counter_key("pdp:quota", charge(quota))
    assert key
    admin = redis.Redis(port=shared_redis.port)
    score = time.time() * 1000 + offset_ms if absolute is None else absolute
    admin.zadd(key, {"planted": score})
    store = redis_store(shared_redis.url)
    try:
        refused = consume(store, [[charge(quota)]])[0]
    finally:
        store.stop(time.monotonic() + 5)
    assert refused.exhausted == quota and 0 < refused.retry_after_ms <= 5000
    admin.close()


def test_a_script_that_stays_missing_is_unavailable(
    shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EVALSHA answered NOSCRIPT again after SCRIPT LOAD (a proxy that forgets scripts): one
    retry, then unavailable, no loop. Made real by a store whose script SHA names a script
    that SCRIPT LOAD never loads."""
    monkeypatch.setattr(redis_store_module, "SCRIPT_SHA", "0" * 40)
    store = redis_store(shared_redis.url)
    try:
        verdicts = consume(store, [[charge(spec())]])
    finally:
        store.stop(time.monotonic() + 5)
    assert verdicts == [UNAVAILABLE]
    assert store.round_trips == 2  # the call, then its one retry


def test_charges_that_cannot_make_a_key_are_unavailable(shared_redis: RedisServer) -> None:
    store = redis_store(shared_redis.url)
    ok = spec()
    other_org = spec(organization="globex")
    items: list[list[Charge]] = [
        [charge(spec(organization="a}b"))],  # would move the hash tag
        [charge(spec(organization=""))],
        [charge(ok, "has:colon")],  # would make keys ambiguous
        [charge(ok, "")],
        [charge(ok), charge(other_org)],  # one item is one organization's ALLOW
        [charge(ok)],
    ]
    try:
        verdicts = consume(store, items)
    finally:
        store.stop(time.monotonic() + 5)
    assert verdicts == [UNAVAILABLE] * 5 + [Verdict(True)]


@pytest.mark.parametrize("algorithm", [FIXED, SLIDING])
def test_a_counter_from_a_clock_ahead_keeps_its_expiry(
    shared_redis: RedisServer, algorithm: object
) -> None:
    """A counter written while Redis's clock was ahead (a stepped clock, a failover to a node
    whose clock is behind) expires at its own window's end, never sooner: an ALLOW counted
    now must not cut its life short, which would reset the quota within that window."""
    window_ms = 60_000
    quota = spec(limit=10, window_ms=window_ms, algorithm=algorithm)  # type: ignore[arg-type]
    key = counter_key("pdp:quota", charge(quota))
    assert key
    admin = redis.Redis(port=shared_redis.port)
    ahead = int(time.time() * 1000) + 10 * window_ms
    if algorithm is SLIDING:
        admin.zadd(key, {"ahead": ahead - window_ms})
    else:
        admin.set(key, "3")
    admin.pexpireat(key, ahead)
    store = redis_store(shared_redis.url)
    try:
        assert consume(store, [[charge(quota)]])[0].admitted
    finally:
        store.stop(time.monotonic() + 5)
    assert admin.pexpiretime(key) == ahead
    assert (admin.zcard(key) if algorithm is SLIDING else int(admin.get(key) or 0)) == (
        2 if algorithm is SLIDING else 4
    )
    if algorithm is FIXED:  # full now: it frees when that counter ends (at most a window)
        admin.set(key, "10", keepttl=True)
        store = redis_store(shared_redis.url)
        try:
            refused = consume(store, [[charge(quota)]])[0]
        finally:
            store.stop(time.monotonic() + 5)
        assert refused.exhausted == quota and refused.retry_after_ms == window_ms
    admin.close()


@pytest.mark.parametrize(
    "policy", ["allkeys-lru", "volatile-lru", "volatile-ttl", "allkeys-random"]
)
def test_a_redis_that_may_evict_counters_counts_nothing(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """An evicted counter starts again from zero mid-window (a caller filling a shared Redis
    with cache entries could reset quotas): while Redis has a maxmemory and may evict, items
    are unavailable and nothing is written; once it may not, counting resumes."""
    monkeypatch.setattr(redis_store_module, "EVICTION_CHECK_SECONDS", 0.0)
    admin = redis.Redis(port=redis_server.port)
    admin.config_set("maxmemory", "100mb")
    admin.config_set("maxmemory-policy", policy)
    store = redis_store(redis_server.url)
    quota = spec(limit=10)
    try:
        assert consume(store, [[charge(quota)], []]) == [UNAVAILABLE, Verdict(True)]
        assert admin.keys("pdp:quota:*") == []
        status = store.status()
        assert status.state is State.DEGRADED and status.ready
        assert f"maxmemory-policy {policy}" in status.detail
        assert store.breaker.state is BreakerState.CLOSED  # Redis answered: not a fault
        admin.config_set("maxmemory", "0")  # no limit: nothing is evicted
        assert consume(store, [[charge(quota)]])[0].admitted
        admin.config_set("maxmemory", "100mb")
        assert consume(store, [[charge(quota)]]) == [UNAVAILABLE]
        admin.config_set("maxmemory-policy", "noeviction")
        assert consume(store, [[charge(quota)]])[0].admitted
        assert store.status().state is State.NEW
    finally:
        store.stop(time.monotonic() + 5)
    admin.close()


def test_the_eviction_settings_are_read_once_per_interval(redis_server: RedisServer) -> None:
    """`INFO memory` is not on every call's path: once, then every EVICTION_CHECK_SECONDS."""
    admin = redis.Redis(port=redis_server.port)
    store = redis_store(redis_server.url)
    try:
        for _ in range(5):
            assert consume(store, [[charge(spec(limit=10))]])[0].admitted
    finally:
        store.stop(time.monotonic() + 5)
    assert int(admin.info("commandstats")["cmdstat_info"]["calls"]) == 1
    admin.close()


def test_eviction_risk_reads_every_cluster_node() -> None:
    safe = {"maxmemory": 0, "maxmemory_policy": "allkeys-lru"}
    risky = {"maxmemory": 1 << 30, "maxmemory_policy": "volatile-lfu"}
    assert redis_store_module.eviction_risk(safe) is None
    assert (
        redis_store_module.eviction_risk({"maxmemory": 5, "maxmemory_policy": "noeviction"}) is None
    )
    assert redis_store_module.eviction_risk(risky) == "maxmemory-policy volatile-lfu"
    nodes = {"127.0.0.1:7000": safe, "127.0.0.1:7001": risky}
    assert (
        redis_store_module.eviction_risk(nodes) == "maxmemory-policy volatile-lfu on 127.0.0.1:7001"
    )
    assert redis_store_module.eviction_risk({"used_memory": 1}) is None  # cannot tell
    assert redis_store_module.eviction_risk("garbage") is None


def test_a_redis_that_refuses_info_is_counted_in_and_said_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user without INFO (an ACL, a proxy) cannot be checked for eviction: the log says
    so once, and counting goes on (the Redis is the operator's to configure)."""
    admin = redis.Redis(port=redis_server.port)
    admin.acl_setuser(
        "counter", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-info"]
    )
    url = f"redis://counter:pw@127.0.0.1:{redis_server.port}/0"
    store = redis_store(url)
    quota = spec(limit=10)
    monkeypatch.setattr(redis_store_module, "EVICTION_CHECK_SECONDS", 0.0)
    try:
        with caplog.at_level("WARNING", logger="policy_engine.quota.redis_store"):
            assert [v.admitted for v in consume(store, [[charge(quota)]] * 3)] == [True] * 3
            assert consume(store, [[charge(quota)]])[0].admitted
        assert store.eviction is None and store.status().state is State.NEW
    finally:
        store.stop(time.monotonic() + 5)
    refused = [r for r in caplog.records if "refused INFO memory" in r.getMessage()]
    assert len(refused) == 1
    admin.close()
