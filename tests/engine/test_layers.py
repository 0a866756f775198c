"""The layer algebra of DOMAIN.md, rule by rule, on small purpose-built policy sets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from policy_engine.domain.decision import Effect, Layer, RuleResult
from policy_engine.engine import decide
from policy_engine.policy import load_policy_set
from tests.policy_builder import allow_all, request, write_organization

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def decide_with(tmp_path: Path, policies: list[dict[str, Any]], req=None, **org: Any):
    write_organization(tmp_path, "acme", policies=policies, **org)
    return decide(load_policy_set(tmp_path), req or request(), now=NOW)


def org_policy(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"name": "org-rules", "layer": "org", "rules": list(rules)}


OPEN_USER_AND_APP = [allow_all("user"), allow_all("application")]


def test_every_layer_defaults_to_deny(tmp_path: Path) -> None:
    decision = decide_with(tmp_path, [])
    assert decision.effect is Effect.DENY
    assert [r.layer for r in decision.reasons] == [Layer.ORG, Layer.USER, Layer.APPLICATION]
    assert all(r.rule == "default" for r in decision.reasons)


def test_layer_defaults_are_set_per_layer(tmp_path: Path) -> None:
    defaults = {"org": "allow", "user": "allow", "application": "allow"}
    assert decide_with(tmp_path, [], defaults=defaults).effect is Effect.ALLOW


def test_all_three_layers_must_allow(tmp_path: Path) -> None:
    decision = decide_with(tmp_path, [allow_all("org"), allow_all("user")])
    assert decision.effect is Effect.DENY
    assert [r.layer for r in decision.reasons] == [Layer.APPLICATION]


def test_deny_beats_allow_inside_a_layer(tmp_path: Path) -> None:
    policies = [
        org_policy(
            {"name": "yes", "effect": "allow"},
            {"name": "no", "effect": "deny", "message": "custom words"},
        ),
        *OPEN_USER_AND_APP,
    ]
    decision = decide_with(tmp_path, policies)
    assert decision.effect is Effect.DENY
    (reason,) = decision.reasons
    assert (reason.layer, reason.policy, reason.rule, reason.message) == (
        Layer.ORG,
        "org-rules",
        "no",
        "custom words",
    )


def test_explicit_deny_in_any_layer_wins_over_default_allow(tmp_path: Path) -> None:
    policies = [
        {
            "name": "user-deny",
            "layer": "user",
            "target": {"subjects": ["alice"]},
            "rules": [{"name": "no", "effect": "deny"}],
        }
    ]
    decision = decide_with(
        tmp_path, policies, defaults={"org": "allow", "user": "allow", "application": "allow"}
    )
    assert decision.effect is Effect.DENY
    assert [r.layer for r in decision.reasons] == [Layer.USER]


def test_erroring_allow_rule_does_not_match_and_says_why(tmp_path: Path) -> None:
    policies = [
        org_policy(
            {
                "name": "needs-groups",
                "effect": "allow",
                "condition": '"eng" in subject.attributes.groups',
            }
        ),
        *OPEN_USER_AND_APP,
    ]
    decision = decide_with(tmp_path, policies)  # no groups attribute: evaluation error
    assert decision.effect is Effect.DENY
    errored = [r for r in decision.reasons if r.rule == "needs-groups"]
    assert errored and "groups" in errored[0].message


def test_erroring_deny_rule_denies_and_says_why(tmp_path: Path) -> None:
    policies = [
        org_policy(
            {"name": "yes", "effect": "allow"},
            {"name": "broken-deny", "effect": "deny", "condition": "subject.attributes.level > 3"},
        ),
        *OPEN_USER_AND_APP,
    ]
    decision = decide_with(tmp_path, policies)
    assert decision.effect is Effect.DENY
    (reason,) = decision.reasons
    assert reason.rule == "broken-deny" and "failed to evaluate" in reason.message


def test_non_boolean_condition_is_an_error_not_a_match(tmp_path: Path) -> None:
    policies = [
        org_policy({"name": "string", "effect": "allow", "condition": "dyn(subject.id)"}),
        *OPEN_USER_AND_APP,
    ]
    decision = decide_with(tmp_path, policies, request(explain=True))
    assert decision.effect is Effect.DENY
    org_trace = decision.trace[0]
    assert org_trace.rules[0].result is RuleResult.ERROR
    assert "not bool" in org_trace.rules[0].detail


def test_rule_code_reaches_the_reason(tmp_path: Path) -> None:
    policies = [
        org_policy(
            {"name": "yes", "effect": "allow"},
            {
                "name": "connect-first",
                "effect": "deny",
                "code": "kontext_integration_connection_required",
                "condition": "!context.connected",
            },
        ),
        *OPEN_USER_AND_APP,
    ]
    decision = decide_with(tmp_path, policies)
    assert decision.reasons[0].code.value == "kontext_integration_connection_required"
    assert decision.reasons[0].http_status == 403


def test_targets_select_rules_by_glob(tmp_path: Path) -> None:
    policies = [
        org_policy({"name": "reads", "effect": "allow", "target": {"scopes": ["read:*"]}}),
        *OPEN_USER_AND_APP,
    ]
    write_organization(tmp_path, "acme", policies=policies)
    policy_set = load_policy_set(tmp_path)
    assert decide(policy_set, request("read:org"), now=NOW).effect is Effect.ALLOW
    assert decide(policy_set, request("write:org"), now=NOW).effect is Effect.DENY


def test_organizations_are_isolated(tmp_path: Path) -> None:
    write_organization(tmp_path, "acme", policies=[allow_all("org"), *OPEN_USER_AND_APP])
    write_organization(
        tmp_path,
        "globex",
        policies=[
            {"name": "deny-all", "layer": "org", "rules": [{"name": "no", "effect": "deny"}]}
        ],
    )
    policy_set = load_policy_set(tmp_path)
    assert decide(policy_set, request(), now=NOW).effect is Effect.ALLOW
    globex = decide(policy_set, request(organization="globex"), now=NOW)
    assert globex.effect is Effect.DENY
    unknown = decide(policy_set, request(organization="initech"), now=NOW)
    assert unknown.effect is Effect.DENY
    assert unknown.reasons[0].code.value == "kontext_not_found"


def test_clock_reading_marks_the_decision_time_dependent(tmp_path: Path) -> None:
    policies = [
        org_policy(
            {
                "name": "daytime",
                "effect": "allow",
                "condition": 'now.betweenHours("08:00", "18:00", "UTC")',
            }
        ),
        *OPEN_USER_AND_APP,
    ]
    decision = decide_with(tmp_path, policies)
    assert decision.effect is Effect.ALLOW and decision.time_dependent


def test_policy_can_opt_out_of_caching(tmp_path: Path) -> None:
    policies = [{**allow_all("org"), "cache": False}, *OPEN_USER_AND_APP]
    decision = decide_with(tmp_path, policies)
    assert decision.effect is Effect.ALLOW and not decision.cacheable


def _token(**claims: Any) -> str:
    import jwt

    return jwt.encode(claims, "a-test-secret-that-is-long-enough-for-hs256", algorithm="HS256")


def test_token_bounds_how_long_a_decision_holds(tmp_path: Path) -> None:
    from dataclasses import replace

    write_organization(tmp_path, "acme", policies=[allow_all("org"), *OPEN_USER_AND_APP])
    policy_set = load_policy_set(tmp_path)
    base = request()
    expires = int(NOW.timestamp()) + 600
    valid = replace(
        base, subject=replace(base.subject, access_token=_token(sub="alice", exp=expires))
    )
    decision = decide(policy_set, valid, now=NOW)
    assert decision.effect is Effect.ALLOW
    assert decision.valid_until is not None
    assert decision.valid_until.timestamp() == expires + 30  # the leeway
    expired = replace(
        base,
        subject=replace(
            base.subject, access_token=_token(sub="alice", exp=int(NOW.timestamp()) - 3600)
        ),
    )
    denied = decide(policy_set, expired, now=NOW)
    assert denied.reasons[0].code.value == "kontext_authorization_required"
    assert denied.valid_until is None  # an expired token never becomes valid again
    for garbage in ("not-a-jwt", _token(sub="alice")):  # malformed; no expiry
        assert (
            decide(
                policy_set,
                replace(base, subject=replace(base.subject, access_token=garbage)),
                now=NOW,
            ).effect
            is Effect.DENY
        )
