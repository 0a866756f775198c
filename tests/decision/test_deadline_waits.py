"""No evaluation for a caller whose deadline ran out: while it waited before the decision, or
while its batch was evaluated.

A call whose token names a key its organization's JWKS lacks waits for the refresh (within its
deadline) before the cache lookup. When that wait uses up the caller's time, the call is over:
it must not be evaluated, stored or observed (its answer would be thrown away), and it is
counted in `pdp_deadline_exceeded_total{stage="keys"}`. Likewise a batch whose deadline passes
while it is evaluated is not evaluated further (`stage="evaluation"`). Real parts: a JWKS
endpoint on a real socket that never answers, a real gRPC server on an ephemeral port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from policy_engine.api import pdp_pb2
from policy_engine.auth.keys import RemoteKeySets
from policy_engine.decision import DeadlineExceeded
from policy_engine.lifecycle import deadline_in
from policy_engine.policy import CompiledPolicySet, load_policy_set
from tests.auth.test_jwks_async import ROTATED, Idp, load
from tests.cache.support import servicer_for, serving, settings, tuple_request
from tests.cache.test_key_sets import policy_dir, with_token
from tests.metrics import decisions_total
from tests.server.harness import EXAMPLE_POLICIES


def expired(stage: str) -> float:
    value = REGISTRY.get_sample_value("pdp_deadline_exceeded_total", {"stage": stage})
    return value or 0.0


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[CompiledPolicySet]:
    """acme's policies with their keys fetched, then an IdP that never answers again; no
    rate limit on refreshes, so every call with an unknown kid waits for one."""
    idp = Idp()
    key_sets = RemoteKeySets(min_refresh_interval=0.0)
    try:
        policies = load(policy_dir(tmp_path / "policies", idp.url), key_sets)
        idp.mode = "silent"
        yield policies
    finally:
        assert key_sets.stop(deadline_in(5))
        idp.close()


def test_a_call_whose_deadline_passes_waiting_for_keys_is_not_evaluated(
    stalled: CompiledPolicySet,
) -> None:
    config = settings(local_max_entries=0)  # no cache: nothing after the wait bounds it
    decider = servicer_for(stalled, config).decider
    before, counted = decisions_total(), expired("keys")
    with pytest.raises(DeadlineExceeded) as raised:
        # 0.3 s: far less than the 1 s the call may wait for the refresh.
        decider.decide_sync([with_token(ROTATED)], deadline=time.monotonic() + 0.3, timeout=10)
    assert raised.value.stage == "keys"
    assert decisions_total() == before  # nothing evaluated, nothing observed
    assert expired("keys") == counted + 1


def test_callers_that_time_out_waiting_for_keys_cost_no_evaluation(
    stalled: CompiledPolicySet,
) -> None:
    config = settings(local_max_entries=0)
    with serving(servicer_for(stalled, config), config) as stub:
        before = decisions_total()
        codes = []
        for _ in range(8):
            try:
                stub.Check(with_token(ROTATED), timeout=0.2)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 8
        # The server saw each of them to its deadline; none was decided for nobody.
        assert decisions_total() == before


def test_a_call_that_needs_no_refresh_is_decided_at_once(stalled: CompiledPolicySet) -> None:
    config = settings(local_max_entries=0)
    decider = servicer_for(stalled, config).decider
    msg = with_token(ROTATED)
    msg.organization = "globex"  # no tokens there: nothing to wait for
    outcome = decider.decide_sync([msg], deadline=time.monotonic() + 5, timeout=10).outcomes[0]
    assert outcome.effect in (pdp_pb2.EFFECT_ALLOW, pdp_pb2.EFFECT_DENY)


# --- a batch whose deadline passes while it is evaluated -------------------------------------


def big_batch(tag: str, count: int = 1000) -> list[pdp_pb2.CheckRequest]:
    """`count` distinct requests (none answered from a cache)."""
    return [tuple_request(f"{tag}-{index}") for index in range(count)]


def test_a_batch_whose_deadline_passes_during_evaluation_is_not_evaluated_further() -> None:
    config = settings(local_max_entries=0)
    decider = servicer_for(load_policy_set(EXAMPLE_POLICIES), config).decider
    before, counted = decisions_total(), expired("evaluation")
    with pytest.raises(DeadlineExceeded) as raised:
        # 5 ms: 1,000 evaluations take far longer (tens of microseconds each).
        decider.decide_sync(big_batch("late"), deadline=time.monotonic() + 0.005, timeout=30)
    assert raised.value.stage == "evaluation"
    assert expired("evaluation") == counted + 1
    assert decisions_total() == before  # nothing observed


def test_a_batch_answered_late_was_not_decided_for_nobody() -> None:
    config = settings(local_max_entries=0)
    with serving(servicer_for(load_policy_set(EXAMPLE_POLICIES), config), config) as stub:
        for round_ in range(3):
            before = decisions_total()
            request = pdp_pb2.CheckBatchRequest(items=big_batch(f"r{round_}"))
            try:
                stub.CheckBatch(request, timeout=0.02)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                # The server may still be finishing its check: give it time to observe.
                time.sleep(0.5)
                assert decisions_total() == before
            else:  # a fast machine answered in time: every item was decided
                assert decisions_total() == before + 1000
