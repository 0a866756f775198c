"""The decision pipeline on its own (no gRPC), with real caches and a real redis-server.

A batch of one answers as `Check` does; a hit and a decision are told apart by their type; a
cache that fails in the middle of a batch costs evaluations, never answers; every observer
(the real audit log included) sees each outcome exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from policy_engine.api import pdp_pb2
from policy_engine.audit import AuditLog
from policy_engine.bench.redis_server import RedisServer
from policy_engine.cache import CacheLevel, DecisionCache, Entry
from policy_engine.config import AuditSettings
from policy_engine.decision import (
    CacheHit,
    Decided,
    Decider,
    Decisions,
    Invalid,
    ServerError,
)
from policy_engine.domain.codes import ErrorCode
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.service import PolicyDecisionServicer, build_decider
from policy_engine.store.store import NoPolicyLoaded
from tests.audit.support import read_records
from tests.cache.support import BASE, answer, serving, settings, tuple_request
from tests.metrics import sample as _sample
from tests.server.harness import EXAMPLE_POLICIES

TUPLES = [
    tuple_request(),  # allow
    tuple_request(scope="delete_repo"),  # org rule
    tuple_request(scope="admin:org"),  # user rule
    tuple_request(integration="linear", scope="read"),  # application layer
    tuple_request("bob", ["sales"]),  # org default
    tuple_request(integration="gitlab"),  # not in the catalog
    tuple_request(organization="initech"),  # unknown organization
]


class Seen:
    """An observer keeping what it is handed (a real one: the audit and metrics are others)."""

    def __init__(self) -> None:
        self.calls: list[Decisions] = []

    def admit(self, count: int, deadline: float | None) -> None:
        return None

    def observe(self, decisions: Decisions) -> None:
        self.calls.append(decisions)


@pytest.fixture(scope="module")
def policies() -> CompiledPolicySet:
    return load_policy_set(EXAMPLE_POLICIES)


@pytest.fixture(scope="module")
def uncached(policies: CompiledPolicySet) -> list[tuple[object, ...]]:
    """Each tuple's answer from a pipeline without a cache."""
    decider = build_decider(lambda: policies, BASE, cache=None)
    return [answer(decider.decide_sync([msg]).only()) for msg in TUPLES]


def _decisions_counted() -> float:
    """pdp_decisions_total over every effect and code."""
    codes = ("", *(code.value for code in ErrorCode))
    return sum(
        _sample("pdp_decisions_total", effect=effect, code=code)
        for effect in ("ALLOW", "DENY")
        for code in codes
    )


@pytest.mark.parametrize("levels", ["none", "local", "local+redis"])
def test_a_batch_of_one_answers_as_check_and_as_a_batch_item(
    policies: CompiledPolicySet,
    uncached: list[tuple[object, ...]],
    shared_redis: RedisServer,
    levels: str,
) -> None:
    config = {
        "none": settings(enabled=False),
        "local": settings(),
        "local+redis": settings(shared_redis),
    }[levels]
    servicer = PolicyDecisionServicer(lambda: policies, config)
    decider = servicer.decider
    try:
        singles = [decider.decide_sync([msg]).only() for msg in TUPLES]
        batch = decider.decide_sync(TUPLES).batch()
        with serving(servicer, config) as stub:
            checks = [stub.Check(msg, timeout=10) for msg in TUPLES]
            batch_of_one = [
                stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[msg]), timeout=10).results[0]
                for msg in TUPLES
            ]
    finally:
        decider.close()
    for answers in (singles, list(batch.results), checks, batch_of_one):
        assert [answer(r) for r in answers] == uncached
    for resp in (*singles, *batch.results, *checks, *batch_of_one):
        assert len(resp.decision_id) == 32
    if levels != "none":  # the first answers were decided, every later one a hit
        assert not any(r.cached for r in singles)
        assert {r.cache_level for r in (*batch.results, *checks, *batch_of_one)} == {
            pdp_pb2.CACHE_LEVEL_LOCAL
        }


def test_a_hit_and_a_decision_are_told_apart_by_type(policies: CompiledPolicySet) -> None:
    seen = Seen()
    decider = Decider(lambda: policies, settings(), observers=[seen])
    allow, explain = tuple_request(), tuple_request(explain=True)
    invalid = tuple_request(scope="has space")

    first = decider.decide_sync([allow, invalid, explain])
    decided, refused, explained = first.outcomes
    assert type(decided) is Decided and decided.stored
    assert decided.request.organization == "acme" and decided.decision.revision
    assert type(refused) is Invalid and not isinstance(refused, Decided)
    assert refused.violations and refused.violations[0][0] == "scope"
    assert type(explained) is Decided and not explained.stored  # the trace needs the engine
    assert first.batch().results[2].HasField("explain")
    assert first.level == "none"

    second = decider.decide_sync([allow, explain])
    hit, explained_again = second.outcomes
    assert type(hit) is CacheHit and not isinstance(hit, Decided)
    assert hit.level is CacheLevel.LOCAL and hit.key and hit.template
    assert (hit.effect, hit.code) == (decided.effect, decided.code)
    assert type(explained_again) is Decided
    assert second.level == "mixed"
    assert decider.decide_sync([allow]).level == "local"

    def no_policy_set() -> CompiledPolicySet:
        raise NoPolicyLoaded("none loaded yet")

    decider.source = no_policy_set
    (failed,) = decider.decide_sync([allow]).outcomes
    assert type(failed) is ServerError and failed.request is None
    assert failed.code == "kontext_server_error"
    assert [len(d.outcomes) for d in seen.calls] == [3, 2, 1, 1]  # one call per decide
    for decisions in seen.calls:  # each answer carries its outcome's decision ID
        answers = decisions.batch().results
        ids = [r.decision_id.encode() for r in answers]
        assert ids == [o.decision_id for o in decisions.outcomes]


def test_redis_failing_mid_batch_costs_evaluations_not_answers(
    policies: CompiledPolicySet, uncached: list[tuple[object, ...]], redis_server: RedisServer
) -> None:
    config = settings(redis_server, breaker_failure_threshold=100)
    decider = build_decider(lambda: policies, config)
    cache = decider.cache
    assert isinstance(cache, DecisionCache)
    half = len(TUPLES) // 2
    try:
        decider.decide_sync(TUPLES[:half])  # stored in both levels
        assert cache.flush()
        redis_server.kill()
        errors = _sample("pdp_redis_errors_total", operation="mget")
        mixed = decider.decide_sync(TUPLES)  # local hits, then the MGET for the rest fails
        assert _sample("pdp_redis_errors_total", operation="mget") == errors + 1
        types = [type(o) for o in mixed.outcomes]
        assert types == [CacheHit] * half + [Decided] * (len(TUPLES) - half)
        assert mixed.level == "mixed"
        assert [answer(r) for r in mixed.batch().results] == uncached

        cache.clear_local()  # nothing local, Redis gone: every item evaluated
        evaluated = decider.decide_sync(TUPLES)
        assert all(type(o) is Decided for o in evaluated.outcomes)
        assert [answer(r) for r in evaluated.batch().results] == uncached
    finally:
        decider.close()


def test_a_corrupt_entry_mid_batch_is_decided_anew_and_replaced(
    policies: CompiledPolicySet, uncached: list[tuple[object, ...]]
) -> None:
    decider = build_decider(lambda: policies, settings())
    cache = decider.cache
    assert isinstance(cache, DecisionCache) and cache.local is not None
    decider.decide_sync(TUPLES)
    key = cache.key(TUPLES[1], policies.revision)
    assert key is not None
    cache.local.put(key, Entry(b"\xff\xff\xff", time.time() + 60, pdp_pb2.EFFECT_ALLOW, ""))
    anew = decider.decide_sync(TUPLES)
    assert all(type(o) is Decided for o in anew.outcomes)
    assert [answer(r) for r in anew.batch().results] == uncached
    repaired = decider.decide_sync(TUPLES)  # the corrupt entry was overwritten by a good one
    assert all(type(o) is CacheHit for o in repaired.outcomes)
    assert [answer(r) for r in repaired.batch().results] == uncached


def test_observers_see_each_outcome_exactly_once(
    policies: CompiledPolicySet, tmp_path: Path
) -> None:
    audit_file = tmp_path / "audit.jsonl"
    audit = AuditLog(AuditSettings(enabled=True, sinks="file", file_path=audit_file))
    audit.start()
    config = settings()
    decider = build_decider(lambda: policies, config, audit=audit)
    seen = Seen()
    decider.observers.append(seen)
    counted_before = _decisions_counted()
    batches = [
        [tuple_request(request_id="one")],
        [tuple_request(request_id=f"b{i}", scope=s) for i, s in enumerate(["repo", "x y", "a"])],
        [
            tuple_request(request_id=f"c{i}", integration=g)
            for i, g in enumerate(["github", "gitlab", "github"])
        ],
        [tuple_request(request_id="explained", explain=True)],
    ]
    returned = [decider.decide_sync(batch) for batch in batches]
    assert audit.close(10)
    decider.close()
    assert seen.calls == returned  # one call per decide, with exactly what was returned
    outcomes = [o for d in returned for o in d.outcomes]
    assert len(outcomes) == sum(len(b) for b in batches)
    assert any(type(o) is CacheHit for o in outcomes)
    assert any(type(o) is Invalid for o in outcomes)
    records = [r for r in read_records(audit_file) if r["type"] == "decision"]
    by_id = Counter(r["decision_id"] for r in records)
    assert by_id == Counter(o.decision_id.decode() for o in outcomes)  # each exactly once
    levels = {r["decision_id"]: r["cache_level"] for r in records}
    for outcome in outcomes:
        expected = "local" if type(outcome) is CacheHit else "none"
        assert levels[outcome.decision_id.decode()] == expected
    counted = _decisions_counted()
    assert counted - counted_before == len(outcomes)
