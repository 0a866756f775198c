"""The in-process counters on a clock the test moves: window edges to the millisecond, the
memory bound, and exactness under threads (decide_sync may run from any thread)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from policy_engine.quota import UNAVAILABLE, InProcessQuotaStore, Verdict
from policy_engine.quota.memory import DEFAULT_MAX_UNITS
from tests.quota.support import FIXED, SLIDING, charge, spec

START = 1_780_000_000_000  # epoch ms, a multiple of 1000 (and of 10 s)


class Clock:
    """Epoch milliseconds the test sets."""

    def __init__(self, now: int = START) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def _store(clock: Clock, **options: int) -> InProcessQuotaStore:
    return InProcessQuotaStore(clock=clock, **options)


def test_fixed_windows_are_aligned_to_the_epoch_and_end_to_the_millisecond() -> None:
    clock = Clock(START + 4_000)  # 4 s into a 10 s window
    store = _store(clock)
    quota = spec(limit=2, window_ms=10_000, algorithm=FIXED)
    one = [charge(quota)]
    assert [v.admitted for v in store.consume_sync([one, one])] == [True, True]
    clock.now = START + 9_999  # the window's last millisecond
    refused = store.consume_sync([one])[0]
    assert refused == Verdict(False, quota, 1)
    clock.now = START + 10_000  # the next window
    assert [v.admitted for v in store.consume_sync([one, one, one])] == [True, True, False]
    clock.now = START + 12_500
    assert store.consume_sync([one])[0].retry_after_ms == 7_500


def test_a_sliding_window_frees_each_allow_one_window_after_it() -> None:
    clock = Clock()
    store = _store(clock)
    quota = spec(limit=2, window_ms=10_000, algorithm=SLIDING)
    one = [charge(quota)]
    assert store.consume_sync([one])[0].admitted  # at 0
    clock.now += 3_000
    assert store.consume_sync([one])[0].admitted  # at 3000
    clock.now += 1_000
    assert store.consume_sync([one])[0] == Verdict(False, quota, 6_000)  # 0 + 10000 - 4000
    clock.now = START + 9_999  # the first ALLOW is still inside
    assert store.consume_sync([one])[0] == Verdict(False, quota, 1)
    clock.now = START + 10_000  # it has left: room for one
    verdicts = store.consume_sync([one, one])
    assert verdicts == [Verdict(True), Verdict(False, quota, 3_000)]  # 3000 + 10000 - 10000
    # A fixed window would have freed everything at 10000; a sliding one holds 2 now.
    clock.now = START + 13_000
    assert store.consume_sync([one, one])[0].admitted


def test_a_lowered_sliding_limit_frees_when_enough_allows_leave() -> None:
    clock = Clock()
    store = _store(clock)
    wide, narrow = (
        spec(limit=4, algorithm=SLIDING, window_ms=10_000),
        spec(limit=2, algorithm=SLIDING, window_ms=10_000),
    )
    for step in range(4):  # ALLOWs at 0, 1000, 2000, 3000
        clock.now = START + 1_000 * step
        assert store.consume_sync([[charge(wide)]])[0].admitted
    clock.now = START + 5_000
    # Room for one more under limit 2 once three have left: the third (2000) leaves at 12000.
    assert store.consume_sync([[charge(narrow)]])[0] == Verdict(False, narrow, 7_000)


def test_expired_buckets_are_dropped_and_logs_trimmed() -> None:
    clock = Clock()
    store = _store(clock)
    fixed = spec("f", limit=5, window_ms=1_000, algorithm=FIXED)
    sliding = spec("s", limit=5, window_ms=1_000, algorithm=SLIDING)
    items = [[charge(fixed, f"b{i}"), charge(sliding, f"b{i}")] for i in range(1_000)]
    assert all(v.admitted for v in store.consume_sync(items))
    assert store.units == 3_000  # 1000 fixed buckets, 1000 logs of one entry each
    clock.now += 500
    assert store.consume_sync([[charge(sliding, "b0")]])[0].admitted
    assert store.units == 3_001
    clock.now += 500  # every fixed window ended; every log but b0's is a window old
    assert store.consume_sync([]) == []
    assert store.units == 2  # b0's log, with its one entry still inside
    clock.now += 500
    assert store.consume_sync([]) == [] and store.units == 0
    assert "0 buckets" in store.status().detail


def test_a_full_store_answers_unavailable_and_counts_nothing() -> None:
    clock = Clock()
    store = _store(clock, max_units=4)
    fixed = spec("f", limit=100, algorithm=FIXED)
    sliding = spec("s", limit=100, algorithm=SLIDING)
    assert all(v.admitted for v in store.consume_sync([[charge(fixed, "a")], [charge(fixed, "b")]]))
    # A new log needs two units (its bucket, its entry): with one fixed bucket too, five.
    both = [charge(fixed, "c"), charge(sliding, "c")]
    assert store.consume_sync([both]) == [UNAVAILABLE]
    assert store.units == 2  # the item counted nowhere
    # Existing fixed buckets need no more room: they still count.
    assert store.consume_sync([[charge(fixed, "a")]] * 3) == [Verdict(True)] * 3
    assert DEFAULT_MAX_UNITS >= 1_000_000


def test_a_clock_stepping_back_never_reopens_a_full_window() -> None:
    clock = Clock(START + 10_000)
    store = _store(clock)
    quota = spec(limit=1, window_ms=10_000, algorithm=FIXED)
    assert store.consume_sync([[charge(quota)]])[0].admitted
    clock.now = START + 9_000  # NTP stepped the wall clock back into the previous window
    assert store.consume_sync([[charge(quota)]])[0].exhausted == quota


def test_threads_together_get_exactly_the_limit() -> None:
    store = InProcessQuotaStore()  # the wall clock; the window is a month: no edge inside
    quota = spec(limit=50, algorithm=SLIDING)
    fixed = spec("f", limit=50)
    taken: list[int] = []
    start = threading.Barrier(8)

    def client() -> None:
        start.wait(10)
        count = 0
        for _ in range(40):
            verdicts = store.consume_sync([[charge(quota), charge(fixed)]] * 2)
            count += sum(1 for v in verdicts if v.admitted)
        taken.append(count)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(taken) == 8 and sum(taken) == 50


def _state(store: InProcessQuotaStore, probe: list[Any]) -> tuple[int, list[Verdict]]:
    """The units held and what each probe item gets next (which counts them too)."""
    return store.units, store.consume_sync(probe)


@pytest.mark.parametrize("algorithm", [FIXED, SLIDING])
@pytest.mark.parametrize(
    ("limit", "before", "count", "max_units"),
    [(5, 0, 3, 1000), (5, 0, 100_000, 1000), (5, 2, 4, 1000), (100, 0, 90, 40), (5, 5, 1, 1000)],
)
def test_top_up_counts_as_that_many_items_would(
    algorithm: object, limit: int, before: int, count: int, max_units: int
) -> None:
    """`top_up` (pdp test's quota_used) leaves the store as `count` one-charge items would:
    as many as fit counted, the rest refused, the units bound kept; a window later too."""
    quota = spec(limit=limit, window_ms=10_000, algorithm=algorithm)  # type: ignore[arg-type]
    other = spec("other", limit=1000)
    clocks, stores = [Clock(START + 1_000), Clock(START + 1_000)], []
    for clock in clocks:
        store = _store(clock, max_units=max_units)
        store.consume_sync([[charge(other, "x")]] * 3 + [[charge(quota)]] * before)
        stores.append(store)
    by_items, topped = stores
    admitted = sum(v.admitted for v in by_items.consume_sync([[charge(quota)]] * count))
    assert topped.top_up(charge(quota), count) == admitted
    probe: list[Any] = [[charge(quota)], [charge(other, "x")], [charge(other, "y")]]
    assert _state(topped, probe) == _state(by_items, probe)
    for clock in clocks:
        clock.now += 9_500  # the fixed window has passed; the sliding one still holds
    assert _state(topped, probe) == _state(by_items, probe)
    assert topped.top_up(charge(quota), 0) == 0
