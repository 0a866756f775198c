"""A careless policy cannot hang the server: load-time limits plus a bounded evaluation budget."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy_engine.domain.decision import Effect
from policy_engine.engine import decide
from policy_engine.policy import PolicyLoadError, load_policy_set
from tests.policy_builder import allow_all, request, write_organization

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
MAX_GROUPS = [f"g{i}" for i in range(64)]  # the largest list a request may carry


def org_with_condition(tmp_path: Path, effect: str, condition: str) -> Path:
    write_organization(
        tmp_path,
        "acme",
        policies=[
            {
                "name": "careless",
                "layer": "org",
                "rules": [{"name": "r", "effect": effect, "condition": condition}],
            },
            allow_all("user"),
            allow_all("application"),
        ],
    )
    return tmp_path


def test_nesting_beyond_the_limit_is_refused_at_load(tmp_path: Path) -> None:
    condition = (
        "subject.attributes.groups.all(a, subject.attributes.groups.all(b, "
        "subject.attributes.groups.all(c, a + b + c != '')))"
    )
    with pytest.raises(PolicyLoadError, match="nested more than 2"):
        load_policy_set(org_with_condition(tmp_path, "allow", condition))


def test_huge_expressions_are_refused_at_load(tmp_path: Path) -> None:
    condition = " || ".join(f'scope == "s{i}"' for i in range(2000))
    with pytest.raises(PolicyLoadError, match=r"too large|longer than"):
        load_policy_set(org_with_condition(tmp_path, "allow", condition))


def test_the_largest_allowed_input_still_evaluates(tmp_path: Path) -> None:
    condition = "subject.attributes.groups.all(a, subject.attributes.groups.exists(b, a == b))"
    policies = load_policy_set(org_with_condition(tmp_path, "allow", condition))
    decision = decide(policies, request(groups=MAX_GROUPS), now=NOW)
    assert decision.effect is Effect.ALLOW


@pytest.mark.parametrize("effect", ["allow", "deny"])
def test_a_runaway_comprehension_stops_and_fails_closed(tmp_path: Path, effect: str) -> None:
    # Each loop is as large as a request allows, grown by concatenation: ~16k iterations.
    grown = "(subject.attributes.groups + subject.attributes.groups)"
    condition = f"{grown}.all(a, {grown}.all(b, a != 'never'))"
    policies = load_policy_set(org_with_condition(tmp_path, effect, condition))
    decision = decide(policies, request(groups=MAX_GROUPS, explain=True), now=NOW)
    assert decision.effect is Effect.DENY
    org_rules = decision.trace[0].rules
    assert org_rules[0].result.value == "error"
    assert "comprehension iterations" in org_rules[0].detail
