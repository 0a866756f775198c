"""Thousands of policy files repeat the same rule names, conditions and targets: the parsed
model holds each distinct one once (a generated set, read from disk by the strict reader)."""

from __future__ import annotations

from pathlib import Path

from policy_engine.bench.scale_sets import SetSpec, generate
from policy_engine.policy.model import Policy, Target
from policy_engine.policy.parse import EVERYWHERE, DocumentParser, LoadIssue
from policy_engine.policy.yamlpos import PositionedDict, load_documents


def parsed_policies(root: Path) -> list[Policy]:
    issues: list[LoadIssue] = []
    policies: list[Policy] = []
    for path in sorted((root / "acme" / "users").glob("*.yaml")):
        parser = DocumentParser(path, issues)
        for document in load_documents(path.read_text()).documents:
            assert isinstance(document.value, PositionedDict)
            policy = parser.policy(document.value)
            assert policy is not None
            policies.append(policy)
    assert issues == []
    return policies


def test_repeated_names_conditions_and_targets_are_held_once(tmp_path: Path) -> None:
    generate(SetSpec(300, "templated"), tmp_path / "set")
    policies = parsed_policies(tmp_path / "set")
    rules = [rule for policy in policies for rule in policy.rules]
    by_text: dict[object, set[int]] = {}
    for rule in rules:
        for value in (rule.name, rule.condition, rule.target, *rule.target.scopes):
            by_text.setdefault(value, set()).add(id(value))
    assert len({rule.name for rule in rules}) < len(rules)  # the set does repeat them
    assert all(len(ids) == 1 for ids in by_text.values()), {
        value: len(ids) for value, ids in by_text.items() if len(ids) > 1
    }
    # A rule without a target shares the one "everywhere" target.
    assert any(rule.target is EVERYWHERE for rule in rules)
    assert Target() == EVERYWHERE


def test_shared_targets_read_as_written(tmp_path: Path) -> None:
    """Sharing must not mix up dimensions or order: each target reads back as written."""
    root = tmp_path / "set"
    (root / "acme" / "users").mkdir(parents=True)
    texts = {
        "a": "subjects: [u1]\n  scopes: [b, a]",
        "b": "subjects: [u1]\n  applications: [b, a]",
        "c": "subjects: [u1]\n  scopes: [a, b]",
        "d": "subjects: [u1]\n  scopes: [b, a]",
    }
    for name, target in texts.items():
        (root / "acme" / "users" / f"{name}.yaml").write_text(
            f"kind: Policy\nname: {name}\nlayer: user\ntarget:\n  {target}\n"
            "rules:\n  - name: r\n    effect: allow\n"
        )
    a, b, c, d = (policy.target for policy in parsed_policies(root))
    assert (a.scopes, a.applications) == (("b", "a"), ("*",))
    assert (b.scopes, b.applications) == (("*",), ("b", "a"))
    assert c.scopes == ("a", "b")
    assert d is a and c is not a and b is not a
