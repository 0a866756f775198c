"""Who acts for whom, end to end through a real gRPC server on an ephemeral port: a mapped
external user ID (answered and cached as the person), an unmapped one, an application without
userId mode, a token presented by the wrong application, a namespace on a user (refused as
invalid), and the audit log carrying the namespace and the person for computed and cached
answers alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit import AuditLog
from policy_engine.config import Settings
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.service import PolicyDecisionServicer
from tests.audit.support import assert_audited_intact, module_audit_log, read_records
from tests.auth.material import AUDIENCE, ISSUER, claims
from tests.engine.test_identities import KEY, write
from tests.server.harness import running

SETTINGS = Settings()


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    tokens = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"}
    return load_policy_set(write(tmp_path_factory.mktemp("identities"), tokens))


@pytest.fixture(scope="module")
def served(
    policies: CompiledPolicySet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, AuditLog]]:
    """A real server answering from `policies`, and the audit log it writes."""
    directory = tmp_path_factory.mktemp("identities-audit")
    with module_audit_log(directory) as audit:
        servicer = PolicyDecisionServicer(lambda: policies, SETTINGS, audit=audit)
        with running(servicer, SETTINGS) as channel:
            yield pdp_pb2_grpc.PolicyDecisionServiceStub(channel), audit


@pytest.fixture(scope="module")
def stub(served: tuple[Any, AuditLog]) -> Any:
    return served[0]


def check(
    subject: str = "partner-user-123",
    *,
    kind: int = pdp_pb2.SUBJECT_KIND_EXTERNAL_USER,
    namespace: str = "",
    application: str = "support-copilot",
    token: str = "",
    request_id: str = "",
) -> pdp_pb2.CheckRequest:
    return pdp_pb2.CheckRequest(
        organization="acme",
        subject=pdp_pb2.Subject(id=subject, kind=kind, namespace=namespace, access_token=token),
        application=pdp_pb2.Application(id=application),
        integration=pdp_pb2.Integration(id="github"),
        scope="repo",
        request_id=request_id,
    )


def reasons(response: pdp_pb2.CheckResponse) -> list[tuple[str, int, str]]:
    return [(r.code, r.layer, r.rule) for r in response.reasons]


def test_a_mapped_external_id_is_answered_and_cached_as_the_person(stub: Any) -> None:
    first = stub.Check(check(request_id="mapped-1"), timeout=10)
    assert first.effect == pdp_pb2.EFFECT_ALLOW and first.mapped_subject_id == "alice"
    again = stub.Check(check(request_id="mapped-2"), timeout=10)
    assert again.cached and again.effect == pdp_pb2.EFFECT_ALLOW
    assert again.mapped_subject_id == "alice"
    # The namespace is part of the request: another one is another question (and answer).
    other = stub.Check(check(namespace="second-issuer", request_id="mapped-3"), timeout=10)
    assert not other.cached and other.effect == pdp_pb2.EFFECT_DENY
    assert reasons(other) == [
        ("kontext_policy_denied", pdp_pb2.LAYER_SYSTEM, "external-user-mode-allowed")
    ]


def test_an_unmapped_external_id_needs_sign_in(stub: Any) -> None:
    for _ in range(2):  # computed, then cached: the same answer
        response = stub.Check(check("partner-user-999"), timeout=10)
        assert response.effect == pdp_pb2.EFFECT_DENY and response.mapped_subject_id == ""
        assert reasons(response) == [
            ("kontext_authorization_required", pdp_pb2.LAYER_SYSTEM, "external-user-mapped")
        ]
        assert response.reasons[0].http_status == 401


def test_an_application_without_user_id_mode_is_denied(stub: Any) -> None:
    response = stub.Check(check(application="billing-agent"), timeout=10)
    assert reasons(response) == [
        ("kontext_policy_denied", pdp_pb2.LAYER_SYSTEM, "external-user-mode-allowed")
    ]
    assert "'billing-agent' may not act for external user IDs" in response.reasons[0].message


def test_a_token_of_another_application_is_refused(stub: Any) -> None:
    stolen = KEY.sign(**claims("alice", client_id="billing-agent"))
    batch = stub.CheckBatch(
        pdp_pb2.CheckBatchRequest(
            items=[
                check(token=stolen),
                check(token=KEY.sign(**claims("alice", client_id="support-copilot"))),
            ]
        ),
        timeout=10,
    )
    refused, accepted = batch.results
    assert reasons(refused) == [
        ("kontext_authorization_required", pdp_pb2.LAYER_SYSTEM, "valid-subject-token")
    ]
    assert refused.reasons[0].message == (
        "the access token was issued to application 'billing-agent', not to "
        "'support-copilot' ('client_id' claim)"
    )
    assert accepted.effect == pdp_pb2.EFFECT_ALLOW and accepted.mapped_subject_id == "alice"


def test_a_namespace_on_a_user_is_an_invalid_argument(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Check(check("alice", kind=pdp_pb2.SUBJECT_KIND_USER, namespace="partner-portal"))
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "subject.namespace" in (error.value.details() or "")


def test_the_audit_log_names_the_namespace_and_the_person(served: tuple[Any, AuditLog]) -> None:
    stub, audit = served
    stub.Check(check(namespace="partner-portal", request_id="audited-1"), timeout=10)
    stub.Check(check(namespace="partner-portal", request_id="audited-2"), timeout=10)
    assert audit.flush(timeout=30)
    by_id = {
        r["request_id"]: r
        for r in read_records(Path(audit.settings.file_path))
        if r["type"] == "decision"
    }
    computed, hit = by_id["audited-1"], by_id["audited-2"]
    assert (computed["cache_level"], hit["cache_level"]) == ("none", "local")
    for record in (computed, hit):
        assert record["schema_version"] == 5
        assert record["subject"]["id"] == "partner-user-123"
        assert record["subject"]["namespace"] == "partner-portal"
        assert record["subject"]["mapped_id"] == "alice"
    assert by_id["mapped-1"]["subject"]["namespace"] == ""
    assert_audited_intact(audit)
