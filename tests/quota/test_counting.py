"""What both counter stores answer alike, on the real clock: an item is counted in all its
charges or in none, items in order, and `retry_after_ms` is when the quota frees (windows of
2 s, slept past: no assertion on speed)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import redis

from policy_engine.bench.redis_server import RedisServer
from policy_engine.quota import InProcessQuotaStore, QuotaStore, Verdict
from policy_engine.quota.redis_store import counter_key
from tests.quota.support import FIXED, SLIDING, charge, consume, redis_store, spec

WINDOW_MS = 2000


@pytest.fixture(params=["in-process", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[QuotaStore]:
    if request.param == "in-process":
        yield InProcessQuotaStore()
        return
    server: RedisServer = request.getfixturevalue("shared_redis")
    made = redis_store(server.url)
    try:
        yield made
    finally:
        made.stop(time.monotonic() + 5)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_an_item_whose_other_charge_is_full_is_counted_nowhere(store: QuotaStore) -> None:
    roomy, tight = spec("roomy", limit=10), spec("tight", limit=1)
    assert consume(store, [[charge(tight)]])[0].admitted
    both = [charge(roomy), charge(tight)]
    verdicts = consume(store, [both, both, [charge(roomy)]])
    assert [v.exhausted for v in verdicts[:2]] == [tight, tight]
    assert not any(v.admitted or v.unavailable for v in verdicts[:2])
    assert verdicts[0].retry_after_ms > 0
    # roomy counted only the last item: 9 more fit, the 10th does not.
    rest = consume(store, [[charge(roomy)]] * 10)
    assert [v.admitted for v in rest] == [True] * 9 + [False]
    assert rest[-1].exhausted == roomy


def test_items_are_counted_in_order_and_buckets_apart(store: QuotaStore) -> None:
    quota = spec(limit=2, algorithm=SLIDING)
    mine, yours = charge(quota, "a1"), charge(quota, "b2")
    verdicts = consume(store, [[mine], [yours], [mine], [mine], [], [yours], [mine, mine]])
    assert [v.admitted for v in verdicts] == [True, True, True, False, True, True, False]
    # The same charge twice in one item is counted once (and checked once).
    again = consume(store, [[charge(quota, "c3"), charge(quota, "c3")], [charge(quota, "c3")]])
    assert [v.admitted for v in again] == [True, True]


def test_an_item_without_charges_is_admitted_and_an_empty_call_is_empty(
    store: QuotaStore,
) -> None:
    assert consume(store, []) == []
    assert consume(store, [[]]) == [Verdict(True)]


def test_fixed_window_retry_after_is_the_window_end(store: QuotaStore) -> None:
    quota = spec(limit=2, window_ms=WINDOW_MS, algorithm=FIXED)
    while True:
        # Start early in a window, so that both ALLOWs and the refusal share one.
        before = _now_ms()
        if before % WINDOW_MS < WINDOW_MS // 2:
            break
        time.sleep((WINDOW_MS - before % WINDOW_MS) / 1000)
    taken = consume(store, [[charge(quota)]] * 3)
    after = _now_ms()
    assert [v.admitted for v in taken] == [True, True, False]
    retry = taken[2].retry_after_ms
    assert 0 < retry <= WINDOW_MS
    # now + retry is a window edge: a multiple of the window since the epoch.
    edge = math.ceil((before + retry) / WINDOW_MS) * WINDOW_MS
    assert before + retry <= edge <= after + retry
    time.sleep(retry / 1000 + 0.05)
    freed = consume(store, [[charge(quota)]] * 3)
    assert [v.admitted for v in freed] == [True, True, False]


def test_sliding_window_retry_after_is_when_the_oldest_allow_leaves(store: QuotaStore) -> None:
    quota = spec(limit=2, window_ms=WINDOW_MS, algorithm=SLIDING)
    assert consume(store, [[charge(quota)]])[0].admitted
    time.sleep(0.5)
    assert consume(store, [[charge(quota)]])[0].admitted
    refused = consume(store, [[charge(quota)]])[0]
    assert refused.exhausted == quota
    # The oldest ALLOW is at least 500 ms old: it leaves in at most 1500 ms (+1: rounding).
    assert 0 < refused.retry_after_ms <= WINDOW_MS - 500 + 1
    time.sleep(refused.retry_after_ms / 1000 + 0.05)
    # One ALLOW has left: one fits, then the second's departure is what is waited for.
    freed = consume(store, [[charge(quota)]] * 2)
    assert freed[0].admitted and freed[1].exhausted == quota
    assert 0 < freed[1].retry_after_ms <= WINDOW_MS


def test_a_lowered_limit_keeps_the_counters(store: QuotaStore) -> None:
    wide, narrow = spec(limit=5, algorithm=SLIDING), spec(limit=2, algorithm=SLIDING)
    assert all(v.admitted for v in consume(store, [[charge(wide)]] * 4))
    refused = consume(store, [[charge(narrow)]])[0]
    assert refused.exhausted == narrow and refused.retry_after_ms > 0
    fixed_wide, fixed_narrow = spec("f", limit=5), spec("f", limit=2)
    assert all(v.admitted for v in consume(store, [[charge(fixed_wide)]] * 3))
    assert consume(store, [[charge(fixed_narrow)]])[0].exhausted == fixed_narrow


def test_the_redis_keys_name_organization_quota_window_and_bucket(
    shared_redis: RedisServer,
) -> None:
    store = redis_store(shared_redis.url)
    quotas = [spec("q", window_ms=60_000), spec("q:x", window_ms=60_000, algorithm=SLIDING)]
    try:
        assert all(v.admitted for v in consume(store, [[charge(q)] for q in quotas]))
    finally:
        store.stop(time.monotonic() + 5)
    admin = redis.Redis(port=shared_redis.port)
    keys = sorted(k.decode() for k in admin.keys("*"))
    assert keys == [
        f"pdp:quota:{{acme}}:q:60000f:{'ab' * 32}",
        f"pdp:quota:{{acme}}:q:x:60000s:{'ab' * 32}",
    ]
    assert keys == sorted(counter_key("pdp:quota", charge(q)) for q in quotas)  # type: ignore[type-var]
    # Each expires: the fixed counter at its window's end, the log a window after its newest.
    assert all(0 < admin.pttl(k) <= 60_000 for k in keys)
    admin.close()
