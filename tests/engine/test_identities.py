"""Who acts for whom, decided by the engine before any policy: external user IDs mapped to
people (userId mode), tokens bound to their application and to the mapped person, and the
delegation chain CEL sees. Real policy files, the real loader and the real engine."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer
from policy_engine.domain.request import CheckRequest, Resource, Subject, SubjectKind
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from tests.auth.material import AUDIENCE, ISSUER, claims, jwks, rsa_key
from tests.policy_builder import allow_all, dump_yaml, write_organization

KEY = rsa_key()
MAPPINGS = [
    {
        "kind": "IdentityMapping",
        "namespace": "partner-portal",
        "applications": ["support-copilot", "both"],
        "identities": {"partner-user-123": "alice", "partner-user-7": "bob"},
    },
    {
        "kind": "IdentityMapping",
        "namespace": "second-issuer",
        "applications": ["both"],
        "identities": {"partner-user-123": "carol"},
    },
]
# What each policy sees, so a test can ask whose user layer decided and what CEL read.
POLICIES = [
    allow_all("org"),
    allow_all("application"),
    {
        "name": "alice-personal",
        "layer": "user",
        "target": {"subjects": ["alice"]},
        "rules": [
            {"name": "alice-allows", "effect": "allow"},
            {"name": "no-admin", "effect": "deny", "target": {"scopes": ["admin"]}},
        ],
    },
    {
        "name": "seen-by-cel",
        "layer": "user",
        "target": {"subjects": ["carol"]},
        "rules": [
            {
                "name": "external-view",
                "effect": "allow",
                "condition": 'subject.id == "carol" && subject.kind == "external_user" '
                '&& subject.external.id == "partner-user-123" '
                '&& subject.external.namespace == "second-issuer"',
            }
        ],
    },
    {
        "name": "users-view",
        "layer": "user",
        "target": {"subjects": ["dave"]},
        "rules": [
            {
                "name": "no-external",
                "effect": "allow",
                "condition": 'subject.external.id == "" && subject.external.namespace == ""'
                ' && (size(subject.actors) == 0 || subject.actors[0].sub == "agent-x")',
            }
        ],
    },
    {
        "name": "agents",
        "layer": "application",
        "target": {"applications": ["*"]},
        "rules": [
            {
                "name": "only-agent-x",
                "effect": "deny",
                "condition": 'size(subject.actors) > 0 && subject.actors[0].sub != "agent-x"',
            }
        ],
    },
]
APPLICATIONS = ["support-copilot", "both", "billing-agent"]


def write(root: Path, tokens: dict[str, Any] | None = None) -> Path:
    folder = write_organization(root, "acme", applications=APPLICATIONS, policies=POLICIES)
    (folder / "identities.yaml").write_text("---\n".join(dump_yaml(m) for m in MAPPINGS))
    if tokens is not None:
        (folder / "jwks.json").write_text(jwks(KEY))
        config = yaml.safe_load((folder / "organization.yaml").read_text())
        (folder / "organization.yaml").write_text(dump_yaml({**config, "tokens": tokens}))
    return root


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    return load_policy_set(write(tmp_path_factory.mktemp("identities")))


@pytest.fixture(scope="module")
def with_tokens(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    tokens = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"}
    return load_policy_set(write(tmp_path_factory.mktemp("identity-tokens"), tokens))


def ask(
    policies: CompiledPolicySet,
    subject: str = "partner-user-123",
    *,
    application: str = "support-copilot",
    namespace: str = "",
    kind: SubjectKind = SubjectKind.EXTERNAL_USER,
    scope: str = "repo",
    token: str = "",
) -> Decision:
    request = CheckRequest(
        organization="acme",
        subject=Subject(subject, kind, access_token=token, namespace=namespace),
        application=Resource(application),
        integration=Resource("github"),
        scope=scope,
    )
    return decide(policies, request, now=datetime.now(UTC))


def only_reason(decision: Decision) -> tuple[ErrorCode, Layer, str, str]:
    assert decision.effect is Effect.DENY and len(decision.reasons) == 1, decision.reasons
    reason = decision.reasons[0]
    return reason.code, reason.layer, reason.rule, reason.message


def test_a_mapped_external_id_is_decided_as_the_person(policies: CompiledPolicySet) -> None:
    allowed = ask(policies)
    assert allowed.effect is Effect.ALLOW and allowed.mapped_subject_id == "alice"
    assert any(m.rule == "alice-allows" for m in allowed.matched_rules)
    # The person's own deny holds for their external account too.
    denied = ask(policies, scope="admin")
    assert only_reason(denied)[:3] == (ErrorCode.POLICY_DENIED, Layer.USER, "no-admin")
    assert denied.mapped_subject_id == "alice"


def test_cel_sees_the_person_and_the_external_id_apart(policies: CompiledPolicySet) -> None:
    decision = ask(policies, application="both", namespace="second-issuer")
    assert decision.effect is Effect.ALLOW, decision.reasons
    assert [m.rule for m in decision.matched_rules if m.layer is Layer.USER] == ["external-view"]
    user = ask(policies, "dave", application="both", kind=SubjectKind.USER)
    assert [m.rule for m in user.matched_rules if m.layer is Layer.USER] == ["no-external"]
    assert user.mapped_subject_id == ""


def test_an_application_without_user_id_mode_is_denied(policies: CompiledPolicySet) -> None:
    code, layer, rule, message = only_reason(ask(policies, application="billing-agent"))
    assert (code, layer, rule) == (
        ErrorCode.POLICY_DENIED,
        Layer.SYSTEM,
        "external-user-mode-allowed",
    )
    assert "'billing-agent' may not act for external user IDs" in message
    # Allowed in one namespace is not allowed in another, nor in one nobody declared.
    code, _, rule, message = only_reason(ask(policies, namespace="second-issuer"))
    assert (code, rule) == (ErrorCode.POLICY_DENIED, "external-user-mode-allowed")
    _, _, _, message = only_reason(ask(policies, namespace="ghost"))
    assert "no IdentityMapping declares it" in message


def test_an_unmapped_external_id_needs_sign_in(policies: CompiledPolicySet) -> None:
    decision = ask(policies, "partner-user-999")
    code, layer, rule, message = only_reason(decision)
    assert (code, layer, rule) == (
        ErrorCode.AUTHORIZATION_REQUIRED,
        Layer.SYSTEM,
        "external-user-mapped",
    )
    assert "'partner-user-999' is not linked" in message and decision.mapped_subject_id == ""
    # A person's own ID is not an external ID of theirs.
    assert only_reason(ask(policies, "alice"))[2] == "external-user-mapped"


def test_several_namespaces_need_the_request_to_name_one(policies: CompiledPolicySet) -> None:
    code, _, rule, message = only_reason(ask(policies, application="both"))
    assert (code, rule) == (ErrorCode.POLICY_DENIED, "external-user-mode-allowed")
    assert "several namespaces (partner-portal, second-issuer)" in message
    named = ask(policies, application="both", namespace="partner-portal")
    assert named.effect is Effect.ALLOW and named.mapped_subject_id == "alice"


def test_a_namespace_is_only_for_external_users(policies: CompiledPolicySet) -> None:
    for kind in (SubjectKind.USER, SubjectKind.SERVICE_ACCOUNT):
        decision = ask(policies, "alice", kind=kind, namespace="partner-portal")
        (reason,) = [r for r in decision.reasons if r.code is ErrorCode.VALIDATION_ERROR]
        assert reason.field == "subject.namespace"
    bad = ask(policies, namespace="partner portal")
    assert [r.field for r in bad.reasons] == ["subject.namespace"]
    too_long = ask(policies, namespace="n" * 300)
    assert [r.field for r in too_long.reasons] == ["subject.namespace"]


def token(subject: str = "alice", **extra: Any) -> str:
    return KEY.sign(**claims(subject, client_id="support-copilot", **extra))


def test_a_token_with_an_external_id_is_the_mapped_persons(with_tokens: CompiledPolicySet) -> None:
    assert ask(with_tokens, token=token()).effect is Effect.ALLOW
    code, _, rule, message = only_reason(ask(with_tokens, token=token("bob")))
    assert (code, rule) == (ErrorCode.AUTHORIZATION_REQUIRED, "valid-subject-token")
    assert "is not the person the external user ID maps to" in message
    # bob's own external ID with alice's token, and a token whose sub is the external ID.
    assert only_reason(ask(with_tokens, "partner-user-7", token=token()))[2] == (
        "valid-subject-token"
    )
    assert only_reason(ask(with_tokens, token=token("partner-user-123")))[2] == (
        "valid-subject-token"
    )


def test_a_token_is_bound_to_the_presenting_application(with_tokens: CompiledPolicySet) -> None:
    stolen = KEY.sign(**claims("dave", client_id="billing-agent"))
    code, layer, rule, message = only_reason(
        ask(with_tokens, "dave", application="both", kind=SubjectKind.USER, token=stolen)
    )
    assert (code, layer, rule) == (
        ErrorCode.AUTHORIZATION_REQUIRED,
        Layer.SYSTEM,
        "valid-subject-token",
    )
    assert message == (
        "the access token was issued to application 'billing-agent', not to 'both' "
        "('client_id' claim)"
    )
    own = KEY.sign(**claims("dave", client_id="both"))
    assert ask(
        with_tokens, "dave", application="both", kind=SubjectKind.USER, token=own
    ).effect is (Effect.ALLOW)


def test_rules_read_the_delegation_chain(with_tokens: CompiledPolicySet) -> None:
    def decide_with(act: Any) -> Decision:
        signed = KEY.sign(**claims("dave", client_id="both", act=act))
        return ask(with_tokens, "dave", application="both", kind=SubjectKind.USER, token=signed)

    assert decide_with({"sub": "agent-x", "act": {"sub": "orchestrator"}}).effect is Effect.ALLOW
    other = decide_with({"sub": "orchestrator", "act": {"sub": "agent-x"}})
    assert other.effect is Effect.DENY
    assert (ErrorCode.POLICY_DENIED, Layer.APPLICATION, "only-agent-x") in [
        (r.code, r.layer, r.rule) for r in other.reasons
    ]
    # A malformed chain refuses the token, naming the claim.
    _, _, rule, message = only_reason(decide_with({"sub": "agent-x", "act": "orchestrator"}))
    assert rule == "valid-subject-token" and "claim 'act.act' is not a JSON object" in message


def test_the_old_decision_is_unchanged_for_people(policies: CompiledPolicySet) -> None:
    request = ask(policies, "alice", kind=SubjectKind.USER)
    assert request.effect is Effect.ALLOW and request.mapped_subject_id == ""


def test_replacing_the_subject_does_not_leak_between_requests(policies: CompiledPolicySet) -> None:
    # The engine decides a copy of the request as the person: the caller's stays as sent.
    request = CheckRequest(
        organization="acme",
        subject=Subject("partner-user-123", SubjectKind.EXTERNAL_USER),
        application=Resource("support-copilot"),
        integration=Resource("github"),
        scope="repo",
    )
    before = replace(request)
    assert decide(policies, request, now=datetime.now(UTC)).effect is Effect.ALLOW
    assert request == before and request.subject.id == "partner-user-123"
