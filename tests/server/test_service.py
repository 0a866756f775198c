"""The PolicyDecisionService end to end: a real server over the example policies, a real client."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import RequestLimits, Settings
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.service import SERVICE_NAME, PolicyDecisionServicer
from tests.scenarios import SCENARIOS, Scenario, token_for
from tests.server.harness import DOCS, EXAMPLE_POLICIES, running

KINDS = {
    "user": pdp_pb2.SUBJECT_KIND_USER,
    "service_account": pdp_pb2.SUBJECT_KIND_SERVICE_ACCOUNT,
    "external_user": pdp_pb2.SUBJECT_KIND_EXTERNAL_USER,
}
CONNECTIONS = {
    "unknown": pdp_pb2.CONNECTION_STATE_UNSPECIFIED,
    "active": pdp_pb2.CONNECTION_STATE_ACTIVE,
    "absent": pdp_pb2.CONNECTION_STATE_ABSENT,
}
LAYERS = {
    "system": pdp_pb2.LAYER_SYSTEM,
    "org": pdp_pb2.LAYER_ORG,
    "user": pdp_pb2.LAYER_USER,
    "application": pdp_pb2.LAYER_APPLICATION,
}
SETTINGS = Settings(docs_base_url=DOCS)


def _struct(value: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def to_proto(s: Scenario, **changes: object) -> pdp_pb2.CheckRequest:
    msg = pdp_pb2.CheckRequest(
        organization=s.organization,
        subject=pdp_pb2.Subject(
            id=s.subject,
            kind=KINDS[s.subject_kind],
            attributes=_struct(s.subject_attributes),
            access_token=token_for(s),
        ),
        application=pdp_pb2.Application(id=s.application),
        integration=pdp_pb2.Integration(id=s.integration),
        scope=s.scope,
        context=pdp_pb2.RequestContext(connection=CONNECTIONS[s.connection]),
        request_id=f"req-{s.name.replace(' ', '-')}",
    )
    msg.MergeFrom(pdp_pb2.CheckRequest(**changes))
    return msg


ALLOWED = SCENARIOS[0]
assert ALLOWED.decision == "ALLOW"


@pytest.fixture(scope="module")
def policies() -> CompiledPolicySet:
    return load_policy_set(EXAMPLE_POLICIES)


@pytest.fixture(scope="module")
def channel(policies: CompiledPolicySet) -> Iterator[grpc.Channel]:
    with running(PolicyDecisionServicer(lambda: policies, SETTINGS), SETTINGS) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pdp_pb2_grpc.PolicyDecisionServiceStub:
    return pdp_pb2_grpc.PolicyDecisionServiceStub(channel)


def rich_details(
    err: grpc.RpcError,
) -> tuple[error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, str]:
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status details"
    bad, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    return bad, info, status.message


def assert_matches(resp: pdp_pb2.CheckResponse, s: Scenario, policies: CompiledPolicySet) -> None:
    assert resp.policy_revision == policies.revision
    assert len(resp.decision_id) == 32
    if s.decision == "ALLOW":
        assert resp.effect == pdp_pb2.EFFECT_ALLOW, resp
        assert list(resp.reasons) == []
        # Every layer allowed because one of its rules did: the response names each of them.
        layers = [m.layer for m in resp.matched_rules]
        assert layers == [pdp_pb2.LAYER_ORG, pdp_pb2.LAYER_USER, pdp_pb2.LAYER_APPLICATION]
        assert all(m.effect == pdp_pb2.EFFECT_ALLOW and m.rule for m in resp.matched_rules)
        return
    assert resp.effect == pdp_pb2.EFFECT_DENY, resp
    assert resp.reasons, "a deny must carry reasons"
    matching = [r for r in resp.reasons if r.code == s.code and r.layer == LAYERS[s.layer]]
    assert matching, resp.reasons
    for reason in resp.reasons:
        assert reason.docs_url == f"{DOCS}/errors/{reason.code}"
        assert reason.http_status in (400, 401, 403, 404, 429, 500)
        assert reason.message
    if s.field:
        assert s.field in {r.field for r in resp.reasons}


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if not s.field], ids=lambda s: s.name)
def test_check_decides_every_scenario(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub, policies: CompiledPolicySet, scenario: Scenario
) -> None:
    msg = to_proto(scenario)
    resp = stub.Check(msg, timeout=10)
    assert_matches(resp, scenario, policies)
    assert resp.request_id == msg.request_id
    assert resp.cached is False and resp.cache_level == pdp_pb2.CACHE_LEVEL_NONE
    assert not resp.HasField("explain")


def test_deny_reason_details(stub: pdp_pb2_grpc.PolicyDecisionServiceStub) -> None:
    scenario = next(s for s in SCENARIOS if s.scope == "delete_repo")
    resp = stub.Check(to_proto(scenario), timeout=10)
    (reason,) = resp.reasons
    assert reason.code == "kontext_policy_denied"
    assert reason.http_status == 403
    assert reason.layer == pdp_pb2.LAYER_ORG
    assert reason.policy == "engineering-developer-tools"
    assert reason.rule == "no-repository-deletion"
    assert "Deleting repositories" in reason.message
    assert reason.docs_url == f"{DOCS}/errors/kontext_policy_denied"
    denied_by = [(m.policy, m.rule, m.effect) for m in resp.matched_rules]
    deny = pdp_pb2.EFFECT_DENY
    assert ("engineering-developer-tools", "no-repository-deletion", deny) in denied_by


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.field], ids=lambda s: s.name)
def test_check_malformed_request_is_invalid_argument(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub, scenario: Scenario
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(to_proto(scenario), timeout=10)
    err = caught.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad, info, message = rich_details(err)
    assert scenario.field in [v.field for v in bad.field_violations]
    assert all(v.description for v in bad.field_violations)
    assert info.reason == "kontext_validation_error"
    assert info.domain == "pdp.kontext.dev"
    assert info.metadata["request_id"] == to_proto(scenario).request_id
    assert scenario.field in message
    assert scenario.field in err.details()


def test_every_invalid_field_is_named(stub: pdp_pb2_grpc.PolicyDecisionServiceStub) -> None:
    msg = to_proto(ALLOWED, scope="a b")
    msg.subject.id = ""
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(msg, timeout=10)
    bad, _, message = rich_details(caught.value)
    assert {v.field for v in bad.field_violations} == {"subject.id", "scope"}
    assert "subject.id" in message and "scope" in message


def _deeply_nested(depth: int) -> pdp_pb2.CheckRequest:
    msg = to_proto(ALLOWED)
    cur = msg.subject.attributes
    for _ in range(depth - 1):
        cur = cur.fields["a"].struct_value
    cur.fields["leaf"].string_value = "x"
    return msg


def test_attributes_nested_as_deep_as_the_wire_allows_are_rejected(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(_deeply_nested(33), timeout=10)  # protobuf parses no deeper
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad, _, _ = rich_details(caught.value)
    assert bad.field_violations[0].field.startswith("subject.attributes")
    assert "deeper" in bad.field_violations[0].description


def _batch_of(item: pdp_pb2.CheckRequest) -> pdp_pb2.CheckBatchRequest:
    batch = pdp_pb2.CheckBatchRequest()
    batch.items.add().CopyFrom(item)  # CopyFrom, unlike the constructor, does not re-parse
    return batch


def test_unparseable_request_is_invalid_argument_not_internal(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
) -> None:
    for call, msg in (
        (stub.Check, _deeply_nested(90)),
        (stub.CheckBatch, _batch_of(_deeply_nested(90))),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(msg, timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        bad, info, _ = rich_details(caught.value)
        assert [v.field for v in bad.field_violations] == ["request"]
        assert "could not be parsed" in bad.field_violations[0].description
        assert info.reason == "kontext_validation_error"


def test_oversized_attribute_map_is_rejected(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
) -> None:
    msg = to_proto(ALLOWED)
    for i in range(5000):
        msg.context.attributes.fields[f"k{i}"].number_value = i
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(msg, timeout=10)
    bad, _, _ = rich_details(caught.value)
    assert bad.field_violations[0].field == "context.attributes"


def test_unknown_enum_number_is_invalid_argument(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
) -> None:
    msg = to_proto(ALLOWED)
    msg.subject.kind = 42  # a newer broker's kind: never guessed to be a user
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(msg, timeout=10)
    bad, _, _ = rich_details(caught.value)
    assert [v.field for v in bad.field_violations] == ["subject.kind"]


def test_batch_answers_in_order_and_malformed_items_deny_alone(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub, policies: CompiledPolicySet
) -> None:
    # Every scenario, validation failures included, in one batch: order must be kept.
    items = [to_proto(s) for s in SCENARIOS]
    resp = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=items), timeout=10)
    assert len(resp.results) == len(SCENARIOS)
    for scenario, item, result in zip(SCENARIOS, items, resp.results, strict=True):
        assert result.request_id == item.request_id
        assert_matches(result, scenario, policies)
    assert len({r.decision_id for r in resp.results}) == len(SCENARIOS)


def test_batch_with_a_malformed_item_in_the_middle(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
) -> None:
    good = to_proto(ALLOWED)
    bad = to_proto(ALLOWED, request_id="bad")
    bad.subject.id = ""
    resp = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[good, bad, good]), timeout=10)
    effects = [r.effect for r in resp.results]
    assert effects == [pdp_pb2.EFFECT_ALLOW, pdp_pb2.EFFECT_DENY, pdp_pb2.EFFECT_ALLOW]
    (reason,) = resp.results[1].reasons
    assert reason.code == "kontext_validation_error"
    assert reason.field == "subject.id"
    assert reason.http_status == 400
    assert reason.layer == pdp_pb2.LAYER_SYSTEM
    assert resp.results[1].request_id == "bad"


def test_empty_batch_is_invalid_argument(stub: pdp_pb2_grpc.PolicyDecisionServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.CheckBatch(pdp_pb2.CheckBatchRequest(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad, info, message = rich_details(caught.value)
    assert [v.field for v in bad.field_violations] == ["items"]
    assert info.reason == "kontext_validation_error"
    assert "items" in message


def test_oversized_batch_is_invalid_argument(policies: CompiledPolicySet) -> None:
    settings = SETTINGS.replace(limits=RequestLimits(max_batch_size=3))
    with running(PolicyDecisionServicer(lambda: policies, settings), settings) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        ok = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[to_proto(ALLOWED)] * 3), timeout=10)
        assert len(ok.results) == 3
        with pytest.raises(grpc.RpcError) as caught:
            stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[to_proto(ALLOWED)] * 4), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad, _, message = rich_details(caught.value)
    assert [v.field for v in bad.field_violations] == ["items"]
    assert "at most 3" in message


def test_explain_only_when_asked(stub: pdp_pb2_grpc.PolicyDecisionServiceStub) -> None:
    plain = stub.Check(to_proto(ALLOWED), timeout=10)
    assert not plain.HasField("explain")
    explained = stub.Check(to_proto(ALLOWED, explain=True), timeout=10)
    assert explained.HasField("explain")
    layers = [layer.layer for layer in explained.explain.layers]
    assert layers == [pdp_pb2.LAYER_ORG, pdp_pb2.LAYER_USER, pdp_pb2.LAYER_APPLICATION]
    org = explained.explain.layers[0]
    assert org.effect == pdp_pb2.EFFECT_ALLOW and not org.by_default
    assert any(
        r.rule == "engineering-may-use-developer-tools" and r.result == pdp_pb2.RULE_RESULT_MATCHED
        for r in org.rules
    )
    batch = stub.CheckBatch(
        pdp_pb2.CheckBatchRequest(items=[to_proto(ALLOWED, explain=True), to_proto(ALLOWED)]),
        timeout=10,
    )
    assert [r.HasField("explain") for r in batch.results] == [True, False]


def test_health_serving_with_a_valid_policy_set(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_health_not_serving_without_policies(policies: CompiledPolicySet) -> None:
    servicer = PolicyDecisionServicer(lambda: policies, SETTINGS)
    with running(servicer, SETTINGS, policy_ready=False) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert SERVICE_NAME == "kontext.pdp.v1.PolicyDecisionService"


def test_message_size_limit_is_enforced(policies: CompiledPolicySet) -> None:
    settings = SETTINGS.replace(limits=RequestLimits(max_message_bytes=4096))
    with running(PolicyDecisionServicer(lambda: policies, settings), settings) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        assert stub.Check(to_proto(ALLOWED), timeout=10).effect == pdp_pb2.EFFECT_ALLOW
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(to_proto(ALLOWED, request_id="x" * 8192), timeout=10)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


# --- failures inside the server are denies, never RPC errors and never allows ----------------


def _assert_server_error(resp: pdp_pb2.CheckResponse, request_id: str) -> None:
    assert resp.effect == pdp_pb2.EFFECT_DENY
    (reason,) = resp.reasons
    assert reason.code == "kontext_server_error"
    assert reason.http_status == 500
    assert reason.layer == pdp_pb2.LAYER_SYSTEM
    assert reason.docs_url == f"{DOCS}/errors/kontext_server_error"
    assert "Traceback" not in reason.message and "boom" not in reason.message
    assert resp.request_id == request_id
    assert len(resp.decision_id) == 32


def test_a_failing_policy_source_denies_with_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_source() -> CompiledPolicySet:
        raise RuntimeError("boom: policy store unavailable")

    with running(PolicyDecisionServicer(broken_source, SETTINGS), SETTINGS) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        msg = to_proto(ALLOWED)
        _assert_server_error(stub.Check(msg, timeout=10), msg.request_id)
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[msg, msg]), timeout=10)
    assert len(batch.results) == 2
    for result in batch.results:
        _assert_server_error(result, msg.request_id)
    assert "boom: policy store unavailable" in caplog.text  # logged server-side


def test_an_exception_inside_the_engine_denies_with_server_error(
    policies: CompiledPolicySet, caplog: pytest.LogCaptureFixture
) -> None:
    # Not a policy set at all: the engine fails while deciding, after validation passed.
    with running(PolicyDecisionServicer(lambda: object(), SETTINGS), SETTINGS) as channel:  # type: ignore[arg-type,return-value]
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        msg = to_proto(ALLOWED)
        _assert_server_error(stub.Check(msg, timeout=10), msg.request_id)
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[msg]), timeout=10)
        _assert_server_error(batch.results[0], msg.request_id)
    assert "decision failed" in caplog.text


def test_a_failing_clock_denies_with_server_error(policies: CompiledPolicySet) -> None:
    def broken_clock() -> datetime:
        raise OSError("boom: no clock")

    servicer = PolicyDecisionServicer(lambda: policies, SETTINGS, clock=broken_clock)
    with running(servicer, SETTINGS) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        msg = to_proto(ALLOWED)
        _assert_server_error(stub.Check(msg, timeout=10), msg.request_id)


def test_the_clock_is_injected(policies: CompiledPolicySet) -> None:
    seen: list[datetime] = []

    def clock() -> datetime:
        now = datetime.now().astimezone()
        seen.append(now)
        return now

    with running(PolicyDecisionServicer(lambda: policies, SETTINGS, clock=clock)) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        stub.Check(to_proto(ALLOWED), timeout=10)
        stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[to_proto(ALLOWED)] * 5), timeout=10)
    assert len(seen) == 2  # once per RPC: a batch is decided at one instant


def test_validation_details_stay_within_the_metadata_limit(
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
) -> None:
    """Found by the fuzzer: long keys in many bad fields overflowed gRPC's 8 KiB trailers."""
    long_key = "k" * 250
    msg = pdp_pb2.CheckRequest(organization="\x00" * 250, scope='"' * 250, request_id="r" * 300)
    for target in (
        msg.subject.attributes,
        msg.application.attributes,
        msg.integration.attributes,
        msg.context.attributes,
    ):
        target.update({long_key: "x" * 5000})
    with pytest.raises(grpc.RpcError) as raised:
        stub.Check(msg)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)
    assert status is not None and "organization" in status.message
