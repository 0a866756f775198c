"""Every DOMAIN.md scenario, decided by the pure engine over the example policies."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from policy_engine.domain.decision import Effect
from policy_engine.domain.request import (
    CheckRequest,
    ConnectionState,
    RequestContext,
    Resource,
    Subject,
    SubjectKind,
)
from policy_engine.engine import decide
from policy_engine.policy import load_policy_set
from tests.scenarios import EXAMPLE_POLICIES, SCENARIOS, Scenario, token_for


@pytest.fixture(scope="module")
def policies():
    return load_policy_set(EXAMPLE_POLICIES)


def to_request(scenario: Scenario, explain: bool = False) -> CheckRequest:
    return CheckRequest(
        organization=scenario.organization,
        subject=Subject(
            scenario.subject,
            SubjectKind(scenario.subject_kind),
            scenario.subject_attributes,
            token_for(scenario),
        ),
        application=Resource(scenario.application),
        integration=Resource(scenario.integration),
        scope=scenario.scope,
        context=RequestContext(connection=ConnectionState(scenario.connection)),
        explain=explain,
    )


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario(policies, scenario: Scenario) -> None:
    decision = decide(policies, to_request(scenario), now=datetime.now(UTC))
    assert decision.effect is Effect(scenario.decision)
    assert decision.revision == policies.revision
    if scenario.decision == "ALLOW":
        assert decision.reasons == ()
        return
    first = decision.reasons[0]
    assert first.code.value == scenario.code, decision.reasons
    assert first.layer.value == scenario.layer, decision.reasons
    if scenario.field:
        assert first.field == scenario.field
    # Every reason carries where it came from and a message a person can read.
    for reason in decision.reasons:
        assert reason.policy and reason.rule and reason.message


def test_only_the_named_layer_denies(policies) -> None:
    """The scenario table names one layer per deny: no other layer may chime in."""
    for scenario in SCENARIOS:
        if scenario.layer in ("org", "user", "application"):
            decision = decide(policies, to_request(scenario), now=datetime.now(UTC))
            assert {r.layer.value for r in decision.reasons} == {scenario.layer}, scenario.name


def test_explain_lists_every_layer_and_rule(policies) -> None:
    scenario = SCENARIOS[1]  # delete_repo: denied by the org layer
    decision = decide(policies, to_request(scenario, explain=True), now=datetime.now(UTC))
    layers = {layer.layer.value: layer for layer in decision.trace}
    assert list(layers) == ["org", "user", "application"]
    org_rules = {(r.policy, r.rule): r.result.value for r in layers["org"].rules}
    assert org_rules[("engineering-developer-tools", "no-repository-deletion")] == "matched"
    assert org_rules[("engineering-developer-tools", "engineering-may-use-developer-tools")] == (
        "matched"
    )
    assert layers["org"].effect is Effect.DENY and not layers["org"].by_default
    assert layers["application"].effect is Effect.ALLOW


def test_explain_does_not_change_the_decision(policies) -> None:
    for scenario in SCENARIOS:
        plain = decide(policies, to_request(scenario), now=datetime.now(UTC))
        explained = decide(policies, to_request(scenario, explain=True), now=datetime.now(UTC))
        assert plain.effect is explained.effect, scenario.name
        assert plain.reasons == explained.reasons, scenario.name
        assert plain.trace == ()


def test_matched_rules_name_what_decided(policies) -> None:
    allowed = decide(policies, to_request(SCENARIOS[0]), now=datetime.now(UTC))
    assert [(m.layer.value, m.policy, m.rule) for m in allowed.matched_rules] == [
        ("org", "engineering-developer-tools", "engineering-may-use-developer-tools"),
        ("user", "sso-baseline", "employees-delegate-to-their-applications"),
        ("application", "pr-reviewer-scope", "github-only"),
    ]
    denied = decide(policies, to_request(SCENARIOS[1]), now=datetime.now(UTC))
    assert ("org", "no-repository-deletion", "DENY") in [
        (m.layer.value, m.rule, m.effect.value) for m in denied.matched_rules
    ]
