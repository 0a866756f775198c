"""Quotas in the decision pipeline, with real counter stores (a real redis-server, and the
in-process store): every ALLOW answered counts, cached ones too; a call counts in one round
trip; an exhausted quota answers DENY kontext_rate_limited with the time until it frees; a
store that cannot count denies unless the quota says `when_unavailable: allow`; quota
answers are never cached; observers see the final answer; organizations without quotas
never reach the store."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from policy_engine.api import pdp_pb2
from policy_engine.bench.redis_server import RedisServer
from policy_engine.config import QuotaSettings, Settings
from policy_engine.decision import DeadlineExceeded, Decided, Decider
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.quota import InProcessQuotaStore, QuotaStore, quota_store_from_settings
from policy_engine.server.service import build_decider
from tests.cache.support import settings, tuple_request
from tests.decision.test_pipeline import Seen
from tests.metrics import sample
from tests.server.harness import EXAMPLE_POLICIES

ORGANIZATION = """\
kind: Organization
defaults: {org: allow, user: allow, application: allow}
catalog:
  integrations: [github, slack, linear]
  applications: [pr-reviewer]
"""
QUOTAS = """\
kind: Quota
name: github-hourly
target: {integrations: [github]}
limit: 5
window: 1h
per: [subject]
---
kind: Quota
name: slack-lenient
target: {integrations: [slack]}
limit: 5
window: 1h
when_unavailable: allow
---
kind: Quota
name: slack-and-linear-strict
target: {integrations: [linear, slack]}
limit: 1000
window: 1d
algorithm: sliding
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    root = tmp_path_factory.mktemp("quota-policies")
    for org, quotas in (("acme", QUOTAS), ("plain", "")):
        (root / org).mkdir()
        (root / org / "organization.yaml").write_text(ORGANIZATION)
        if quotas:
            (root / org / "quotas.yaml").write_text(quotas)
    return load_policy_set(root)


def _quota_settings(server: RedisServer, timeout_ms: int = 200) -> Settings:
    config = settings(server)
    return config.replace(quota=QuotaSettings(redis_timeout_ms=timeout_ms))


@pytest.fixture
def redis_quotas(shared_redis: RedisServer) -> Iterator[QuotaStore]:
    store = quota_store_from_settings(_quota_settings(shared_redis))
    store.start()
    yield store
    store.stop(time.monotonic() + 5)


def _decider(
    policies: CompiledPolicySet, quotas: QuotaStore | None, config: Settings | None = None
) -> tuple[Decider, Seen]:
    seen = Seen()
    decider = build_decider(lambda: policies, config or settings(), quotas=quotas)
    decider.observers.append(seen)
    return decider, seen


def _evalsha_calls(server: RedisServer) -> int:
    admin = redis.Redis(port=server.port)
    try:
        stats = admin.info("commandstats")
    finally:
        admin.close()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def _request(org: str = "acme", subject: str = "alice", integration: str = "github") -> Any:
    return tuple_request(subject, integration=integration, organization=org)


def _effects(responses: Any) -> list[str]:
    return ["ALLOW" if r.effect == pdp_pb2.EFFECT_ALLOW else r.reasons[0].code for r in responses]


def test_cached_allows_are_counted_and_the_quota_holds_exactly(
    policies: CompiledPolicySet, redis_quotas: QuotaStore
) -> None:
    decider, _ = _decider(policies, redis_quotas)
    answers = [decider.decide_sync([_request()]).only() for _ in range(8)]
    assert _effects(answers) == ["ALLOW"] * 5 + ["kontext_rate_limited"] * 3
    # The second to fifth ALLOWs came from the cache and were counted all the same.
    assert [a.cache_level for a in answers[:5]] == [pdp_pb2.CACHE_LEVEL_NONE] + [
        pdp_pb2.CACHE_LEVEL_LOCAL
    ] * 4
    # The quota's DENY is never cached: the policies' ALLOW still is, and is counted again.
    denied = answers[-1]
    assert not denied.cached and denied.cache_level == pdp_pb2.CACHE_LEVEL_NONE
    # Another subject has a bucket of its own.
    assert decider.decide_sync([_request(subject="bob")]).only().effect == pdp_pb2.EFFECT_ALLOW


def test_the_deny_says_which_quota_and_when_it_frees(
    policies: CompiledPolicySet, redis_quotas: QuotaStore
) -> None:
    decider, _ = _decider(policies, redis_quotas)
    for _ in range(5):
        decider.decide_sync([_request()])
    before = time.time()
    denied = decider.decide_sync([_request()]).only()
    (reason,) = denied.reasons
    assert (reason.code, reason.http_status, reason.layer) == (
        "kontext_rate_limited",
        429,
        pdp_pb2.LAYER_SYSTEM,
    )
    assert (reason.policy, reason.rule) == ("github-hourly", "quota-exhausted")
    assert reason.message.startswith(
        "quota github-hourly allows 5 per 1 h (fixed window) per subject and is exhausted; "
        "it frees in "
    )
    # The window ends at the next full hour (Redis's clock, which is this machine's).
    frees_in = reason.retry_after.ToMilliseconds() / 1000
    until_hour = 3600 - before % 3600
    assert 0 < frees_in <= until_hour + 1
    assert reason.docs_url.endswith("/errors/kontext_rate_limited")


def test_a_batch_is_counted_in_one_round_trip(
    policies: CompiledPolicySet, redis_quotas: QuotaStore, shared_redis: RedisServer
) -> None:
    decider, seen = _decider(policies, redis_quotas, settings(enabled=False))
    batch = [_request(subject=f"user-{n % 3}") for n in range(21)]  # 7 each, 5 allowed
    batch += [_request(integration="slack"), _request("plain")]
    before = _evalsha_calls(shared_redis)
    results = decider.decide_sync(batch).batch().results
    assert _evalsha_calls(shared_redis) - before == 1
    effects = _effects(results)
    for user in range(3):
        assert effects[user:21:3] == ["ALLOW"] * 5 + ["kontext_rate_limited"] * 2
    assert effects[21:] == ["ALLOW", "ALLOW"]
    # The observers (audit, metrics) saw the final answers, as Decided DENYs with the reason.
    outcomes = seen.calls[-1].outcomes
    assert [o.effect for o in outcomes] == [r.effect for r in results]
    limited = [o for o in outcomes if o.code == "kontext_rate_limited"]
    assert len(limited) == 6 and all(isinstance(o, Decided) for o in limited)
    assert all(not o.stored and not o.decision.cacheable for o in limited)  # type: ignore[attr-defined]


def test_an_organization_without_quotas_never_reaches_the_store(
    policies: CompiledPolicySet, redis_quotas: QuotaStore, shared_redis: RedisServer
) -> None:
    decider, _ = _decider(policies, redis_quotas)
    before = _evalsha_calls(shared_redis)
    # An acme DENY (not in the catalog) has nothing to count either.
    batch = [_request("plain") for _ in range(10)] + [_request(integration="gitlab")]
    results = decider.decide_sync(batch).batch().results
    assert _effects(results)[:10] == ["ALLOW"] * 10
    assert _evalsha_calls(shared_redis) == before


def test_a_store_that_cannot_count_denies_unless_the_quota_allows(
    policies: CompiledPolicySet, redis_server: RedisServer
) -> None:
    store = quota_store_from_settings(_quota_settings(redis_server))
    store.start()
    try:
        decider, _ = _decider(policies, store, settings(enabled=False))
        assert decider.decide_sync([_request()]).only().effect == pdp_pb2.EFFECT_ALLOW
        redis_server.kill()
        before = sample("pdp_quota_total", organization="acme", quota="github-hourly",
                        outcome="unavailable")  # fmt: skip
        denied = decider.decide_sync([_request()]).only()
        (reason,) = denied.reasons
        assert denied.effect == pdp_pb2.EFFECT_DENY
        assert (reason.code, reason.layer, reason.policy) == (
            "kontext_server_error",
            pdp_pb2.LAYER_SYSTEM,
            "github-hourly",
        )
        assert "quota store is unreachable" in reason.message
        assert sample("pdp_quota_total", organization="acme", quota="github-hourly",
                      outcome="unavailable") == before + 1  # fmt: skip
        # slack-lenient says allow, but slack-and-linear-strict also matches slack (deny).
        assert _effects([decider.decide_sync([_request(integration="slack")]).only()]) == [
            "kontext_server_error"
        ]
    finally:
        store.stop(time.monotonic() + 5)


def test_when_unavailable_allow_lets_the_allow_stand_uncounted(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "organization.yaml").write_text(ORGANIZATION)
    (tmp_path / "acme" / "quotas.yaml").write_text(QUOTAS.split("---\n")[1])  # slack-lenient
    policies = load_policy_set(tmp_path)
    closed = RedisServer(tmp_path / "never-started")  # a free port nobody listens on
    store = quota_store_from_settings(_quota_settings(closed))
    store.start()
    try:
        decider, _ = _decider(policies, store, settings(enabled=False))
        answers = [decider.decide_sync([_request(integration="slack")]).only() for _ in range(7)]
        assert _effects(answers) == ["ALLOW"] * 7
    finally:
        store.stop(time.monotonic() + 5)


def test_a_garbage_counter_denies_never_allows(
    policies: CompiledPolicySet, redis_quotas: QuotaStore, shared_redis: RedisServer
) -> None:
    decider, _ = _decider(policies, redis_quotas, settings(enabled=False))
    assert decider.decide_sync([_request(subject="mallory")]).only().effect == pdp_pb2.EFFECT_ALLOW
    admin = redis.Redis(port=shared_redis.port)
    try:
        (key,) = admin.keys("pdp:quota:{acme}:github-hourly:*")
        admin.set(key, "-1000")  # a hostile value: a negative count would mean room forever
    finally:
        admin.close()
    answer = decider.decide_sync([_request(subject="mallory")]).only()
    assert _effects([answer]) == ["kontext_server_error"]


def test_a_deadline_passing_while_counting_is_deadline_exceeded(
    policies: CompiledPolicySet, redis_server: RedisServer
) -> None:
    store = quota_store_from_settings(_quota_settings(redis_server, timeout_ms=10_000))
    store.start()
    decider, seen = _decider(policies, store, settings(enabled=False))
    try:
        assert decider.decide_sync([_request()]).only().effect == pdp_pb2.EFFECT_ALLOW
        assert redis_server.process is not None
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        before = sample("pdp_deadline_exceeded_total", stage="quota")
        calls = len(seen.calls)
        try:
            with pytest.raises(DeadlineExceeded) as caught:
                decider.decide_sync([_request()], deadline=time.monotonic() + 0.3, timeout=10)
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        assert caught.value.stage == "quota"
        assert sample("pdp_deadline_exceeded_total", stage="quota") == before + 1
        assert len(seen.calls) == calls  # nothing observed
    finally:
        store.stop(time.monotonic() + 5)


def test_without_a_store_a_quota_denies(policies: CompiledPolicySet) -> None:
    decider = Decider(lambda: policies, settings(enabled=False), quotas=None)
    assert _effects([decider.decide_sync([_request()]).only()]) == ["kontext_server_error"]


def test_the_in_process_store_counts_the_same_way(policies: CompiledPolicySet) -> None:
    decider, _ = _decider(policies, InProcessQuotaStore())
    results = decider.decide_sync([_request(subject="carol")] * 7).batch().results
    assert _effects(results) == ["ALLOW"] * 5 + ["kontext_rate_limited"] * 2
    admitted = sample("pdp_quota_total", organization="acme", quota="github-hourly",
                      outcome="admitted")  # fmt: skip
    exhausted = sample("pdp_quota_total", organization="acme", quota="github-hourly",
                       outcome="exhausted")  # fmt: skip
    decider.decide_sync([_request(subject="dave")] * 6)
    assert sample("pdp_quota_total", organization="acme", quota="github-hourly",
                  outcome="admitted") == admitted + 5  # fmt: skip
    assert sample("pdp_quota_total", organization="acme", quota="github-hourly",
                  outcome="exhausted") == exhausted + 1  # fmt: skip


def test_a_decider_builds_its_store_from_the_settings_when_a_quota_needs_it(
    policies: CompiledPolicySet,
) -> None:
    decider = Decider(lambda: policies, settings(enabled=False))
    assert decider.quotas is None  # nothing built yet
    decider.decide_sync([_request("plain")])
    assert decider.quotas is None  # no quota: still nothing
    results = decider.decide_sync([_request(subject="erin")] * 6).batch().results
    assert _effects(results) == ["ALLOW"] * 5 + ["kontext_rate_limited"]
    assert isinstance(decider.quotas, InProcessQuotaStore)
    assert decider.close()


def test_a_context_time_far_away_does_not_move_the_window(
    policies: CompiledPolicySet, redis_quotas: QuotaStore
) -> None:
    """The store's clock counts, never the request's context.time."""
    decider, _ = _decider(policies, redis_quotas, settings(enabled=False))
    answers = []
    for seconds in (0, 10**10, 1, 4 * 10**9, 2 * 10**9, 3600 * 24 * 400, 5):
        msg = _request(subject="time-traveller")
        msg.context.time.FromSeconds(seconds)
        answers.append(decider.decide_sync([msg]).only())
    assert _effects(answers) == ["ALLOW"] * 5 + ["kontext_rate_limited"] * 2


def test_an_external_user_counts_as_the_person_it_maps_to() -> None:
    """globex maps the contractor portal's c-1029 to grace: her SSO requests and the
    contractor ID's (fresh and cached) share her github-per-person-hourly counter."""
    policies = load_policy_set(EXAMPLE_POLICIES)
    decider, _ = _decider(policies, InProcessQuotaStore())

    def ask(subject: str, kind: int) -> Any:
        msg = tuple_request(subject, integration="github", scope="read:packages")
        msg.organization = "globex"
        msg.application.id = "release-bot"
        msg.subject.kind = kind
        return decider.decide_sync([msg]).only()

    user, external = pdp_pb2.SUBJECT_KIND_USER, pdp_pb2.SUBJECT_KIND_EXTERNAL_USER
    answers = [ask("grace", user) for _ in range(60)] + [ask("c-1029", external) for _ in range(40)]
    assert _effects(answers) == ["ALLOW"] * 100
    assert answers[-1].cached and answers[-1].mapped_subject_id == "grace"  # a counted hit
    for subject, kind in (("c-1029", external), ("grace", user)):
        denied = ask(subject, kind)
        assert _effects([denied]) == ["kontext_rate_limited"]
        assert denied.reasons[0].policy == "github-per-person-hourly"
    assert _effects([ask("erin", user)]) == ["ALLOW"]  # another person: her own counter


def test_an_explained_allow_past_its_quota_is_denied_with_its_trace(
    policies: CompiledPolicySet,
) -> None:
    decider, _ = _decider(policies, InProcessQuotaStore())
    msg = _request(subject="explained")
    msg.explain = True
    answers = [decider.decide_sync([msg]).only() for _ in range(6)]
    assert _effects(answers) == ["ALLOW"] * 5 + ["kontext_rate_limited"]
    assert answers[-1].HasField("explain") and answers[-1].explain.layers
