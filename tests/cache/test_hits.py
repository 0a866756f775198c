"""Hits and misses at both levels, through a real gRPC server and a real redis-server.

Every cached answer is compared with what the engine answers without any cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jwt
import pytest

from policy_engine.api import pdp_pb2
from policy_engine.bench.redis_server import RedisServer
from policy_engine.cache import Entry
from policy_engine.policy import CompiledPolicySet, load_policy_set
from tests.cache.support import (
    LOCAL,
    NONE,
    REDIS,
    Clock,
    admin,
    answer,
    servicer_for,
    serving,
    settings,
    tuple_request,
)
from tests.metrics import sample as _sample
from tests.policy_builder import allow_all, write_organization
from tests.server.harness import EXAMPLE_POLICIES

TUPLES = {
    "allow": tuple_request(),
    "org rule": tuple_request(scope="delete_repo"),
    "user rule": tuple_request(scope="admin:org"),
    "application layer": tuple_request(integration="linear", scope="read"),
    "org default": tuple_request("bob", ["sales"]),
    "not in catalog": tuple_request(integration="gitlab"),
    "no connection": tuple_request(
        context=pdp_pb2.RequestContext(connection=pdp_pb2.CONNECTION_STATE_ABSENT)
    ),
    "service account": tuple_request(
        subject=pdp_pb2.Subject(kind=pdp_pb2.SUBJECT_KIND_SERVICE_ACCOUNT)
    ),
    "unknown organization": tuple_request(organization="initech"),
}


@pytest.fixture(scope="module")
def policies() -> CompiledPolicySet:
    return load_policy_set(EXAMPLE_POLICIES)


@pytest.fixture(scope="module")
def uncached(policies: CompiledPolicySet) -> dict[str, tuple[object, ...]]:
    """The engine's own answers, with no cache anywhere."""
    servicer = servicer_for(policies, settings(), cache=None)
    decider = servicer.decider
    return {name: answer(decider.decide_sync([msg]).only()) for name, msg in TUPLES.items()}


def _with_id(msg: pdp_pb2.CheckRequest, request_id: str) -> pdp_pb2.CheckRequest:
    out = pdp_pb2.CheckRequest()
    out.CopyFrom(msg)
    out.request_id = request_id.replace(" ", "-")
    return out


# --- the local level -------------------------------------------------------------------------


def test_a_repeated_check_is_a_local_hit_with_the_same_answer(
    policies: CompiledPolicySet, uncached: dict[str, tuple[object, ...]]
) -> None:
    config = settings()
    hits_before = _sample("pdp_cache_lookups_total", level="local", result="hit")
    allows_before = _sample("pdp_decisions_total", effect="ALLOW", code="")
    latency_before = _sample("pdp_decision_seconds_count", method="Check", cache_level="local")
    with serving(servicer_for(policies, config), config) as stub:
        for name, msg in TUPLES.items():
            first = stub.Check(_with_id(msg, f"{name}-1"), timeout=10)
            second = stub.Check(_with_id(msg, f"{name}-2"), timeout=10)
            assert (first.cached, first.cache_level) == (False, NONE), name
            assert (second.cached, second.cache_level) == (True, LOCAL), name
            assert answer(first) == answer(second) == uncached[name], name
            assert second.request_id == f"{name}-2".replace(" ", "-")
            assert len(second.decision_id) == 32 and second.decision_id != first.decision_id
            assert not second.HasField("explain")
    assert _sample("pdp_cache_lookups_total", level="local", result="hit") - hits_before == len(
        TUPLES
    )
    assert _sample("pdp_decisions_total", effect="ALLOW", code="") - allows_before == 2
    assert _sample(
        "pdp_decision_seconds_count", method="Check", cache_level="local"
    ) - latency_before == len(TUPLES)


def test_explain_requests_bypass_the_cache(policies: CompiledPolicySet) -> None:
    config = settings()
    with serving(servicer_for(policies, config), config) as stub:
        msg = TUPLES["user rule"]
        stub.Check(msg, timeout=10)
        assert stub.Check(msg, timeout=10).cached
        explained = stub.Check(_with_id(msg, "x"), timeout=10)
        assert explained.cached
        with_trace = pdp_pb2.CheckRequest()
        with_trace.CopyFrom(msg)
        with_trace.explain = True
        resp = stub.Check(with_trace, timeout=10)
        assert (resp.cached, resp.cache_level) == (False, NONE)
        assert resp.HasField("explain") and len(resp.explain.layers) == 3


def test_cache_disabled_means_no_cache_at_all(policies: CompiledPolicySet) -> None:
    config = settings(enabled=False)
    servicer = servicer_for(policies, config)
    assert servicer.cache is None
    with serving(servicer, config) as stub:
        for _ in range(3):
            assert not stub.Check(TUPLES["allow"], timeout=10).cached
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[TUPLES["allow"]] * 3))
        assert not any(r.cached for r in batch.results)


# --- the Redis level -------------------------------------------------------------------------


def test_with_the_local_level_off_a_repeat_is_a_redis_hit(
    policies: CompiledPolicySet,
    uncached: dict[str, tuple[object, ...]],
    shared_redis: RedisServer,
) -> None:
    config = settings(shared_redis, local_max_entries=0)
    servicer = servicer_for(policies, config)
    assert servicer.cache is not None and servicer.cache.local is None
    with serving(servicer, config) as stub:
        for name, msg in TUPLES.items():
            first = stub.Check(msg, timeout=10)
            servicer.cache.flush()
            second = stub.Check(_with_id(msg, "again"), timeout=10)
            assert (first.cached, first.cache_level) == (False, NONE), name
            assert (second.cached, second.cache_level) == (True, REDIS), name
            assert answer(first) == answer(second) == uncached[name], name
            assert second.request_id == "again"


def test_a_redis_hit_fills_the_local_level(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    config = settings(shared_redis)
    writer, reader = servicer_for(policies, config), servicer_for(policies, config)
    msg = TUPLES["org rule"]
    with serving(writer, config) as stub_a, serving(reader, config) as stub_b:
        assert stub_a.Check(msg, timeout=10).cache_level == NONE
        assert writer.cache is not None and writer.cache.flush()
        assert stub_b.Check(msg, timeout=10).cache_level == REDIS
        assert stub_b.Check(msg, timeout=10).cache_level == LOCAL


def test_what_redis_holds_is_the_decision_not_the_request(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    config = settings(shared_redis)
    servicer = servicer_for(policies, config)
    token = jwt.encode({"sub": "alice", "exp": 4_000_000_000}, "k" * 32, algorithm="HS256")
    msg = tuple_request(subject=pdp_pb2.Subject(access_token=token))
    with serving(servicer, config) as stub:
        stub.Check(msg, timeout=10)
        assert servicer.cache is not None and servicer.cache.flush()
    client = admin(shared_redis)
    (key,) = client.keys("*")
    revision = policies.revision
    assert key.decode().startswith(f"pdp:v1:{revision}:")
    value = client.get(key)
    assert value is not None and token.encode() not in value and b"alice" not in key


def test_a_forged_or_misplaced_redis_value_is_a_miss_never_an_answer(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    """Someone copies a cached allow onto a deny's key: the deny is still what is answered."""
    config = settings(shared_redis, local_max_entries=0)
    servicer = servicer_for(policies, config)
    allow, deny = TUPLES["allow"], TUPLES["org default"]
    client = admin(shared_redis)
    with serving(servicer, config) as stub:
        stub.Check(allow, timeout=10)
        assert servicer.cache is not None and servicer.cache.flush()
        (allow_key,) = client.keys("*")
        stub.Check(deny, timeout=10)
        assert servicer.cache.flush()
        (deny_key,) = set(client.keys("*")) - {allow_key}
        client.set(deny_key, client.get(allow_key))  # the forgery
        single = stub.Check(deny, timeout=10)
        # The honest answer is written back behind the response: let it land before the next
        # forgery, or it would overwrite that forgery and be served (honestly) from Redis.
        assert servicer.cache.flush()
        client.set(deny_key, client.get(allow_key))
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[deny, allow]), timeout=10)
        assert servicer.cache.flush()
        client.set(deny_key, b"\x02garbage")
        garbage = stub.Check(deny, timeout=10)
    for resp in (single, batch.results[0], garbage):
        assert resp.effect == pdp_pb2.EFFECT_DENY and not resp.cached
    assert batch.results[1].cache_level == REDIS  # the genuine entry still serves


def test_a_corrupt_local_entry_is_decided_anew_not_failed(
    policies: CompiledPolicySet, uncached: dict[str, tuple[object, ...]]
) -> None:
    config = settings()
    servicer = servicer_for(policies, config)
    cache = servicer.cache
    assert cache is not None and cache.local is not None
    msg = TUPLES["org default"]
    key = cache.key(msg, policies.revision)
    assert key is not None
    with serving(servicer, config) as stub:
        cache.local.put(key, Entry(b"\xff\xff\xff", time.time() + 60, pdp_pb2.EFFECT_ALLOW, ""))
        single = stub.Check(msg, timeout=10)
        cache.local.put(key, Entry(b"\xff\xff\xff", time.time() + 60, pdp_pb2.EFFECT_ALLOW, ""))
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[msg, msg]), timeout=10)
    for resp in (single, *batch.results):
        assert answer(resp) == uncached["org default"] and not resp.cached


# --- what is never cached --------------------------------------------------------------------


def test_validation_failures_are_not_cached(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    config = settings(shared_redis)
    servicer = servicer_for(policies, config)
    bad = tuple_request(scope="has space")
    with serving(servicer, config) as stub:
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Check(bad, timeout=10)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        batch = pdp_pb2.CheckBatchRequest(items=[bad, TUPLES["allow"]])
        first = stub.CheckBatch(batch, timeout=10)
        second = stub.CheckBatch(batch, timeout=10)
        assert servicer.cache is not None and servicer.cache.flush()
    assert first.results[0].reasons[0].code == "kontext_validation_error"
    assert not second.results[0].cached
    assert answer(second.results[0]) == answer(first.results[0])
    assert second.results[1].cache_level == LOCAL
    assert servicer.cache.local is not None and len(servicer.cache.local) == 1
    assert admin(shared_redis).dbsize() == 1  # only the allow


def test_a_cached_tuple_with_an_invalid_excluded_field_is_still_refused(
    policies: CompiledPolicySet,
) -> None:
    """request_id and context.time are not in the key, but they are validated: no hit."""
    config = settings()
    servicer = servicer_for(policies, config)
    good = TUPLES["allow"]
    bad_id = _with_id(good, "x")
    bad_id.request_id = "has space"
    bad_time = _with_id(good, "t")
    bad_time.context.time.nanos = -1
    with serving(servicer, config) as stub:
        stub.Check(good, timeout=10)
        assert stub.Check(good, timeout=10).cached
        for bad, field in ((bad_id, "request_id"), (bad_time, "context.time")):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Check(bad, timeout=10)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            result = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[bad]), timeout=10)
            assert not result.results[0].cached
            assert result.results[0].reasons[0].field == field


def _clock_policies(root: Path) -> CompiledPolicySet:
    write_organization(
        root,
        "acme",
        integrations=["github", "linear"],
        applications=["pr-reviewer"],
        policies=[
            {
                "name": "office-hours",
                "layer": "org",
                "target": {"integrations": ["github"]},
                "rules": [
                    {
                        "name": "daytime",
                        "effect": "allow",
                        "condition": 'now.betweenHours("09:00", "17:00", "UTC")',
                    }
                ],
            },
            {
                "name": "linear-no-cache",
                "layer": "org",
                "target": {"integrations": ["linear"]},
                "cache": False,
                "rules": [{"name": "everyone", "effect": "allow"}],
            },
            allow_all("user"),
            allow_all("application"),
        ],
    )
    return load_policy_set(root)


def test_a_clock_rule_is_never_cached_and_follows_the_clock(
    tmp_path: Path, shared_redis: RedisServer
) -> None:
    policies = _clock_policies(tmp_path)
    clock = Clock(datetime(2026, 6, 1, 10, 0, tzinfo=UTC))
    config = settings(shared_redis)
    servicer = servicer_for(policies, config, clock=clock)
    msg = tuple_request()
    with serving(servicer, config) as stub:
        day = [stub.Check(msg, timeout=10) for _ in range(3)]
        clock.now = datetime(2026, 6, 1, 20, 0, tzinfo=UTC)
        night = [stub.Check(msg, timeout=10) for _ in range(3)]
        clock.now = datetime(2026, 6, 2, 9, 30, tzinfo=UTC)
        morning = stub.Check(msg, timeout=10)
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[msg, msg]), timeout=10)
        assert servicer.cache is not None and servicer.cache.flush()
    assert [r.effect for r in day] == [pdp_pb2.EFFECT_ALLOW] * 3
    assert [r.effect for r in night] == [pdp_pb2.EFFECT_DENY] * 3
    assert night[0].reasons[0].layer == pdp_pb2.LAYER_ORG
    assert morning.effect == pdp_pb2.EFFECT_ALLOW
    assert [r.effect for r in batch.results] == [pdp_pb2.EFFECT_ALLOW] * 2
    assert not any(r.cached for r in [*day, *night, morning, *batch.results])
    assert admin(shared_redis).dbsize() == 0


def test_a_policy_can_opt_out_of_caching(tmp_path: Path, shared_redis: RedisServer) -> None:
    policies = _clock_policies(tmp_path)
    config = settings(shared_redis)
    servicer = servicer_for(policies, config)
    opted_out = tuple_request(integration="linear", scope="read")
    with serving(servicer, config) as stub:
        answers = [stub.Check(opted_out, timeout=10) for _ in range(3)]
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[opted_out] * 2), timeout=10)
        assert servicer.cache is not None and servicer.cache.flush()
    assert all(r.effect == pdp_pb2.EFFECT_ALLOW and not r.cached for r in answers)
    assert not any(r.cached for r in batch.results)
    assert admin(shared_redis).dbsize() == 0


def _token(expires: datetime) -> str:
    return jwt.encode(
        {"sub": "alice", "exp": int(expires.timestamp())}, "k" * 32, algorithm="HS256"
    )


def test_a_token_bounds_the_entry_lifetime(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    start = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    clock = Clock(start)
    # Verdict flips at exp + 30 s leeway = start + 90 s: before either configured TTL.
    msg = tuple_request(subject=pdp_pb2.Subject(access_token=_token(start.replace(minute=1))))
    config = settings(shared_redis, local_ttl_seconds=600, redis_ttl_seconds=600)
    local_and_redis = servicer_for(policies, config, clock=clock)
    redis_only = servicer_for(policies, settings(shared_redis, local_max_entries=0), clock=clock)
    with serving(local_and_redis, config) as stub, serving(redis_only, config) as redis_stub:
        first = stub.Check(msg, timeout=10)
        assert local_and_redis.cache is not None and local_and_redis.cache.flush()
        client = admin(shared_redis)
        (key,) = client.keys("*")
        assert 80_000 < client.pttl(key) <= 90_000  # Redis' own TTL is the token's bound
        clock.advance(89)
        cached = stub.Check(msg, timeout=10)
        from_redis = redis_stub.Check(msg, timeout=10)
        clock.advance(1.5)  # past start + 90 s: the token has expired (leeway included)
        after_local = stub.Check(msg, timeout=10)
        after_redis = redis_stub.Check(msg, timeout=10)
    assert first.effect == pdp_pb2.EFFECT_ALLOW and not first.cached
    assert (cached.effect, cached.cache_level) == (pdp_pb2.EFFECT_ALLOW, LOCAL)
    assert (from_redis.effect, from_redis.cache_level) == (pdp_pb2.EFFECT_ALLOW, REDIS)
    # The expired-token deny is itself cacheable (it cannot flip back), so the second replica
    # may already get it from Redis; what matters is that no allow outlived the token.
    assert not after_local.cached
    for resp in (after_local, after_redis):
        assert resp.effect == pdp_pb2.EFFECT_DENY
        assert resp.reasons[0].code == "kontext_authorization_required"


def test_a_token_already_past_its_bound_is_not_stored(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    start = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    clock = Clock(start)
    # exp 30 s ago: still inside the leeway, so allowed, but the verdict flips right now.
    msg = tuple_request(subject=pdp_pb2.Subject(access_token=_token(start.replace(minute=0))))
    clock.advance(30)
    config = settings(shared_redis)
    servicer = servicer_for(policies, config, clock=clock)
    with serving(servicer, config) as stub:
        answers = [stub.Check(msg, timeout=10) for _ in range(2)]
        assert servicer.cache is not None and servicer.cache.flush()
    assert not any(r.cached for r in answers)
    assert admin(shared_redis).dbsize() == 0


# --- revisions -------------------------------------------------------------------------------


@pytest.fixture
def two_revisions(tmp_path: Path) -> Iterator[tuple[CompiledPolicySet, CompiledPolicySet]]:
    """The same organization twice: one revision allows github, the other does not."""
    opened = write_organization(
        tmp_path / "a",
        "acme",
        applications=["pr-reviewer"],
        policies=[allow_all("org"), allow_all("user"), allow_all("application")],
    )
    closed = write_organization(
        tmp_path / "b",
        "acme",
        applications=["pr-reviewer"],
        policies=[allow_all("user"), allow_all("application")],
    )
    yield load_policy_set(opened.parent), load_policy_set(closed.parent)


def test_a_new_revision_is_never_answered_from_an_older_ones_entries(
    two_revisions: tuple[CompiledPolicySet, CompiledPolicySet], shared_redis: RedisServer
) -> None:
    rev_a, rev_b = two_revisions
    assert rev_a.revision != rev_b.revision
    current = [rev_a]
    config = settings(shared_redis)
    servicer = servicer_for(rev_a, config)
    servicer._source = lambda: current[0]  # what a reload does: the source returns a new set
    redis_only_config = settings(shared_redis, local_max_entries=0)
    redis_only = servicer_for(rev_a, redis_only_config)
    redis_only._source = lambda: current[0]
    msg = tuple_request()
    batch = pdp_pb2.CheckBatchRequest(items=[msg, msg])
    with serving(servicer, config) as stub, serving(redis_only, redis_only_config) as stub_r:
        assert stub.Check(msg, timeout=10).effect == pdp_pb2.EFFECT_ALLOW
        assert servicer.cache is not None and servicer.cache.flush()
        assert stub.Check(msg, timeout=10).cache_level == LOCAL
        assert stub_r.Check(msg, timeout=10).cache_level == REDIS
        current[0] = rev_b
        under_b = [stub.Check(msg, timeout=10), stub_r.Check(msg, timeout=10)]
        under_b += stub.CheckBatch(batch, timeout=10).results[:1]
        under_b += stub_r.CheckBatch(batch, timeout=10).results[:1]
    assert not under_b[0].cached  # the first answer under B was evaluated ...
    for resp in under_b:  # ... and every one is B's (some from B's own fresh entries)
        assert resp.effect == pdp_pb2.EFFECT_DENY
        assert resp.policy_revision == rev_b.revision
    keys = {k.decode().split(":")[2] for k in admin(shared_redis).keys("*")}
    assert rev_a.revision in keys  # revision A's entry is still there, and was not used


# --- batches ---------------------------------------------------------------------------------


def test_a_batch_mixes_hits_and_evaluations_in_order(
    policies: CompiledPolicySet,
    uncached: dict[str, tuple[object, ...]],
    shared_redis: RedisServer,
) -> None:
    config = settings(shared_redis)
    servicer = servicer_for(policies, config)
    names = list(TUPLES)
    items = [_with_id(TUPLES[n], f"{n}-{i}") for i, n in enumerate(names)]
    explain = _with_id(TUPLES["allow"], "explained")
    explain.explain = True
    with serving(servicer, config) as stub:
        stub.Check(TUPLES["org rule"], timeout=10)  # one item warm in the local level
        first = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[*items, explain]), timeout=10)
        second = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[*items, explain]), timeout=10)
    levels = [r.cache_level for r in first.results]
    assert levels == [LOCAL if n == "org rule" else NONE for n in names] + [NONE]
    assert [r.cache_level for r in second.results] == [LOCAL] * len(names) + [NONE]
    for resp in (first, second):
        assert [answer(r) for r in resp.results[:-1]] == [uncached[n] for n in names]
        assert [r.request_id for r in resp.results] == [m.request_id for m in [*items, explain]]
        assert len({r.decision_id for r in resp.results}) == len(items) + 1
        assert resp.results[-1].HasField("explain")
