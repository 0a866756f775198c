"""Random and malformed requests against a live server: no crash, no hang, no wrongful allow.

The server audits every decision: whatever the input, each record must be written (none lost
to a build error), match the schema and chain intact.

`make test` runs a short pass; `make fuzz FUZZ_SECONDS=600` keeps going with fresh seeds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit import AuditLog
from policy_engine.config import Settings
from policy_engine.engine import decide
from policy_engine.policy import load_policy_set
from policy_engine.server.convert import RequestConverter
from policy_engine.server.service import PolicyDecisionServicer
from tests.audit.support import assert_audited_intact, module_audit_log
from tests.server.harness import EXAMPLE_POLICIES, running

EXAMPLES = int(os.environ.get("PDP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
POLICIES = load_policy_set(EXAMPLE_POLICIES)
SETTINGS = Settings()
ALICE = pdp_pb2.CheckRequest(
    organization="acme",
    subject=pdp_pb2.Subject(id="alice"),
    scope="repo",
    application=pdp_pb2.Application(id="pr-reviewer"),
    integration=pdp_pb2.Integration(id="github"),
)
ALICE.subject.attributes.update({"groups": ["engineering"]})

# Mostly plausible values, with hostile ones mixed in.
words = st.one_of(
    st.sampled_from(
        [
            "acme",
            "globex",
            "alice",
            "bob",
            "pr-reviewer",
            "github",
            "linear",
            "repo",
            "delete_repo",
            "admin:org",
            "engineering",
            "",
            " ",
            '"',
            "\\",
            "\x00",
            "é",
            "x" * 257,
            "a b",
            "read:*",
            "\n",
            # External user IDs of globex's identity mapping, its namespaces and applications.
            "c-1029",
            "partner-user-123",
            "contractors",
            "partner-portal",
            "release-bot",
            "support-copilot",
        ]
    ),
    st.text(max_size=12),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.integers(), words)
json_value = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(words, children, max_size=4),
    max_leaves=10,
)
attributes = st.dictionaries(words, json_value, max_size=5)


def struct(values: dict) -> struct_pb2.Struct | None:
    result = struct_pb2.Struct()
    try:
        result.update({k: v for k, v in values.items() if isinstance(k, str)})
    except (ValueError, TypeError):
        return None
    return result


@st.composite
def check_requests(draw: st.DrawFn) -> pdp_pb2.CheckRequest:
    request = pdp_pb2.CheckRequest(
        organization=draw(words),
        scope=draw(words),
        request_id=draw(words),
        explain=draw(st.booleans()),
        subject=pdp_pb2.Subject(
            id=draw(words),
            kind=draw(st.integers(-1, 5)),
            access_token=draw(st.sampled_from(["", "x.y.z", "not a jwt"])),
            namespace=draw(words),
        ),
        application=pdp_pb2.Application(id=draw(words)),
        integration=pdp_pb2.Integration(id=draw(words)),
        context=pdp_pb2.RequestContext(
            connection=draw(st.integers(-1, 4)),
            client_ip=draw(st.sampled_from(["", "10.20.1.1", "::1", "999.1.1.1", "x"])),
            session_id=draw(words),
        ),
    )
    for target in (
        request.subject.attributes,
        request.application.attributes,
        request.integration.attributes,
        request.context.attributes,
    ):
        converted = struct(draw(attributes))
        if converted is not None:
            target.CopyFrom(converted)
    return request


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditLog]:
    with module_audit_log(tmp_path_factory.mktemp("fuzz-audit")) as log:
        yield log


@pytest.fixture(scope="module")
def channel(audit: AuditLog) -> Iterator[grpc.Channel]:
    # The cache stays on: fuzzed requests also exercise its keying and validation bypass.
    servicer = PolicyDecisionServicer(lambda: POLICIES, SETTINGS, audit=audit)
    with running(servicer, SETTINGS) as live:
        yield live


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pdp_pb2_grpc.PolicyDecisionServiceStub:
    return pdp_pb2_grpc.PolicyDecisionServiceStub(channel)


def expected_effect(request: pdp_pb2.CheckRequest) -> int:
    domain, problems = RequestConverter(SETTINGS.limits).convert(request)
    if problems:
        return pdp_pb2.EFFECT_DENY
    decision = decide(POLICIES, domain, now=datetime.now(UTC), limits=SETTINGS.limits)
    return pdp_pb2.EFFECT_ALLOW if decision.allowed else pdp_pb2.EFFECT_DENY


def assert_responsive(stub: pdp_pb2_grpc.PolicyDecisionServiceStub) -> None:
    assert stub.Check(ALICE, timeout=5).effect == pdp_pb2.EFFECT_ALLOW


@FUZZ
@given(request=check_requests())
def test_random_checks_never_crash_or_wrongly_allow(stub, request) -> None:
    try:
        response = stub.Check(request, timeout=5)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "kontext_validation_error" in str(error.trailing_metadata()) or error.details()
        return
    assert response.effect in (pdp_pb2.EFFECT_ALLOW, pdp_pb2.EFFECT_DENY)
    if response.effect == pdp_pb2.EFFECT_ALLOW:
        assert expected_effect(request) == pdp_pb2.EFFECT_ALLOW
        assert not response.reasons
    else:
        assert response.reasons


@FUZZ
@given(requests=st.lists(check_requests(), min_size=1, max_size=8))
def test_random_batches_answer_every_item(stub, requests) -> None:
    response = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=requests), timeout=10)
    assert len(response.results) == len(requests)
    for request, result in zip(requests, response.results, strict=True):
        if result.effect == pdp_pb2.EFFECT_ALLOW:
            assert expected_effect(request) == pdp_pb2.EFFECT_ALLOW


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_random_bytes_are_refused_cleanly(channel, payload: bytes) -> None:
    raw_check = channel.unary_unary(
        "/kontext.pdp.v1.PolicyDecisionService/Check",
        request_serializer=lambda raw: raw,
        response_deserializer=pdp_pb2.CheckResponse.FromString,
    )
    try:
        response = raw_check(payload, timeout=5)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    else:  # the bytes happened to parse: the answer must be what the engine says
        if response.effect == pdp_pb2.EFFECT_ALLOW:
            assert expected_effect(pdp_pb2.CheckRequest.FromString(payload)) == response.effect


def test_still_responsive_after_fuzzing(stub) -> None:
    assert_responsive(stub)


def test_every_fuzzed_decision_was_audited_intact(stub, audit: AuditLog) -> None:
    assert_audited_intact(audit)
