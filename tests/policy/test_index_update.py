"""An index updated in place of a few rules is the index a full build gives, lookup for lookup.

RuleIndex.updated (what a reload uses when a few policy files of a large organization change)
must hold the same rules, in the same (policy, rule) order, and return exactly the candidates
RuleIndex(all the rules) returns, which the scan property test in test_index.py ties to a scan
of the whole bucket. Rules are random, with exact and glob targets on every dimension.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policy_engine.domain.decision import Effect
from policy_engine.policy.index import RuleIndex
from tests.policy.test_index import _rule, requests, rule_targets, scan


def _rules(generated: list, tag: str) -> list:
    """Rules named so that old, kept and new ones interleave in (policy, rule) order."""
    return [
        _rule(f"p{index:03d}{tag}", "r", Effect.DENY, targets)
        for index, targets in enumerate(generated)
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(rule_targets, max_size=30),
    st.lists(rule_targets, max_size=6),
    st.data(),
    st.lists(requests, min_size=1, max_size=20),
    st.sampled_from([0, 1, 4, 8]),
)
def test_an_updated_index_equals_a_full_build(old, new, data, reqs, scan_below) -> None:
    before = _rules(old, "a")
    added = _rules(new, "b")
    removed = set(data.draw(st.lists(st.sampled_from(before), unique=True)) if before else [])
    expected_rules = sorted(
        [rule for rule in before if rule not in removed] + added,
        key=lambda rule: (rule.policy, rule.name),
    )
    updated = RuleIndex(before, scan_below=scan_below).updated(removed, added)
    full = RuleIndex(expected_rules, scan_below=scan_below)
    assert updated.rules == full.rules
    assert updated.scan == full.scan
    for subject, application, scope in reqs:
        found = list(updated.candidates(subject, application, scope))
        assert found == list(full.candidates(subject, application, scope))
        applicable = [rule for rule in found if rule.applies_to(subject, application, scope)]
        assert applicable == scan(full.rules, subject, application, scope)


@settings(max_examples=100, deadline=None)
@given(st.lists(rule_targets, min_size=8, max_size=30), st.lists(requests, max_size=10))
def test_updates_chain_like_reloads(old, reqs) -> None:
    """Each reload updates the index the previous one updated: one rule replaced each time."""
    rules = _rules(old, "a")
    index = RuleIndex(rules)
    for step, replaced in enumerate(list(rules[::3])):
        fresh = _rule(replaced.policy, replaced.name, Effect.DENY, old[(step * 7) % len(old)])
        index = index.updated({replaced}, [fresh])
        rules = [fresh if rule is replaced else rule for rule in rules]
        full = RuleIndex(rules)
        assert index.rules == full.rules
        for request in reqs:
            assert list(index.candidates(*request)) == list(full.candidates(*request))


def test_an_update_keeps_the_other_rules_filed_where_they_were() -> None:
    """The point of updating: the keys of rules that did not change are not built again."""
    targets = {key: None for key in ("ps", "pa", "ra", "pc", "rc")}
    rules = [
        _rule(f"p{n:05d}", "r", Effect.DENY, {**targets, "rs": [f"user-{n}"]}) for n in range(100)
    ]
    index = RuleIndex(rules)
    replacement = _rule("p00042", "r", Effect.DENY, {**targets, "rs": ["user-42b"]})
    updated = index.updated({rules[42]}, [replacement])
    assert updated.candidates("user-7", "app", "read") is index.candidates("user-7", "app", "read")
    assert list(updated.candidates("user-42b", "app", "read")) == [replacement]
    assert list(updated.candidates("user-42", "app", "read")) == []
    assert index.updated(set(), []) is index
