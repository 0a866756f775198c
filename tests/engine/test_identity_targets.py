"""Targets that name an external user ID: the engine decides an external user as the person
its ID maps to, yet a deny (or a quota) whose target names the external account itself must
still apply, in every layer and through globs; an allow must name the person. Real policy
files, the real loader, the real engine, the in-process quota store and `pdp test`'s dry-run
counters."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from policy_engine.api import pdp_pb2
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer
from policy_engine.domain.request import CheckRequest, Resource, Subject, SubjectKind
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.quota import InProcessQuotaStore
from policy_engine.quota.dry_run import DryRunQuotas
from policy_engine.server.service import build_decider
from tests.cache.support import settings, tuple_request
from tests.policy_builder import allow_all, dump_yaml, write_organization

NOW = datetime.now(UTC)
MAPPING = {
    "kind": "IdentityMapping",
    "namespace": "partner-portal",
    "applications": ["support-copilot"],
    "identities": {
        "partner-user-123": "alice",
        "partner-user-7": "bob",
        "alice": "alice",  # an external ID equal to its person's ID
    },
}
POLICIES = [
    allow_all("org"),
    allow_all("application"),
    allow_all("user"),
    {
        # Written for the external account, not for alice: it must hold for that account.
        "name": "blocked-partner-account",
        "layer": "user",
        "target": {"subjects": ["partner-user-123"]},
        "rules": [{"name": "no-admin", "effect": "deny", "target": {"scopes": ["admin"]}}],
    },
    {
        # alice's own policy, one rule of which is for her partner account only.
        "name": "alice-personal",
        "layer": "user",
        "target": {"subjects": ["alice"]},
        "rules": [
            {
                "name": "no-deletes-from-the-partner-account",
                "effect": "deny",
                "target": {"subjects": ["partner-user-123"], "scopes": ["delete_repo"]},
            }
        ],
    },
    {
        "name": "partner-accounts",
        "layer": "org",
        "target": {"subjects": ["partner-*"]},
        "rules": [{"name": "no-billing", "effect": "deny", "target": {"scopes": ["billing"]}}],
    },
    {
        # An allow naming the external account opens nothing the person's policies close.
        "name": "external-allow",
        "layer": "application",
        "target": {"subjects": ["partner-user-7"], "applications": ["support-copilot"]},
        "rules": [{"name": "only-for-the-account", "effect": "allow"}],
    },
]
QUOTA = """\
kind: Quota
name: partner-account-hourly
target: {subjects: [partner-user-123], integrations: [github]}
limit: 2
window: 1h
per: [subject]
"""


def write(root: Path, *, open_application: bool = True) -> Path:
    """acme's policies; without `open_application`, the application layer (deny by default)
    has only `external-allow` to open it."""
    policies = [p for p in POLICIES if open_application or p["name"] != "open-application"]
    folder = write_organization(root, "acme", applications=["support-copilot"], policies=policies)
    (folder / "identities.yaml").write_text(dump_yaml(MAPPING))
    (folder / "quotas.yaml").write_text(QUOTA)
    return root


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    return load_policy_set(write(tmp_path_factory.mktemp("identity-targets")))


def ask(
    policies: CompiledPolicySet,
    subject: str = "partner-user-123",
    scope: str = "repo",
    kind: SubjectKind = SubjectKind.EXTERNAL_USER,
    *,
    explain: bool = False,
) -> Decision:
    request = CheckRequest(
        organization="acme",
        subject=Subject(subject, kind),
        application=Resource("support-copilot"),
        integration=Resource("github"),
        scope=scope,
        explain=explain,
    )
    return decide(policies, request, now=NOW)


def rules_of(decision: Decision) -> list[tuple[Layer, str]]:
    return [(reason.layer, reason.rule) for reason in decision.reasons]


def test_a_deny_naming_the_external_id_holds_for_it(policies: CompiledPolicySet) -> None:
    denied = ask(policies, scope="admin")
    assert denied.effect is Effect.DENY and denied.mapped_subject_id == "alice"
    assert rules_of(denied) == [(Layer.USER, "no-admin")]
    # alice herself, and her other external IDs, are not that account.
    assert ask(policies, "alice", "admin", SubjectKind.USER).effect is Effect.ALLOW
    assert ask(policies, "alice", "admin").effect is Effect.ALLOW
    assert ask(policies, scope="repo").effect is Effect.ALLOW


def test_a_persons_policy_may_hold_a_rule_for_their_external_id(
    policies: CompiledPolicySet,
) -> None:
    """The policy names alice and its rule her partner account: the request through that
    account is both, so the rule holds; alice herself is only one of them."""
    denied = ask(policies, scope="delete_repo")
    assert rules_of(denied) == [(Layer.USER, "no-deletes-from-the-partner-account")]
    assert ask(policies, "alice", "delete_repo", SubjectKind.USER).effect is Effect.ALLOW
    assert ask(policies, "alice", "delete_repo").effect is Effect.ALLOW


def test_a_glob_naming_external_ids_holds_in_every_layer(policies: CompiledPolicySet) -> None:
    for external in ("partner-user-123", "partner-user-7"):
        denied = ask(policies, external, "billing")
        assert rules_of(denied) == [(Layer.ORG, "no-billing")], external
    assert ask(policies, "bob", "billing", SubjectKind.USER).effect is Effect.ALLOW


def test_an_allow_naming_the_external_id_opens_nothing(tmp_path: Path) -> None:
    """Only denies widen: in an application layer that defaults to deny, `external-allow`
    (naming partner-user-7, not bob) opens nothing, while `partner-accounts` still denies."""
    policies = load_policy_set(write(tmp_path, open_application=False))
    denied = ask(policies, "partner-user-7", "billing")
    assert denied.effect is Effect.DENY and denied.mapped_subject_id == "bob"
    assert rules_of(denied) == [(Layer.ORG, "no-billing"), (Layer.APPLICATION, "default")]


def test_the_explained_trace_shows_the_deny(policies: CompiledPolicySet) -> None:
    decision = ask(policies, scope="admin", explain=True)
    (user,) = [trace for trace in decision.trace if trace.layer is Layer.USER]
    assert user.effect is Effect.DENY
    assert ("blocked-partner-account", "no-admin") in [(r.policy, r.rule) for r in user.rules]


def test_a_quota_naming_the_external_id_counts_it(policies: CompiledPolicySet) -> None:
    decider = build_decider(lambda: policies, settings(), quotas=InProcessQuotaStore())

    def check(subject: str, kind: int) -> Any:
        msg = tuple_request(subject)
        msg.application.id = "support-copilot"
        msg.subject.kind = kind
        return decider.decide_sync([msg]).only()

    external = pdp_pb2.SUBJECT_KIND_EXTERNAL_USER
    answers = [check("partner-user-123", external) for _ in range(4)]
    assert [a.effect == pdp_pb2.EFFECT_ALLOW for a in answers] == [True, True, False, False]
    assert answers[-1].reasons[0].code == ErrorCode.RATE_LIMITED.value
    assert answers[-1].reasons[0].policy == "partner-account-hourly"
    # alice through her own sign-in, or another external ID of hers, is not that account.
    assert check("alice", pdp_pb2.SUBJECT_KIND_USER).effect == pdp_pb2.EFFECT_ALLOW
    assert check("alice", external).effect == pdp_pb2.EFFECT_ALLOW


def test_pdp_test_counts_the_same_way(policies: CompiledPolicySet) -> None:
    organization = policies.organizations["acme"]
    quotas = DryRunQuotas()
    request = ("partner-user-123", "support-copilot", "github", "repo")
    effects = []
    for _ in range(3):
        decision, problems = quotas.count(organization, request, ask(policies), NOW, {})
        assert problems == ()
        effects.append(decision.effect)
    assert effects == [Effect.ALLOW, Effect.ALLOW, Effect.DENY]
