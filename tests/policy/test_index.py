"""The target index finds exactly the rules a scan of the whole bucket finds, in the same order.

The oracle is the algorithm the engine used before the index: test every rule of the bucket
with `applies_to`, in (policy, rule) order.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import POLICY_LAYERS, Effect
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.policy.compiled import CompiledRule, LayerIndex, RuleBucket
from policy_engine.policy.index import RuleIndex, applies_to_any
from policy_engine.policy.loader import _index_by_integration
from policy_engine.policy.patterns import Matcher
from tests.policy_builder import request, write_organization

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
EVERYTHING = Matcher.of(["*"])

# Short values over a tiny alphabet: exact values, prefixes, suffixes and globs overlap a lot.
values = st.text(alphabet="ab:", max_size=4)
patterns = st.one_of(values, st.text(alphabet="ab:*?", min_size=1, max_size=5), st.just("*"))
pattern_lists = st.one_of(st.none(), st.lists(patterns, min_size=1, max_size=3))


def _matchers(policy_target: list[str] | None, rule_target: list[str] | None) -> tuple:
    """As the loader builds them: policy and rule target, a `*` (or no target) dropped."""
    candidates = (Matcher.of(policy_target or ["*"]), Matcher.of(rule_target or ["*"]))
    return tuple(m for m in candidates if not m.everything)


def _rule(policy: str, name: str, effect: Effect, targets: dict[str, Any]) -> CompiledRule:
    return CompiledRule(
        policy=policy,
        name=name,
        effect=effect,
        code=ErrorCode.POLICY_DENIED,
        message="",
        condition=None,
        subject_matchers=_matchers(targets["ps"], targets["rs"]),
        application_matchers=_matchers(targets["pa"], targets["ra"]),
        scope_matchers=_matchers(targets["pc"], targets["rc"]),
        reads_clock=False,
        cacheable=True,
    )


rule_targets = st.fixed_dictionaries(
    {key: pattern_lists for key in ("ps", "rs", "pa", "ra", "pc", "rc")}
)
rule_lists = st.lists(rule_targets, max_size=40).map(
    lambda generated: tuple(
        _rule(f"p{index // 3:03d}", f"r{index % 3}", Effect.DENY, targets)
        for index, targets in enumerate(generated)
    )
)
requests = st.tuples(values, values, values)


def scan(rules: tuple[CompiledRule, ...], subject: str, application: str, scope: str) -> list:
    return [rule for rule in rules if rule.applies_to(subject, application, scope)]


@settings(max_examples=400, deadline=None)
@given(rule_lists, st.lists(requests, min_size=1, max_size=25), st.sampled_from([0, 1, 8]))
def test_the_index_returns_exactly_the_rules_a_scan_returns(rules, reqs, scan_below) -> None:
    index = RuleIndex(rules, scan_below=scan_below)
    ordinal = {id(rule): position for position, rule in enumerate(rules)}
    # Requests built from the rules' own exact values and glob literals match some rules.
    literals = [p.replace("*", "").replace("?", "a") for r in rules for p in _patterns(r)]
    reqs = reqs + [(v, v, v) for v in literals[:10]]
    for subject, application, scope in reqs:
        candidates = list(index.candidates(subject, application, scope))
        positions = [ordinal[id(rule)] for rule in candidates]
        assert positions == sorted(set(positions))  # bucket order, each rule once
        found = [rule for rule in candidates if rule.applies_to(subject, application, scope)]
        assert found == scan(rules, subject, application, scope)


@settings(max_examples=300, deadline=None)
@given(rule_lists, st.lists(st.tuples(values, values, values, values), min_size=1, max_size=25))
def test_candidates_for_two_subjects_are_those_a_scan_finds_for_either(rules, reqs) -> None:
    """An external user is matched as its person and its external ID together (a deny naming
    either applies): the candidates hold every rule `applies_to_any` accepts, in bucket
    order, once."""
    for scan_below in (0, 8):
        index = RuleIndex(rules, scan_below=scan_below)
        ordinal = {id(rule): position for position, rule in enumerate(rules)}
        for person, external, application, scope in reqs:
            candidates = list(index.candidates_for_any((person, external), application, scope))
            positions = [ordinal[id(rule)] for rule in candidates]
            assert positions == sorted(set(positions))
            subjects = (person, external)
            found = [r for r in candidates if applies_to_any(r, subjects, application, scope)]
            assert found == [r for r in rules if applies_to_any(r, subjects, application, scope)]
            # ... which holds every rule that applies to either alone.
            for rule in scan(rules, person, application, scope):
                assert rule in found
            for rule in scan(rules, external, application, scope):
                assert rule in found


def _patterns(rule: CompiledRule) -> list[str]:
    matchers = rule.subject_matchers + rule.application_matchers + rule.scope_matchers
    return [p for m in matchers for p in m.patterns]


def test_each_kind_of_target_is_found_through_its_own_map() -> None:
    """Exact, prefix glob, suffix glob, `?` and untargeted rules, each found only when it
    can apply; an unanchored glob (`*a*`) is a candidate for every request."""
    none: list[str] | None = None
    blank = {"ps": none, "rs": none, "pa": none, "ra": none, "pc": none, "rc": none}
    rules = (
        _rule("p0", "exact", Effect.DENY, {**blank, "ps": ["alice", "bob"]}),
        _rule("p1", "prefix", Effect.DENY, {**blank, "pa": ["bot-*"]}),
        _rule("p2", "suffix", Effect.DENY, {**blank, "pc": ["*:admin"]}),
        _rule("p3", "question", Effect.DENY, {**blank, "ps": ["team-?"]}),
        _rule("p4", "unanchored", Effect.DENY, {**blank, "ps": ["*a*"]}),
        _rule("p5", "untargeted", Effect.DENY, blank),
    )
    index = RuleIndex(rules, scan_below=0)

    def names(subject: str, application: str, scope: str) -> list[str]:
        return [rule.name for rule in index.candidates(subject, application, scope)]

    assert names("carol", "app", "repo") == ["unanchored", "untargeted"]
    assert names("alice", "bot-1", "org:admin") == [
        "exact",
        "prefix",
        "suffix",
        "unanchored",
        "untargeted",
    ]
    assert names("team-x", "app", "repo") == ["question", "unanchored", "untargeted"]


def _user_rules(count: int) -> list[tuple[CompiledRule, Matcher]]:
    """`count` user policies of two rules each (one per subject, like an SSO sync writes),
    plus a few group globs and one baseline for everyone: templated, so fast to build."""
    rules: list[tuple[CompiledRule, Matcher]] = []
    blank: dict[str, Any] = {"ps": None, "rs": None, "pa": None, "ra": None, "pc": None}
    for index in range(count):
        subject = {**blank, "ps": [f"user-{index:05d}"]}
        rules.append(
            (_rule(f"user-{index:05d}", "tools", Effect.ALLOW, {**subject, "rc": None}), EVERYTHING)
        )
        rules.append(
            (
                _rule(f"user-{index:05d}", "no-admin", Effect.DENY, {**subject, "rc": ["admin:*"]}),
                EVERYTHING,
            )
        )
    for team in range(20):
        targets = {**blank, "ps": [f"user-{team:02d}*"], "rc": None}
        rules.append((_rule(f"team-{team:02d}", "team", Effect.ALLOW, targets), EVERYTHING))
    rules.append((_rule("baseline", "everyone", Effect.ALLOW, {**blank, "rc": None}), EVERYTHING))
    return rules


def test_ten_thousand_user_policies_give_a_handful_of_candidates() -> None:
    rules = _user_rules(10_000)
    buckets = _index_by_integration(frozenset({"github", "linear"}), rules)
    bucket = buckets["github"]
    assert bucket is buckets["linear"]  # same rules for both integrations: built once
    assert len(bucket.denies) == 10_000 and len(bucket.allows) == 10_021
    for subject, scope in [("user-05000", "admin:org"), ("user-00042", "repo"), ("nobody", "repo")]:
        denies = list(bucket.denies.candidates(subject, "app", scope))
        allows = list(bucket.allows.candidates(subject, "app", scope))
        # Its own two rules, its team's glob (`user-05*`, `user-00*`) and the baseline: never
        # any of the other 20,000.
        assert len(denies) <= 1 and len(allows) <= 3
        assert [r for r in denies if r.applies_to(subject, "app", scope)] == scan(
            bucket.denies.rules, subject, "app", scope
        )
        assert [r for r in allows if r.applies_to(subject, "app", scope)] == scan(
            bucket.allows.rules, subject, "app", scope
        )


# -- decide() on real policy files: the indexed engine against a scanning one ----------------

SUBJECTS = ["a", "ab", "abc", "b", "ba", "b:a"]
APPLICATIONS = ["a", "ab", "abc", "ba", "b-a"]
SCOPES = ["a", "ab", "a:b", "ba", "read:org", "admin:org"]
target_patterns = {
    "subjects": st.sampled_from([*SUBJECTS, "*", "a*", "*a", "a?", "?", "b*a", "*:*", "ab?*"]),
    "applications": st.sampled_from([*APPLICATIONS, "*", "a*", "*a", "?b*", "b-?"]),
    "scopes": st.sampled_from([*SCOPES, "*", "a*", "*:org", "read:*", "a?b", "*a*"]),
}
CONDITIONS = [None, "true", "false", '"x" in subject.attributes.groups', 'scope.startsWith("a")']


def _target(required: str | None = None) -> st.SearchStrategy[dict[str, list[str]]]:
    return st.fixed_dictionaries(
        {},
        optional={
            dim: st.lists(patterns, min_size=1, max_size=3)
            for dim, patterns in target_patterns.items()
            if dim != required
        },
    ).flatmap(
        lambda target: (
            st.lists(target_patterns[required], min_size=1, max_size=3).map(
                lambda values: {**target, required: values}
            )
            if required
            else st.just(target)
        )
    )


def _policy(layer: str) -> st.SearchStrategy[dict[str, Any]]:
    owner = {"user": "subjects", "application": "applications"}.get(layer)
    rule = st.fixed_dictionaries(
        {"effect": st.sampled_from(["allow", "deny"])},
        optional={"condition": st.sampled_from(CONDITIONS[1:]), "target": _target()},
    )
    return st.fixed_dictionaries(
        {
            "layer": st.just(layer),
            "target": _target(owner),
            "rules": st.lists(rule, min_size=1, max_size=3),
        }
    )


policy_lists = st.lists(
    st.sampled_from(["org", "user", "application"]).flatmap(_policy), max_size=12
).map(
    lambda generated: [
        {
            "name": f"p{index}",
            **policy,
            "rules": [{"name": f"r{n}", **rule} for n, rule in enumerate(policy["rules"])],
        }
        for index, policy in enumerate(generated)
    ]
)
decide_requests = st.tuples(
    st.sampled_from([*SUBJECTS, "zz"]),
    st.sampled_from(APPLICATIONS),
    st.sampled_from([*SCOPES, "zz"]),
    st.sampled_from(["github", "linear"]),
    st.sampled_from([{}, {"groups": ["x"]}]),
    st.booleans(),
)


def _with_scan_below(policies: CompiledPolicySet, scan_below: int) -> CompiledPolicySet:
    """The same set with every bucket rebuilt: 0 forces the index, a huge number a scan."""

    def rebuilt(layer: LayerIndex) -> LayerIndex:
        buckets = {
            integration: RuleBucket(
                RuleIndex(bucket.denies.rules, scan_below=scan_below),
                RuleIndex(bucket.allows.rules, scan_below=scan_below),
            )
            for integration, bucket in layer.by_integration.items()
        }
        return replace(layer, by_integration=MappingProxyType(buckets))

    organizations = {
        name: replace(org, layers=MappingProxyType({k: rebuilt(v) for k, v in org.layers.items()}))
        for name, org in policies.organizations.items()
    }
    return replace(policies, organizations=MappingProxyType(organizations))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy_lists,
    st.fixed_dictionaries(
        {layer.value: st.sampled_from(["allow", "deny"]) for layer in POLICY_LAYERS}
    ),
    st.lists(decide_requests, min_size=1, max_size=20),
)
def test_decisions_and_traces_are_those_of_a_scanning_engine(documents, defaults, reqs) -> None:
    with tempfile.TemporaryDirectory() as folder:
        write_organization(
            Path(folder), "acme", applications=APPLICATIONS, defaults=defaults, policies=documents
        )
        loaded = load_policy_set(Path(folder))
    indexed = _with_scan_below(loaded, 0)
    scanned = _with_scan_below(loaded, 1 << 30)
    for subject, application, scope, integration, attributes, explain in reqs:
        generated = request(
            scope,
            subject=subject,
            application=application,
            integration=integration,
            explain=explain,
            **attributes,
        )
        expected = decide(scanned, generated, now=NOW)
        assert decide(indexed, generated, now=NOW) == expected
        assert decide(loaded, generated, now=NOW) == expected
