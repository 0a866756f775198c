"""Redis down, killed under load, restarted, or slow: answers stay correct and prompt.

A cache fault must cost speed, never correctness: zero failed RPCs, every answer equal to
what the engine decides without any cache, the breaker keeping a dead Redis off the request
path, and Redis used again once it is back.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer, free_port
from policy_engine.cache import BreakerState
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.service import PolicyDecisionServicer
from tests.cache.support import admin, answer, servicer_for, serving, settings, tuple_request
from tests.metrics import sample as _sample
from tests.server.harness import EXAMPLE_POLICIES

REDIS = pdp_pb2.CACHE_LEVEL_REDIS


def _tuples() -> list[pdp_pb2.CheckRequest]:
    """40 distinct tuples: allows and denies from every layer."""
    out = []
    for i in range(40):
        kind = i % 5
        if kind == 0:
            out.append(tuple_request(f"engineer-{i}"))
        elif kind == 1:
            out.append(tuple_request(f"engineer-{i}", scope="delete_repo"))
        elif kind == 2:
            out.append(tuple_request(f"engineer-{i}", integration="linear", scope="read"))
        elif kind == 3:
            out.append(tuple_request(f"sales-{i}", ["sales"]))
        else:
            out.append(tuple_request(f"engineer-{i}", integration="gitlab"))
    return out


TUPLES = _tuples()


@pytest.fixture(scope="module")
def policies() -> CompiledPolicySet:
    return load_policy_set(EXAMPLE_POLICIES)


@pytest.fixture(scope="module")
def expected(policies: CompiledPolicySet) -> list[tuple[Any, ...]]:
    """The uncached engine's answer for every tuple."""
    servicer = servicer_for(policies, settings(), cache=None)
    return [answer(servicer.decider.decide_sync([msg]).only()) for msg in TUPLES]


@dataclass
class Load:
    """Client threads calling Check and CheckBatch until stopped, checking every answer."""

    stub: pdp_pb2_grpc.PolicyDecisionServiceStub
    expected: list[tuple[Any, ...]]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    levels: list[tuple[float, int]] = field(default_factory=list)  # (when, cache level)
    slowest: float = 0.0

    def run(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set():
            indexes = [rnd.randrange(len(TUPLES)) for _ in range(rnd.choice((1, 1, 5)))]
            started = time.monotonic()
            try:
                if len(indexes) == 1:
                    results = [self.stub.Check(TUPLES[indexes[0]], timeout=10)]
                else:
                    batch = pdp_pb2.CheckBatchRequest(items=[TUPLES[i] for i in indexes])
                    results = list(self.stub.CheckBatch(batch, timeout=10).results)
            except grpc.RpcError as exc:
                with self.lock:
                    self.failures.append(f"{exc.code()}: {exc.details()}")
                continue
            elapsed = time.monotonic() - started
            with self.lock:
                self.calls += 1
                self.slowest = max(self.slowest, elapsed)
                for index, resp in zip(indexes, results, strict=True):
                    if answer(resp) != self.expected[index]:
                        self.wrong.append(f"tuple {index}: {resp}")
                    self.levels.append((time.monotonic(), resp.cache_level))

    def redis_hits_since(self, instant: float) -> int:
        with self.lock:
            return sum(1 for when, level in self.levels if when >= instant and level == REDIS)


def _start_load(load: Load, threads: int = 4) -> list[threading.Thread]:
    workers = [threading.Thread(target=load.run, args=(seed,)) for seed in range(threads)]
    for worker in workers:
        worker.start()
    return workers


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_redis_killed_under_load_and_restarted(
    policies: CompiledPolicySet, expected: list[tuple[Any, ...]], redis_server: RedisServer
) -> None:
    # Local level off, so every answer goes through Redis while it is there.
    config = settings(
        redis_server, local_max_entries=0, redis_timeout_ms=100, breaker_reset_seconds=0.3
    )
    servicer = servicer_for(policies, config)
    cache = servicer.cache
    assert cache is not None
    errors_before = sum(
        _sample("pdp_redis_errors_total", operation=op) for op in ("get", "mget", "set")
    )
    rejected_before = _sample("pdp_cache_lookups_total", level="redis", result="rejected")
    with serving(servicer, config) as stub:
        load = Load(stub, expected)
        workers = _start_load(load)
        try:
            _wait_for(lambda: load.redis_hits_since(0) > 50, 15, "Redis hits before the kill")
            redis_server.kill()  # SIGKILL under load
            _wait_for(lambda: cache.breaker.opened_count >= 1, 5, "the breaker to open")
            assert _sample("pdp_redis_breaker_open") == 1
            calls_at_kill = load.calls
            time.sleep(1.0)  # serving without Redis, the breaker probing every 0.3 s
            assert load.calls > calls_at_kill  # still answering
            redis_server.start()  # the same port, empty (no persistence)
            restarted = time.monotonic()
            _wait_for(lambda: load.redis_hits_since(restarted) > 20, 15, "Redis hits after restart")
        finally:
            load.stop.set()
            for worker in workers:
                worker.join(30)
    assert load.failures == []
    assert load.wrong == []
    assert load.calls > 100
    assert cache.breaker.state is BreakerState.CLOSED
    assert _sample("pdp_redis_breaker_open") == 0
    errors_after = sum(
        _sample("pdp_redis_errors_total", operation=op) for op in ("get", "mget", "set")
    )
    assert errors_after > errors_before
    # No connection from before the kill answered a command with another's reply (a value
    # read under the wrong key fails verification and would count as rejected).
    assert _sample("pdp_cache_lookups_total", level="redis", result="rejected") == rejected_before


def test_redis_down_from_the_start(
    policies: CompiledPolicySet, expected: list[tuple[Any, ...]]
) -> None:
    closed_port = free_port()  # nothing listens there
    config = settings(
        local_max_entries=0,
        redis_url=f"redis://127.0.0.1:{closed_port}/0",
        breaker_reset_seconds=30,
    )
    servicer = servicer_for(policies, config)
    assert servicer.cache is not None
    skips_before = _sample("pdp_cache_lookups_total", level="redis", result="skip")
    with serving(servicer, config) as stub:
        answers = [stub.Check(msg, timeout=10) for msg in TUPLES]
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=TUPLES), timeout=10)
    assert [answer(r) for r in answers] == expected
    assert [answer(r) for r in batch.results] == expected
    assert not any(r.cached for r in [*answers, *batch.results])
    assert servicer.cache.breaker.state is BreakerState.OPEN
    assert servicer.cache.breaker.opened_count == 1  # opened once, then Redis left alone
    skipped = _sample("pdp_cache_lookups_total", level="redis", result="skip") - skips_before
    assert skipped >= len(TUPLES) * 2 - 3


def test_a_slow_redis_costs_at_most_a_few_timeouts(
    policies: CompiledPolicySet, expected: list[tuple[Any, ...]], redis_server: RedisServer
) -> None:
    config = settings(
        redis_server,
        local_max_entries=0,
        redis_timeout_ms=50,
        breaker_failure_threshold=3,
        breaker_reset_seconds=0.5,
    )
    servicer: PolicyDecisionServicer = servicer_for(policies, config)
    cache = servicer.cache
    assert cache is not None
    with serving(servicer, config) as stub:
        for msg in TUPLES[:5]:
            stub.Check(msg, timeout=10)
        assert cache.flush()
        assert stub.Check(TUPLES[0], timeout=10).cache_level == REDIS
        admin(redis_server).execute_command("CLIENT", "PAUSE", "2500", "ALL")  # Redis hangs
        paused = time.monotonic()
        timings: list[float] = []
        answers: list[pdp_pb2.CheckResponse] = []
        for msg in TUPLES:
            started = time.monotonic()
            answers.append(stub.Check(msg, timeout=10))
            timings.append(time.monotonic() - started)
        started = time.monotonic()
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=TUPLES), timeout=10)
        batch_time = time.monotonic() - started
        assert time.monotonic() - paused < 2.0, "the test outlived the pause; timings invalid"
        assert cache.breaker.state is not BreakerState.CLOSED
        # Redis is back after the pause: a probe closes the breaker and hits resume.
        _wait_for(lambda: time.monotonic() - paused > 2.6, 5, "the pause to end")
        _wait_for(lambda: stub.Check(TUPLES[1], timeout=10).cache_level == REDIS, 5, "Redis hits")
    assert [answer(r) for r in answers] == expected
    assert [answer(r) for r in batch.results] == expected
    # At most `threshold` requests waited for a timeout (50 ms), then the breaker kept Redis
    # off the path: nothing hung for long, and the whole run took well under the pause.
    assert sorted(timings)[-4] < 0.04, sorted(timings)[-6:]
    assert max(timings) < 0.5
    assert sum(1 for t in timings if t > 0.04) <= 3
    assert batch_time < 0.5
    assert cache.breaker.state is BreakerState.CLOSED
