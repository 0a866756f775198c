"""Unit tests of the proto <-> domain conversion (no server needed)."""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from policy_engine.api import pdp_pb2
from policy_engine.client import (
    MAX_ATTRIBUTE_NESTING,
    MAX_SAFE_INTEGER,
    RequestValueError,
    check_request,
)
from policy_engine.config import RequestLimits
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import (
    Decision,
    Effect,
    Layer,
    LayerTrace,
    Reason,
    RuleResult,
    RuleTrace,
)
from policy_engine.domain.request import CheckRequest, ConnectionState, SubjectKind
from policy_engine.server.convert import (
    RequestConverter,
    ResponseBuilder,
    add_response,
    add_result,
    batch_from,
    new_decision_id,
    new_decision_ids,
    next_decision_id,
    response_from,
    stamp,
    timestamp_to_datetime,
)

LIMITS = RequestLimits()


@pytest.fixture
def converter() -> RequestConverter:
    return RequestConverter(LIMITS)


def _struct(value: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def _request(**kwargs: object) -> pdp_pb2.CheckRequest:
    base = pdp_pb2.CheckRequest(
        organization="acme",
        subject=pdp_pb2.Subject(id="alice"),
        application=pdp_pb2.Application(id="pr-reviewer"),
        integration=pdp_pb2.Integration(id="github"),
        scope="repo",
    )
    base.MergeFrom(pdp_pb2.CheckRequest(**kwargs))
    return base


def test_plain_fields(converter: RequestConverter) -> None:
    msg = _request(
        subject=pdp_pb2.Subject(access_token="tok"),
        context=pdp_pb2.RequestContext(client_ip="10.0.0.1", session_id="s1"),
        request_id="r-1",
        explain=True,
    )
    req, problems = converter.convert(msg)
    assert problems == ()
    assert req.organization == "acme"
    assert req.subject.id == "alice"
    assert req.subject.access_token == "tok"
    assert "tok" not in repr(req)
    assert req.application.id == "pr-reviewer"
    assert req.integration.id == "github"
    assert req.scope == "repo"
    assert req.context.client_ip == "10.0.0.1"
    assert req.context.session_id == "s1"
    assert req.context.time is None
    assert req.request_id == "r-1"
    assert req.explain is True


def test_unset_messages_read_as_empty(converter: RequestConverter) -> None:
    req, problems = converter.convert(pdp_pb2.CheckRequest())
    assert problems == ()
    assert req.subject.id == ""
    assert req.subject.kind is SubjectKind.USER
    assert req.subject.attributes == {}
    assert req.application.attributes == {}
    assert req.context.connection is ConnectionState.UNKNOWN
    assert req.context.attributes == {}
    assert req.explain is False


def test_struct_value_types(converter: RequestConverter) -> None:
    attrs = _struct(
        {
            "groups": ["engineering", "oncall"],
            "level": 3,
            "ratio": 0.5,
            "big": 1e300,
            "admin": True,
            "nothing": None,
            "nested": {"a": {"b": [1, 2.5, "x", None, False]}},
        }
    )
    attrs.fields["nan"].number_value = math.nan
    attrs.fields["inf"].number_value = math.inf
    attrs.fields["unset"].CopyFrom(struct_pb2.Value())  # a Value with no kind at all
    req, _ = converter.convert(_request(subject=pdp_pb2.Subject(attributes=attrs)))
    got = req.subject.attributes
    assert got["groups"] == ["engineering", "oncall"]
    assert got["level"] == 3 and type(got["level"]) is int
    assert got["ratio"] == 0.5 and type(got["ratio"]) is float
    assert type(got["big"]) is float  # beyond int64: stays a float
    assert got["admin"] is True
    assert got["nothing"] is None
    assert got["unset"] is None
    assert got["nested"] == {"a": {"b": [1, 2.5, "x", None, False]}}
    assert type(got["nested"]["a"]["b"][0]) is int
    assert math.isnan(got["nan"])
    assert got["inf"] == math.inf
    assert type(got) is dict and type(got["groups"]) is list


def test_all_attribute_maps_converted(converter: RequestConverter) -> None:
    msg = _request(
        application=pdp_pb2.Application(attributes=_struct({"owner": "team-a"})),
        integration=pdp_pb2.Integration(attributes=_struct({"tier": 2})),
        context=pdp_pb2.RequestContext(attributes=_struct({"ticket": "T-1"})),
    )
    req, _ = converter.convert(msg)
    assert req.application.attributes == {"owner": "team-a"}
    assert req.integration.attributes == {"tier": 2}
    assert req.context.attributes == {"ticket": "T-1"}


def _nested(depth: int) -> pdp_pb2.CheckRequest:
    """A request whose subject attributes are `depth` maps deep, built in memory.

    In memory there is no limit; from the wire, protobuf's parser stops at 100 message levels
    (about 33 Struct levels inside a CheckRequest).
    """
    msg = _request()
    cur = msg.subject.attributes
    for _ in range(depth - 1):
        cur = cur.fields["a"].struct_value
    cur.fields["leaf"].string_value = "x"
    return msg


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_nesting_within_limits_is_exact(converter: RequestConverter) -> None:
    req, _ = converter.convert(_nested(LIMITS.max_attribute_depth))
    assert _depth(req.subject.attributes) == LIMITS.max_attribute_depth


@pytest.mark.parametrize("depth", [33, 500])
def test_pathological_nesting_is_bounded_but_still_too_deep(
    converter: RequestConverter, depth: int
) -> None:
    msg = _nested(depth)
    if depth <= 33:  # the deepest the wire allows
        msg = pdp_pb2.CheckRequest.FromString(msg.SerializeToString())
    started = time.perf_counter()
    req, _ = converter.convert(msg)
    assert time.perf_counter() - started < 0.01
    got = _depth(req.subject.attributes)
    # Deep enough that validation must reject it, whatever its counting convention.
    assert LIMITS.max_attribute_depth + 2 <= got <= LIMITS.max_attribute_depth + 4


def test_deep_lists_are_bounded(converter: RequestConverter) -> None:
    msg = _request()
    value = msg.subject.attributes.fields["l"]
    for _ in range(500):
        value = value.list_value.values.add()
    value.string_value = "x"
    req, _ = converter.convert(msg)
    assert LIMITS.max_attribute_depth + 2 <= _depth(req.subject.attributes) < 20


def test_wide_maps_are_truncated_past_the_entry_limit(converter: RequestConverter) -> None:
    msg = _request()
    for i in range(50_000):
        msg.subject.attributes.fields[f"k{i}"].number_value = i
    started = time.perf_counter()
    req, _ = converter.convert(msg)
    assert time.perf_counter() - started < 0.01
    assert len(req.subject.attributes) == LIMITS.max_attributes + 1  # still over: rejected


def test_timestamp(converter: RequestConverter) -> None:
    ts = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789)
    req, problems = converter.convert(_request(context=pdp_pb2.RequestContext(time=ts)))
    assert problems == ()
    assert req.context.time == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert req.context.time.tzinfo is UTC


def test_epoch_timestamp_is_present_not_none(converter: RequestConverter) -> None:
    msg = _request(context=pdp_pb2.RequestContext(time=timestamp_pb2.Timestamp()))
    req, _ = converter.convert(msg)
    assert req.context.time == datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (-(2**62), 0), (0, -1), (0, 1_000_000_000)],
)
def test_invalid_timestamps_become_validation_reasons(
    converter: RequestConverter, seconds: int, nanos: int
) -> None:
    ts = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    assert timestamp_to_datetime(ts) is None
    req, problems = converter.convert(_request(context=pdp_pb2.RequestContext(time=ts)))
    assert req.context.time is None
    assert [(p.code, p.field, p.layer) for p in problems] == [
        (ErrorCode.VALIDATION_ERROR, "context.time", Layer.SYSTEM)
    ]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (pdp_pb2.SUBJECT_KIND_UNSPECIFIED, SubjectKind.USER),
        (pdp_pb2.SUBJECT_KIND_USER, SubjectKind.USER),
        (pdp_pb2.SUBJECT_KIND_SERVICE_ACCOUNT, SubjectKind.SERVICE_ACCOUNT),
        (pdp_pb2.SUBJECT_KIND_EXTERNAL_USER, SubjectKind.EXTERNAL_USER),
    ],
)
def test_subject_kinds(converter: RequestConverter, kind: int, expected: SubjectKind) -> None:
    req, problems = converter.convert(_request(subject=pdp_pb2.Subject(kind=kind)))
    assert req.subject.kind is expected
    assert problems == ()


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (pdp_pb2.CONNECTION_STATE_UNSPECIFIED, ConnectionState.UNKNOWN),
        (pdp_pb2.CONNECTION_STATE_ACTIVE, ConnectionState.ACTIVE),
        (pdp_pb2.CONNECTION_STATE_ABSENT, ConnectionState.ABSENT),
    ],
)
def test_connection_states(
    converter: RequestConverter, state: int, expected: ConnectionState
) -> None:
    msg = _request(context=pdp_pb2.RequestContext(connection=state))
    req, problems = converter.convert(msg)
    assert req.context.connection is expected
    assert problems == ()


def test_unknown_enum_numbers_fail_closed(converter: RequestConverter) -> None:
    # proto3 enums are open: a newer broker may send numbers this server does not know.
    msg = _request(subject=pdp_pb2.Subject(kind=42), context=pdp_pb2.RequestContext(connection=7))
    msg = pdp_pb2.CheckRequest.FromString(msg.SerializeToString())
    _, problems = converter.convert(msg)
    assert [p.field for p in problems] == ["subject.kind", "context.connection"]
    assert all(p.code is ErrorCode.VALIDATION_ERROR for p in problems)


# --- responses -------------------------------------------------------------------------------


@pytest.fixture
def builder() -> ResponseBuilder:
    return ResponseBuilder("https://docs.example.test/")


def test_allow_response(builder: ResponseBuilder) -> None:
    decision = Decision(effect=Effect.ALLOW, reasons=(), revision="rev-1")
    resp = builder.response(decision, request_id="r-9", explain=False)
    assert resp.effect == pdp_pb2.EFFECT_ALLOW
    assert list(resp.reasons) == []
    assert resp.policy_revision == "rev-1"
    assert resp.request_id == "r-9"
    assert len(resp.decision_id) == 32 and int(resp.decision_id, 16) >= 0
    assert resp.cached is False
    assert resp.cache_level == pdp_pb2.CACHE_LEVEL_NONE
    assert not resp.HasField("explain")


def test_decision_ids_are_fresh(builder: ResponseBuilder) -> None:
    decision = Decision(effect=Effect.ALLOW, reasons=(), revision="r")
    ids = {builder.response(decision, request_id="", explain=False).decision_id for _ in range(50)}
    assert len(ids) == 50


def test_deny_reasons(builder: ResponseBuilder) -> None:
    reasons = (
        Reason(ErrorCode.POLICY_DENIED, Layer.ORG, "acme-org", "no-delete", "no deleting repos"),
        Reason(ErrorCode.VALIDATION_ERROR, Layer.SYSTEM, "", "", "must not be empty", "scope"),
        Reason(ErrorCode.AUTHORIZATION_REQUIRED, Layer.SYSTEM, "", "", "token expired"),
    )
    decision = Decision(effect=Effect.DENY, reasons=reasons, revision="rev-2")
    resp = builder.response(decision, request_id="", explain=False)
    assert resp.effect == pdp_pb2.EFFECT_DENY
    first, second, third = resp.reasons
    assert first.code == "kontext_policy_denied"
    assert first.http_status == 403
    assert first.layer == pdp_pb2.LAYER_ORG
    assert first.policy == "acme-org" and first.rule == "no-delete"
    assert first.message == "no deleting repos"
    assert first.docs_url == "https://docs.example.test/errors/kontext_policy_denied"
    assert first.field == ""
    assert second.code == "kontext_validation_error"
    assert second.http_status == 400
    assert second.layer == pdp_pb2.LAYER_SYSTEM
    assert second.field == "scope"
    assert third.http_status == 401
    assert third.docs_url.endswith("/errors/kontext_authorization_required")


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_maps(builder: ResponseBuilder, code: ErrorCode) -> None:
    decision = Decision(
        effect=Effect.DENY, reasons=(Reason(code, Layer.USER, "p", "r", "m"),), revision=""
    )
    (reason,) = builder.response(decision, request_id="", explain=False).reasons
    assert reason.code == code.value
    assert reason.http_status == code.http_status
    assert reason.layer == pdp_pb2.LAYER_USER
    assert reason.docs_url == f"https://docs.example.test/errors/{code.value}"


def _traced_decision() -> Decision:
    return Decision(
        effect=Effect.DENY,
        reasons=(Reason(ErrorCode.POLICY_DENIED, Layer.APPLICATION, "pr", "only-github", "no"),),
        revision="rev-3",
        trace=(
            LayerTrace(
                Layer.ORG,
                Effect.ALLOW,
                False,
                (
                    RuleTrace("org", "eng", Effect.ALLOW, RuleResult.MATCHED),
                    RuleTrace("org", "bad", Effect.DENY, RuleResult.ERROR, "no such key: x"),
                ),
            ),
            LayerTrace(Layer.USER, Effect.ALLOW, True),
            LayerTrace(
                Layer.APPLICATION,
                Effect.DENY,
                False,
                (RuleTrace("pr", "only-github", Effect.DENY, RuleResult.NOT_MATCHED),),
            ),
        ),
    )


def test_explain_trace_only_when_asked(builder: ResponseBuilder) -> None:
    decision = _traced_decision()
    assert not builder.response(decision, request_id="", explain=False).HasField("explain")
    resp = builder.response(decision, request_id="", explain=True)
    assert resp.HasField("explain")
    org, user, app = resp.explain.layers
    assert (org.layer, org.effect, org.by_default) == (
        pdp_pb2.LAYER_ORG,
        pdp_pb2.EFFECT_ALLOW,
        False,
    )
    assert [(r.rule, r.effect, r.result, r.detail) for r in org.rules] == [
        ("eng", pdp_pb2.EFFECT_ALLOW, pdp_pb2.RULE_RESULT_MATCHED, ""),
        ("bad", pdp_pb2.EFFECT_DENY, pdp_pb2.RULE_RESULT_ERROR, "no such key: x"),
    ]
    assert org.rules[0].policy == "org"
    assert (user.layer, user.by_default, len(user.rules)) == (pdp_pb2.LAYER_USER, True, 0)
    assert app.layer == pdp_pb2.LAYER_APPLICATION
    assert app.rules[0].result == pdp_pb2.RULE_RESULT_NOT_MATCHED


def test_explain_asked_but_nothing_traced_is_present_and_empty(builder: ResponseBuilder) -> None:
    decision = Decision(effect=Effect.ALLOW, reasons=(), revision="")
    resp = builder.response(decision, request_id="", explain=True)
    assert resp.HasField("explain")
    assert len(resp.explain.layers) == 0


def test_long_lists_are_truncated_past_the_entry_limit(converter: RequestConverter) -> None:
    msg = _request()
    values = msg.subject.attributes.fields["l"].list_value.values
    for i in range(50_000):
        values.add().number_value = i
    started = time.perf_counter()
    req, _ = converter.convert(msg)
    assert time.perf_counter() - started < 0.01
    assert req.subject.attributes["l"] == list(range(LIMITS.max_attributes + 1))


def test_decision_ids_are_uuid4() -> None:
    for _ in range(200):
        value = new_decision_id()
        parsed = uuid.UUID(hex=value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == value


def test_batched_and_pooled_decision_ids_are_uuid4_and_unique() -> None:
    ids = new_decision_ids(300) + [next_decision_id() for _ in range(600)]
    assert len(set(ids)) == len(ids)
    for raw in ids:
        value = raw.decode()
        parsed = uuid.UUID(hex=value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == value


# --- cached answers as bytes -----------------------------------------------------------------


def _deny() -> Decision:
    return Decision(
        effect=Effect.DENY,
        reasons=(Reason(ErrorCode.POLICY_DENIED, Layer.ORG, "p", "r", "no " * 60),),
        revision="rev-1",
    )


@pytest.mark.parametrize(
    ("level", "request_id"),
    [
        (pdp_pb2.CACHE_LEVEL_NONE, ""),
        (pdp_pb2.CACHE_LEVEL_LOCAL, "req-1"),
        (pdp_pb2.CACHE_LEVEL_REDIS, "r" * 200),  # a length that needs a two-byte varint
    ],
)
def test_a_stamped_template_is_the_full_response(
    builder: ResponseBuilder, level: int, request_id: str
) -> None:
    decision = _deny()
    template = builder.template(decision)
    resp = response_from(stamp(template, b"ab" * 16, request_id, level))
    plain = builder.response(decision, request_id=request_id, explain=False)
    assert list(resp.reasons) == list(plain.reasons)
    assert (resp.effect, resp.policy_revision) == (plain.effect, plain.policy_revision)
    assert resp.decision_id == "ab" * 16
    assert resp.request_id == request_id
    assert resp.cache_level == level
    assert resp.cached is (level != pdp_pb2.CACHE_LEVEL_NONE)
    assert not resp.HasField("explain")


def test_a_batch_is_assembled_from_framed_pieces(builder: ResponseBuilder) -> None:
    template = builder.template(_deny())
    explained = builder.response(_deny(), request_id="x", explain=True)
    parts: list[bytes] = []
    add_result(parts, template, b"1" * 32, "a", pdp_pb2.CACHE_LEVEL_LOCAL)
    add_response(parts, explained.SerializeToString())
    add_result(parts, template, b"2" * 32, "", pdp_pb2.CACHE_LEVEL_NONE)
    batch = batch_from(parts)
    assert [r.decision_id for r in batch.results] == ["1" * 32, explained.decision_id, "2" * 32]
    assert [r.request_id for r in batch.results] == ["a", "x", ""]
    assert batch.results[1] == explained
    assert batch.results[0].cache_level == pdp_pb2.CACHE_LEVEL_LOCAL
    assert batch.results[0].reasons[0].message == "no " * 60


# --- the broker's builder -> wire -> converter: values arrive exactly, or are refused -----------


def _through_the_wire(converter: RequestConverter, **fields: Any) -> CheckRequest:
    """What the server's engine sees of `check_request(...)`: bytes parsed, then converted."""
    msg = check_request("acme", "alice", "pr-reviewer", "github", "repo", **fields)
    request, problems = converter.convert(pdp_pb2.CheckRequest.FromString(msg.SerializeToString()))
    assert problems == ()
    return request


EXACT_VALUES: dict[str, Any] = {
    "largest safe integer": 2**53 - 1,
    "smallest safe integer": -(2**53 - 1),
    "zero": 0,
    "bool true": True,  # stays a bool, never the number 1
    "bool false": False,
    "fraction": 0.1,
    "huge float": 1e300,
    "tiny float": -5e-324,
    "unicode": "Zoë 🚀 日本 \u2028 \x00",
    "empty string": "",
    "null": None,
    "empty list": [],
    "empty map": {},
    "nested": {"teams": [{"roles": ["admin", ""], "level": 2}, [[1, "x"], None]]},
}


@pytest.mark.parametrize("name", EXACT_VALUES)
def test_builder_values_arrive_exactly(converter: RequestConverter, name: str) -> None:
    value = EXACT_VALUES[name]
    got = _through_the_wire(
        converter,
        subject_attributes={"v": value},
        application_attributes={"v": value},
        integration_attributes={"v": value},
        context_attributes={"v": value},
    )
    for attributes in (
        got.subject.attributes,
        got.application.attributes,
        got.integration.attributes,
        got.context.attributes,
    ):
        assert attributes == {"v": value}
        assert _types(attributes["v"]) == _types(value)


def _types(value: Any) -> Any:
    """The value's shape with each scalar replaced by its exact type (1 == True == 1.0)."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_types(v) for v in value]
    return type(value)


def test_builder_integral_floats_arrive_as_the_server_reads_them(
    converter: RequestConverter,
) -> None:
    # The wire has one number type; the server reads integral doubles as ints, and so does
    # `pdp eval`, which decodes through this same path.
    got = _through_the_wire(converter, subject_attributes={"a": 3.0, "b": -0.0, "c": 2.0**60})
    assert got.subject.attributes == {"a": 3, "b": 0, "c": 2**60}
    assert all(type(v) is int for v in got.subject.attributes.values())


def test_builder_plain_fields_and_time_arrive_exactly(converter: RequestConverter) -> None:
    when = datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=-5)))
    got = _through_the_wire(
        converter,
        subject_kind="external_user",
        access_token="tok",
        connected=False,
        client_ip="::1",
        session_id="s-é",
        time=when,
        request_id="r-1",
        explain=True,
    )
    assert got.subject.kind is SubjectKind.EXTERNAL_USER
    assert got.context.connection is ConnectionState.ABSENT
    assert got.context.time == when and got.context.time.tzinfo is UTC
    assert (got.subject.access_token, got.context.client_ip) == ("tok", "::1")
    assert (got.context.session_id, got.request_id, got.explain) == ("s-é", "r-1", True)


def _cycle() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _nested_map(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"x": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


# name -> (check_request keywords, the path the error names, words of the message)
REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {
    "2^53": ({"subject_attributes": {"n": 2**53}}, "subject.attributes.n", "9007199254740992"),
    "2^53+1": (
        {"subject_attributes": {"account": 2**53 + 1}},
        "subject.attributes.account",
        "would arrive as 9007199254740992.0",
    ),
    "-(2^53+1) nested": (
        {"context_attributes": {"a": [0, {"b": -(2**53 + 1)}]}},
        "context.attributes.a[1].b",
        "-9007199254740993",
    ),
    "2^64 in a tuple": (
        {"application_attributes": {"ids": (1, 2**64)}},
        "application.attributes.ids[1]",
        "18446744073709551616",
    ),
    "5000 digits": (
        {"integration_attributes": {"n": 10**4999}},
        "integration.attributes.n",
        "about 5000 digits",
    ),
    "nan": ({"subject_attributes": {"f": math.nan}}, "subject.attributes.f", "not a finite"),
    "infinity": ({"subject_attributes": {"f": math.inf}}, "subject.attributes.f", "not a finite"),
    "-infinity": ({"subject_attributes": {"f": -math.inf}}, "subject.attributes.f", "finite"),
    "lone surrogate value": (
        {"subject_attributes": {"s": "ok\ud800"}},
        "subject.attributes.s",
        "lone surrogate at position 2",
    ),
    "lone surrogate key": (
        {"subject_attributes": {"\udcff": 1}},
        "subject.attributes key '\\udcff'",
        "lone surrogate",
    ),
    "lone surrogate id": ({}, "subject.id", "lone surrogate"),  # subject given below
    "non-string key": ({"subject_attributes": {1: "x"}}, "subject.attributes", "keys must"),
    "bytes": ({"subject_attributes": {"b": b"x"}}, "subject.attributes.b", "bytes"),
    "set": ({"subject_attributes": {"s": {"x"}}}, "subject.attributes.s", "set"),
    "datetime": (
        {"subject_attributes": {"d": datetime(2024, 1, 1, tzinfo=UTC)}},
        "subject.attributes.d",
        "datetime",
    ),
    "not a mapping": ({"subject_attributes": ["x"]}, "subject.attributes", "mapping"),
    "cycle": ({"subject_attributes": {"loop": _cycle()}}, "subject.attributes.loop", "deeper"),
    "too deep": ({"subject_attributes": _nested_map(MAX_ATTRIBUTE_NESTING + 1)}, "subject", "30"),
    "unknown subject kind": ({"subject_kind": "robot"}, "subject.kind", "'robot'"),
    "connected not a bool": ({"connected": 1}, "context.connection", "True, False or None"),
    "naive time": ({"time": datetime(2024, 1, 1)}, "context.time", "timezone-aware"),
    "time beyond year 9999": (
        {"time": datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-2)))},
        "context.time",
        "outside years 1-9999",
    ),
    "id not a string": ({"request_id": 7}, "request_id", "must be a string"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_builder_refuses_what_the_wire_cannot_carry_naming_it(name: str) -> None:
    fields, path, words = REFUSED[name]
    subject = "\udcffalice" if name == "lone surrogate id" else "alice"
    with pytest.raises(RequestValueError) as refused:
        check_request("acme", subject, "pr-reviewer", "github", "repo", **fields)
    assert isinstance(refused.value, ValueError)
    assert refused.value.path.startswith(path)
    assert words in str(refused.value)
    assert str(refused.value).startswith(refused.value.path + ": ")


def test_builder_bounds_are_the_wires() -> None:
    # The last integer refused is the first a double cannot tell from its neighbour.
    assert float(MAX_SAFE_INTEGER + 2) == float(MAX_SAFE_INTEGER + 1)
    assert float(MAX_SAFE_INTEGER) != float(MAX_SAFE_INTEGER + 1)
    # Anything the builder accepts parses again: nesting at the bound still fits protobuf's
    # recursion limit, in a batch too (one message level more).
    deepest = check_request(
        "acme",
        "alice",
        "app",
        "github",
        "repo",
        subject_attributes=_nested_map(MAX_ATTRIBUTE_NESTING),
    )
    batch = pdp_pb2.CheckBatchRequest(items=[deepest]).SerializeToString()
    assert pdp_pb2.CheckBatchRequest.FromString(batch).items[0] == deepest
