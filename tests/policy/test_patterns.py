"""Target matchers are built once per distinct target and shared: the same few targets recur
across thousands of rules. Sharing must not change what any of them accepts."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from policy_engine.bench.scale_sets import SetSpec, generate
from policy_engine.cel.functions import GlobPattern
from policy_engine.policy import load_policy_set
from policy_engine.policy.patterns import MATCHER_CACHE_SIZE, Matcher, is_glob

PATTERNS = st.lists(
    st.sampled_from(["*", "github", "admin:*", "a?c", "*:read", "abc", "x*y*z", "?"]),
    min_size=1,
    max_size=4,
)
VALUES = st.sampled_from(["github", "admin:org", "abc", "aXc", "repo:read", "xyz", "x", ""])


def fresh(patterns: list[str]) -> tuple[bool, frozenset[str], tuple[GlobPattern, ...]]:
    """What Matcher.of built before matchers were shared, spelled out."""
    everything = "*" in patterns
    exact = frozenset(p for p in patterns if not is_glob(p))
    globs = () if everything else tuple(GlobPattern(p) for p in patterns if is_glob(p))
    return everything, exact, globs


def test_one_matcher_per_distinct_target() -> None:
    first = Matcher.of(("admin:*", "github"))
    assert Matcher.of(["admin:*", "github"]) is first  # a list names the same target
    assert Matcher.of(p for p in ("admin:*", "github")) is first
    assert Matcher.of(("github", "admin:*")) is not first  # order is kept: patterns shows it
    assert Matcher.of(("github", "admin:*")).patterns == ("github", "admin:*")


@settings(max_examples=300, deadline=None)
@given(PATTERNS, VALUES)
def test_a_shared_matcher_accepts_what_a_fresh_one_does(patterns: list[str], value: str) -> None:
    everything, exact, globs = fresh(patterns)
    expected = everything or value in exact or any(g.match(value) for g in globs)
    shared = Matcher.of(patterns)
    assert shared(value) is expected
    assert (shared.everything, shared.exact, shared.patterns) == (
        everything,
        exact,
        tuple(patterns),
    )
    assert [g.pattern for g in shared.globs] == [g.pattern for g in globs]


def test_a_loaded_set_shares_the_matchers_of_repeated_targets(tmp_path: Path) -> None:
    """Generated user policies: every rule's scope target is one of a few, and each is one
    object however many rules name it (the cache stays within its bound)."""
    root = tmp_path / "policies"
    generate(SetSpec(200, "templated"), root)
    loaded = load_policy_set(root)
    scope_matchers: dict[tuple[str, ...], set[int]] = {}
    for organization in loaded.organizations.values():
        for layer in organization.layers.values():
            for bucket in layer.by_integration.values():
                for rule in (*bucket.denies.rules, *bucket.allows.rules):
                    for matcher in rule.scope_matchers:
                        scope_matchers.setdefault(matcher.patterns, set()).add(id(matcher))
    assert scope_matchers
    assert all(len(ids) == 1 for ids in scope_matchers.values()), scope_matchers
    assert MATCHER_CACHE_SIZE >= 10_000  # one subject target per user policy at 10,000 users
