"""Record building: what auditors need, nothing secret, the fast path equal to the reference."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from policy_engine.audit.canonical import assemble, canonical, split
from policy_engine.audit.chain import ZERO_HASH
from policy_engine.audit.record import (
    MAX_RAW_LENGTH,
    REDACTED,
    SCHEMA_VERSION,
    build_invalid_record,
    build_record,
    encode_record,
    format_time,
    token_sha256,
)
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer, Reason, RuleMatch
from policy_engine.domain.request import CheckRequest, RequestContext, Resource, Subject
from tests.audit.support import ALLOW, DENY, TOKEN, make_request, schema_errors

STREAM = "ab" * 16


def chained(record: dict, seq: int = 1) -> dict:
    """The record as a chain would store it (for schema checks)."""
    full = dict(record, stream=STREAM, seq=seq, prev_hash=ZERO_HASH)
    full["hash"] = "0" * 64
    return full


def test_decision_record_has_every_field_and_no_token() -> None:
    request = make_request()
    record = build_record(
        request,
        DENY,
        decision_id="d-1",
        cache_level="local",
        latency_ms=0.1234,
        instance="host:42",
        time=1_700_000_000.25,
    )
    assert record["type"] == "decision"
    assert record["schema_version"] == SCHEMA_VERSION == 5
    assert record["decision_id"] == "d-1"
    assert record["time"] == "2023-11-14T22:13:20.250000Z"
    assert record["organization"] == "acme"
    assert record["subject"]["id"] == "alice"
    assert record["subject"]["kind"] == "user"
    assert record["subject"]["token_sha256"] == token_sha256(TOKEN)
    assert record["subject"]["attributes"]["groups"] == ["engineering"]
    assert record["application"] == {"id": "pr-reviewer", "attributes": {"owner": "platform"}}
    assert record["integration"]["id"] == "github"
    assert record["scope"] == "repo"
    assert record["context"]["connection"] == "active"
    assert record["context"]["client_ip"] == "10.1.2.3"
    assert record["decision"] == "DENY"
    assert record["reasons"][0]["code"] == "kontext_policy_denied"
    assert record["reasons"][0]["http_status"] == 403
    assert record["reasons"][0]["rule"] == "no-repository-deletion"
    assert record["policy_revision"] == "rev-0123456789abcdef"
    assert record["cache_level"] == "local"
    assert record["latency_ms"] == 0.123
    assert record["request_id"] == "req-1"
    assert record["instance"] == "host:42"
    assert not schema_errors(chained(record))
    text = json.dumps(record)
    assert TOKEN not in text
    assert "RECOGNISABLE-SUBJECT-TOKEN" not in text


def test_matched_rules_come_from_the_decision() -> None:
    none_listed = build_record(make_request(), DENY, decision_id="d", instance="h:1", time=0.0)
    assert none_listed["matched_rules"] == []
    decision = Decision(
        Effect.ALLOW,
        (),
        "rev",
        matched_rules=(RuleMatch(Layer.ORG, "eng", "may-use", Effect.ALLOW),),
    )
    record = build_record(make_request(), decision, decision_id="d", instance="h:1", time=0.0)
    assert record["matched_rules"] == [
        {"layer": "org", "policy": "eng", "rule": "may-use", "effect": "ALLOW"}
    ]


def test_credential_named_attributes_are_redacted_at_any_depth() -> None:
    request = make_request(
        subject_attributes={
            "groups": ["eng"],
            "access_token": TOKEN,
            "nested": {"Password": "hunter2", "list": [{"api_key": "k-123"}]},
        }
    )
    record = build_record(request, ALLOW, decision_id="d", instance="h:1", time=0.0)
    attributes = record["subject"]["attributes"]
    assert attributes["access_token"] == REDACTED
    assert attributes["nested"]["Password"] == REDACTED
    assert attributes["nested"]["list"][0]["api_key"] == REDACTED
    assert attributes["groups"] == ["eng"]
    parts = encode_record(request, ALLOW, decision_id="d", instance="h:1", time=0.0)
    text = assemble(parts, STREAM, 1, ZERO_HASH)
    for secret in (TOKEN, "hunter2", "k-123"):
        assert secret not in text
        assert secret not in json.dumps(record)


def test_no_token_means_null_hash() -> None:
    record = build_record(make_request(token=""), ALLOW, decision_id="d", instance="h:1", time=0.0)
    assert record["subject"]["token_sha256"] is None


def test_validation_failures_are_bounded_and_carry_no_attributes() -> None:
    huge = "x" * 10_000
    request = make_request(subject=huge, scope="bad scope", request_id=huge)
    decision = Decision(
        Effect.DENY,
        (
            Reason(
                ErrorCode.VALIDATION_ERROR,
                Layer.SYSTEM,
                "",
                "",
                "must be at most 256 characters",
                field="subject.id",
            ),
        ),
        "rev",
    )
    record = build_record(request, decision, decision_id="d", instance="h:1", time=0.0)
    assert len(record["subject"]["id"]) == MAX_RAW_LENGTH
    assert record["truncated"] == ["subject.id", "request_id"]
    assert record["subject"]["attributes"] == {}
    assert record["reasons"][0]["field"] == "subject.id"
    assert TOKEN not in json.dumps(record)
    assert not schema_errors(chained(record))


def test_invalid_record_from_raw_fields() -> None:
    decision = Decision(
        Effect.DENY,
        (Reason(ErrorCode.VALIDATION_ERROR, Layer.SYSTEM, "", "", "unparseable", field=""),),
        "rev",
    )
    record = build_invalid_record(
        decision,
        decision_id="d",
        instance="h:1",
        time=0.0,
        organization="acme",
        subject_id="y" * 1000,
        subject_kind=7,
        access_token=TOKEN,
        scope="a b",
    )
    assert record["subject"]["id"] == "y" * MAX_RAW_LENGTH
    assert record["subject"]["kind"] == "7"
    assert record["subject"]["token_sha256"] == token_sha256(TOKEN)
    assert record["truncated"] == ["subject.id"]
    assert TOKEN not in json.dumps(record)
    assert not schema_errors(chained(record))


def test_time_format() -> None:
    assert format_time(0) == "1970-01-01T00:00:00.000000Z"
    assert format_time(1_700_000_000.999_999_7) == "2023-11-14T22:13:21.000000Z"
    assert format_time(1_700_000_000.000_001) == "2023-11-14T22:13:20.000001Z"


# --- the fast path writes exactly the reference record ------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=8)
json_leaf |= st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
attributes = st.dictionaries(
    st.text(max_size=8) | st.sampled_from(["token", "Secret", "groups"]), json_values, max_size=4
)
text = st.text(max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    subject_attrs=attributes,
    app_attrs=attributes,
    context_attrs=attributes,
    ids=st.lists(text, min_size=8, max_size=8),
    token=text,
    latency=st.floats(min_value=0, max_value=1e6),
    deny=st.booleans(),
    broker_time=st.none() | st.datetimes(timezones=st.just(UTC)),
)
def test_fast_path_matches_the_reference_record(
    subject_attrs: dict,
    app_attrs: dict,
    context_attrs: dict,
    ids: list[str],
    token: str,
    latency: float,
    deny: bool,
    broker_time: datetime | None,
) -> None:
    request = CheckRequest(
        organization=ids[0],
        subject=Subject(ids[1], attributes=subject_attrs, access_token=token),
        application=Resource(ids[2], app_attrs),
        integration=Resource(ids[3], {}),
        scope=ids[4],
        context=RequestContext(
            client_ip=ids[5], session_id=ids[6], time=broker_time, attributes=context_attrs
        ),
        request_id=ids[7],
    )
    decision = DENY if deny else ALLOW
    kwargs = {"decision_id": "d", "latency_ms": latency, "instance": "h:1", "time": 12.5}
    reference = build_record(request, decision, **kwargs)  # type: ignore[arg-type]
    fast = encode_record(request, decision, **kwargs)  # type: ignore[arg-type]
    full = dict(reference, stream=STREAM, seq=3, prev_hash="f" * 64)
    expected = canonical(full)
    assert assemble(fast, STREAM, 3, "f" * 64) == expected
    assert assemble(split(reference), STREAM, 3, "f" * 64) == expected
