"""A cache hit's audit record, prepared once per key, equals the record built the long way."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from policy_engine.audit.chain import Chain
from policy_engine.audit.record import PreparedHit, build_record
from policy_engine.config import RequestLimits
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer, Reason, RuleMatch
from policy_engine.server.convert import RequestConverter, ResponseBuilder
from policy_engine.server.recording import HitRecords
from tests.cache.support import tuple_request

DECISION = Decision(
    Effect.DENY,
    (Reason(ErrorCode.POLICY_DENIED, Layer.ORG, "p", "r", "no"),),
    "rev-1",
    matched_rules=(RuleMatch(Layer.ORG, "p", "r", Effect.DENY),),
)
CONVERTER = RequestConverter(RequestLimits())


def _rendered(hit: PreparedHit, decision_id: str) -> dict[str, object]:
    parts = hit.prepared.render(
        decision_id=decision_id,
        cache_level="local",
        latency_ms=0.25,
        instance="host:1",
        time=1_700_000_000.5,
        request_id=hit.request_id,
        context_time=hit.context_time,
    )
    record = json.loads(Chain(signer=None, instance="host:1", sink="t").seal(parts).line)
    for key in ("stream", "seq", "prev_hash", "hash"):
        del record[key]
    return record


def test_each_hit_gets_its_own_ids_and_times_and_the_shared_rest() -> None:
    template = ResponseBuilder("https://docs.test").template(DECISION)
    records = HitRecords(CONVERTER)
    first = tuple_request(request_id="first")
    first.context.time.FromDatetime(datetime(2026, 11, 23, 10, 0, tzinfo=UTC))
    second = tuple_request(request_id="second")  # same key: request_id and time are not in it
    hits = [records(first, "key", template), records(second, "key", template)]
    assert all(isinstance(hit, PreparedHit) for hit in hits)
    assert hits[0].prepared is hits[1].prepared  # prepared once

    for msg, hit, decision_id in zip((first, second), hits, ("d1", "d2"), strict=True):
        request, _ = CONVERTER.convert(msg)
        expected = build_record(
            request,
            DECISION,
            decision_id=decision_id,
            cache_level="local",
            latency_ms=0.25,
            instance="host:1",
            time=1_700_000_000.5,
        )
        assert _rendered(hit, decision_id) == expected


def test_a_key_that_now_holds_another_answer_is_prepared_again() -> None:
    builder = ResponseBuilder("https://docs.test")
    records = HitRecords(CONVERTER)
    msg = tuple_request()
    old = records(msg, "key", builder.template(DECISION))
    allow = Decision(Effect.ALLOW, (), "rev-1")
    new = records(msg, "key", builder.template(allow))
    assert isinstance(old, PreparedHit) and isinstance(new, PreparedHit)
    assert _rendered(new, "d")["decision"] == "ALLOW" != _rendered(old, "d")["decision"]


def test_memory_is_bounded() -> None:
    template = ResponseBuilder("https://docs.test").template(DECISION)
    records = HitRecords(CONVERTER, max_entries=2)
    first = records(tuple_request(), "a", template)
    records(tuple_request(), "b", template)
    records(tuple_request(), "c", template)  # evicts "a"
    again = records(tuple_request(), "a", template)
    assert isinstance(first, PreparedHit) and isinstance(again, PreparedHit)
    assert again.prepared is not first.prepared
