"""A span per call through a real gRPC server: a child of the broker's trace context, with the
decision's attributes and child spans for the cache lookup (and its Redis command), the
evaluation and the quota count. Real parts: a gRPC server on an ephemeral port, a real client
sending `traceparent`, a real redis-server for the cache and the quota counters.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from policy_engine.api import pdp_pb2
from policy_engine.bench.redis_server import RedisServer
from policy_engine.client import check_request
from policy_engine.config import CacheSettings
from policy_engine.tracing.otel import parent_context
from tests.cache.support import KEY
from tests.tracing.support import (
    BATCH_SPAN,
    CHECK_SPAN,
    PARENT_ID,
    TRACE_ID,
    TRACEPARENT,
    Recorder,
    erin_on_github,
    ids,
    metadata,
    recording,
    serving,
    traced_settings,
)


def _redis_settings(redis: RedisServer) -> Any:
    return traced_settings(
        cache=CacheSettings(redis_url=redis.url, redis_signing_key=KEY, redis_timeout_ms=2000)
    )


def _names(spans: list[ReadableSpan]) -> list[str]:
    return sorted(span.name for span in spans)


def test_a_check_is_a_server_span_in_the_brokers_trace_with_its_decision(
    shared_redis: RedisServer,
) -> None:
    with recording() as recorder, serving(_redis_settings(shared_redis)) as (running, stub):
        first = stub.Check(erin_on_github("r-1"), metadata=metadata(), timeout=10)
        assert first.effect == pdp_pb2.EFFECT_ALLOW
        [call] = recorder.wait_for_calls(CHECK_SPAN, 1)

        assert call.kind is SpanKind.SERVER
        assert ids(call)[0] == TRACE_ID
        assert call.parent is not None and call.parent.is_remote
        assert f"{call.parent.span_id:016x}" == PARENT_ID
        assert dict(call.attributes or {}) == {
            "rpc.system": "grpc",
            "rpc.service": "kontext.pdp.v1.PolicyDecisionService",
            "rpc.method": "Check",
            "rpc.grpc.status_code": 0,
            "pdp.organization": "globex",
            "pdp.decision": "ALLOW",
            "pdp.reason_codes": (),
            "pdp.cache_level": "none",
            "pdp.policy_revision": first.policy_revision,
            "pdp.decision_id": first.decision_id,
            "pdp.request_id": "r-1",
        }
        assert call.status.status_code is StatusCode.UNSET
        # A miss: the lookup went to Redis (GET), the engine decided, the quota counted it.
        children = recorder.children(call)
        assert _names(children) == ["pdp.cache.lookup", "pdp.evaluate", "pdp.quota.consume"]
        by_name = {span.name: span for span in children}
        lookup = by_name["pdp.cache.lookup"]
        assert lookup.attributes == {"pdp.item_count": 1, "pdp.cache.hits": 0}
        [get] = recorder.children(lookup)
        assert (get.name, get.kind) == ("GET", SpanKind.CLIENT)
        assert get.attributes == {"db.system.name": "redis", "db.operation.name": "GET"}
        assert by_name["pdp.evaluate"].attributes == {"pdp.item_count": 1, "pdp.evaluated": 1}
        assert by_name["pdp.quota.consume"].attributes == {
            "pdp.quota.items": 1,
            "pdp.quota.admitted": 1,
            "pdp.quota.unavailable": 0,
        }
        assert all(ids(span)[0] == TRACE_ID for span in [*children, get])

        # The same tuple again: a local hit, nothing evaluated, the ALLOW counted again.
        running.cache.flush()
        children, lookup = _hit(recorder, stub, "r-2", "local")
        assert _names(children) == ["pdp.cache.lookup", "pdp.quota.consume"]
        assert recorder.children(lookup) == []  # answered in process: no Redis command

        # Out of the local level: Redis answers it (a GET under the lookup).
        running.cache.clear_local()
        _children, lookup = _hit(recorder, stub, "r-3", "redis")
        assert [span.name for span in recorder.children(lookup)] == ["GET"]


def _hit(
    recorder: Recorder, stub: Any, request_id: str, level: str
) -> tuple[list[ReadableSpan], ReadableSpan]:
    """Check the test's tuple again, answered by the cache `level`: its call's child spans,
    and the lookup among them."""
    recorder.clear()
    answer = stub.Check(erin_on_github(request_id), metadata=metadata(), timeout=10)
    assert pdp_pb2.CacheLevel.Name(answer.cache_level) == f"CACHE_LEVEL_{level.upper()}"
    [call] = recorder.wait_for_calls(CHECK_SPAN, 1)
    assert call.attributes is not None and call.attributes["pdp.cache_level"] == level
    children = recorder.children(call)
    lookup = next(span for span in children if span.name == "pdp.cache.lookup")
    assert lookup.attributes == {"pdp.item_count": 1, "pdp.cache.hits": 1}
    return children, lookup


def test_a_batch_is_one_span_naming_its_organizations_counts_and_codes(
    shared_redis: RedisServer,
) -> None:
    denied = check_request("acme", "mallory", "release-bot", "github", "repo", request_id="b-2")
    items = [erin_on_github("b-1"), denied, erin_on_github("b-3")]
    batch = pdp_pb2.CheckBatchRequest(items=items)
    with recording() as recorder, serving(_redis_settings(shared_redis)) as (_running, stub):
        answer = stub.CheckBatch(batch, metadata=metadata(), timeout=10)
        [call] = recorder.wait_for_calls(BATCH_SPAN, 1)
    effects = [result.effect for result in answer.results]
    codes = list(dict.fromkeys(r.code for result in answer.results for r in result.reasons))
    assert codes, "the acme item is denied with a reason"
    attributes = dict(call.attributes or {})
    assert attributes == {
        "rpc.system": "grpc",
        "rpc.service": "kontext.pdp.v1.PolicyDecisionService",
        "rpc.method": "CheckBatch",
        "rpc.grpc.status_code": 0,
        "pdp.organizations": ("globex", "acme"),
        "pdp.batch.size": 3,
        "pdp.decision.allow_count": effects.count(pdp_pb2.EFFECT_ALLOW),
        "pdp.decision.deny_count": effects.count(pdp_pb2.EFFECT_DENY),
        "pdp.reason_codes": tuple(codes),
        "pdp.cache_level": "none",
        "pdp.policy_revision": answer.results[0].policy_revision,
    }
    assert ids(call)[0] == TRACE_ID
    children = recorder.children(call)
    assert _names(children) == ["pdp.cache.lookup", "pdp.evaluate", "pdp.quota.consume"]
    lookup = next(span for span in children if span.name == "pdp.cache.lookup")
    [mget] = recorder.children(lookup)
    assert mget.name == "MGET" and mget.attributes is not None
    assert mget.attributes["db.operation.batch.size"] == 2  # two distinct tuples
    evaluate = next(span for span in children if span.name == "pdp.evaluate")
    assert evaluate.attributes == {"pdp.item_count": 3, "pdp.evaluated": 3}


def test_a_refused_check_has_its_status_code_and_is_still_described() -> None:
    invalid = check_request("globex", "", "release-bot", "github", "repo", request_id="bad")
    with recording() as recorder, serving(traced_settings()) as (_running, stub):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(invalid, metadata=metadata(), timeout=10)
        [call] = recorder.wait_for_calls(CHECK_SPAN, 1)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    attributes = call.attributes or {}
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert attributes["pdp.decision"] == "DENY"
    assert attributes["pdp.reason_codes"] == ("kontext_validation_error",)
    # The caller's mistake, not the server's: OpenTelemetry's gRPC rules leave it unset.
    assert call.status.status_code is StatusCode.UNSET


# Each is ignored as a parent: the call starts a trace of its own and is answered as ever.
MALFORMED = [
    "garbage",
    "",
    f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is invalid
    f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace ID
    f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent ID
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper-case hex
    f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has nothing after the flags
    f"01-{TRACE_ID}-{PARENT_ID}-01-" + "x" * 600,  # longer than W3C allows
    f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",  # a digit short
    f"00-{'g' * 32}-{PARENT_ID}-01",  # not hex
]


def _answer(resp: pdp_pb2.CheckResponse) -> tuple[Any, ...]:
    return (resp.effect, [(r.code, r.rule) for r in resp.reasons], resp.policy_revision)


def test_a_malformed_traceparent_is_ignored_never_an_error_or_another_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with recording() as recorder, serving(traced_settings()) as (_running, stub):
        expected = _answer(stub.Check(erin_on_github(), timeout=10))
        recorder.wait_for_calls(CHECK_SPAN, 1)
        for value in MALFORMED:
            recorder.clear()
            with caplog.at_level("DEBUG", logger="opentelemetry"):
                got = stub.Check(erin_on_github(), metadata=metadata(value), timeout=10)
            assert _answer(got) == expected, value
            [call] = recorder.wait_for_calls(CHECK_SPAN, 1)
            assert call.parent is None, value  # a root span: a trace of the server's own
            assert ids(call)[0] != TRACE_ID
    # A caller cannot make the server log its headers (OpenTelemetry warns on each bad one).
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []


def test_two_traceparents_are_no_parent() -> None:
    # gRPC hands a server one value per key as it arrived; should a proxy pass two, neither is
    # trusted (W3C Trace Context: traceparent is a single header).
    one = parent_context([("traceparent", TRACEPARENT)])
    assert trace.get_current_span(one).get_span_context().is_valid
    two = parent_context([("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)])
    assert not trace.get_current_span(two).get_span_context().is_valid
    binary = parent_context([("traceparent-bin", TRACEPARENT.encode())])
    assert not trace.get_current_span(binary).get_span_context().is_valid


HOSTILE_TRACESTATES = [
    "no equals sign",
    "KEY=upper-case-key",
    ",".join(f"k{i}=v" for i in range(33)),  # more than 32 members
    "k=" + "v" * 600,  # more than 512 characters
    "k=",  # an empty value
    "k=v=w",
]


def test_a_malformed_tracestate_is_dropped_and_the_parent_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with recording() as recorder, serving(traced_settings()) as (_running, stub):
        recorder.clear()
        good = metadata(TRACEPARENT, ("tracestate", "vendor=abc,other@sys=x1"))
        stub.Check(erin_on_github(), metadata=good, timeout=10)
        [call] = recorder.wait_for_calls(CHECK_SPAN, 1)
        assert call.context.trace_state.to_header() == "vendor=abc,other@sys=x1"
        for value in HOSTILE_TRACESTATES:
            recorder.clear()
            with caplog.at_level("DEBUG", logger="opentelemetry"):
                stub.Check(
                    erin_on_github(),
                    metadata=metadata(TRACEPARENT, ("tracestate", value)),
                    timeout=10,
                )
            [call] = recorder.wait_for_calls(CHECK_SPAN, 1)
            assert ids(call)[0] == TRACE_ID, value
            assert call.context.trace_state.to_header() == "", value
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []


def test_an_unsampled_parent_is_followed_and_the_answer_unchanged() -> None:
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    with recording() as recorder, serving(traced_settings()) as (_running, stub):
        expected = _answer(stub.Check(erin_on_github(), timeout=10))
        recorder.wait_for_calls(CHECK_SPAN, 1)
        recorder.clear()
        assert (
            _answer(stub.Check(erin_on_github(), metadata=metadata(unsampled), timeout=10))
            == expected
        )
        stub.Check(erin_on_github(), metadata=metadata(), timeout=10)
        [call] = recorder.wait_for_calls(CHECK_SPAN, 1)  # only the sampled call's
    assert len(recorder.named(CHECK_SPAN)) == 1 and call.context.trace_flags.sampled
