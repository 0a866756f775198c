"""Conditions are type-checked at load: a condition that cannot be a bool, or a call with no
overload for the types known at load, is refused with file, line, policy and rule; values of
dynamic type (attributes, claims) load and fail closed at evaluation. Real files, the real
loader."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy_engine.domain.decision import Effect
from policy_engine.engine import decide
from policy_engine.policy import PolicyLoadError, load_policy_set
from tests.policy_builder import request
from tests.store.support import write_policy_dir

REPOSITORY = Path(__file__).resolve().parents[2]

# The condition sits on line 10 of this file (see _policy).
CONDITION_LINE = 10


def _policy(condition: str) -> str:
    return f"""\
kind: Policy
name: typed-conditions
layer: org
target:
  integrations: [github]
rules:
  - name: the-rule
    effect: allow
    condition: >-
      {condition}
"""


def _load(tmp_path: Path, condition: str):
    return load_policy_set(write_policy_dir(tmp_path, _policy(condition)))


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        # not a bool
        ("scope", "a condition must be a bool, and this expression is of type 'string'"),
        ("size(scope)", "of type 'int'"),
        ("subject.attributes", "of type 'map(string, dyn)'"),
        ("now", "of type 'google.protobuf.Timestamp'"),
        ('[subject.id, "x"]', "of type 'list(string)'"),
        ("context.connected ? 1 : 2", "of type 'int'"),
        # no overload for the known types
        (
            '["a"].contains("a")',
            "no matching overload for 'contains' applied to (list(string), string)",
        ),
        ('scope + 1 == "repo1"', "no matching overload for '+' applied to (string, int)"),
        ('now.getHours() == "9"', "no matching overload for '==' applied to (int, string)"),
        ('context.connected.startsWith("t")', "'startsWith' applied to (bool, string)"),
        ("size(context.connected) > 0", "no matching overload for 'size' applied to (bool)"),
        ("scope in [1, 2]", "no matching overload for 'in' applied to (string, list(int))"),
        ("context.connected && scope", "no matching overload for '&&' applied to (bool, string)"),
        ("!scope", "no matching overload for '!_' applied to (string)"),
        ("subject.id.x == 1", "type 'string' does not support field selection"),
        ("scope.exists(c, c)", "exists() cannot range over a value of type 'string'"),
        ('["a"].exists(c, c + 1 > 0)', "'+' applied to (string, int)"),
        ('["a"].all(c, c)', "all() needs a bool predicate, not 'string'"),
        ('now.timeOfDay("UTC") == 9', "'==' applied to (string, int)"),
        ("scope.inCidr(context.connected)", "'inCidr' applied to (string, bool)"),
    ],
)
def test_a_condition_of_the_wrong_type_is_refused_with_its_place(
    tmp_path: Path, condition: str, message: str
) -> None:
    with pytest.raises(PolicyLoadError) as caught:
        _load(tmp_path, condition)
    (issue,) = caught.value.issues
    assert issue.file.name == "org.yaml"
    assert issue.line == CONDITION_LINE
    assert (issue.policy, issue.rule) == ("typed-conditions", "the-rule")
    assert issue.message.startswith("invalid condition (column ")
    assert message in issue.message
    assert f"org.yaml:{CONDITION_LINE}: [policy typed-conditions, rule the-rule]" in str(issue)


@pytest.mark.parametrize(
    "condition",
    [
        "subject.attributes.groups.contains('sales')",  # dyn receiver: checked at evaluation
        "subject.attributes.admin",  # dyn: a bool at run time, or a deny
        "dyn(scope) == 1",
        "size(scope) > 0 && scope.size() < 100",
        "subject.claims.level >= 2 && subject.attributes.level < 2.5",
        "now - duration('1h') < timestamp('2030-01-01T00:00:00Z')",
        "now.getHours('Europe/Berlin') in [9, 10, 11]",
        "subject.attributes.groups.exists(g, g.startsWith('eng'))",
        "[1, 'a'].size() == 2",  # a mixed list literal is a list(dyn)
        "type(scope) == string",
        "has(subject.attributes.groups) && context.client_ip.inCidr('10.0.0.0/8')",
        "scope.matches('^repo') ? true : context.connected",
        "1 < 2.5 && 2u <= 3.0",  # numbers of mixed kinds are ordered
    ],
)
def test_well_typed_and_dynamic_conditions_load(tmp_path: Path, condition: str) -> None:
    _load(tmp_path, condition)


def test_a_dynamic_value_of_the_wrong_type_fails_closed_at_evaluation(tmp_path: Path) -> None:
    policies = _load(tmp_path, "subject.attributes.groups.contains('sales')")
    now = datetime.now(UTC)
    as_string = decide(policies, request(groups="sales, eng"), now=now)
    assert as_string.effect is Effect.ALLOW
    as_list = decide(policies, request(groups=["sales"]), now=now)
    assert as_list.effect is Effect.DENY


def test_a_dynamic_condition_that_is_no_bool_fails_closed(tmp_path: Path) -> None:
    policies = _load(tmp_path, "subject.attributes.admin")
    now = datetime.now(UTC)
    assert decide(policies, request(admin=True), now=now).effect is Effect.ALLOW
    assert decide(policies, request(admin="yes"), now=now).effect is Effect.DENY


def test_every_error_of_a_file_is_reported(tmp_path: Path) -> None:
    text = _policy("scope") + (
        "  - name: second\n    effect: deny\n    condition: '[1].contains(1)'\n"
    )
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_set(write_policy_dir(tmp_path, text))
    assert [(i.rule, i.line) for i in caught.value.issues] == [
        ("the-rule", CONDITION_LINE),
        ("second", CONDITION_LINE + 3),
    ]


def test_the_shipped_policies_load() -> None:
    policies = load_policy_set(REPOSITORY / "policies")
    assert policies.revision
