"""Finds the few rules of a bucket that can apply to a request, without testing them all.

Each rule is indexed by ONE of its target matchers (subject, application or scope; the most
selective one, see `_choose`): under each of its exact values in a hash map, and under each
glob's literal prefix (text before the first `*`/`?`) or literal suffix (text after the last),
whichever is longer, in a map per anchor length. A value a matcher accepts is one of its exact
values or matches one of its globs, so it starts (or ends) with that glob's anchor: looking up
the request's value, each of its prefixes/suffixes of a length some glob uses, finds every rule
that can apply. Rules with no usable anchor (no target, or a glob with no literal at either
end, such as `*admin*`) are candidates for every request.

Candidates are a superset of the applicable rules, in the bucket's (policy, rule) order; the
engine still confirms each with `CompiledRule.applies_to`, so what applies, in which order, is
exactly what a scan of the whole bucket finds. A lookup costs one hash probe per dimension, plus
one per distinct anchor length in use, plus the candidates found.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from policy_engine.policy.patterns import Matcher

if TYPE_CHECKING:
    from policy_engine.policy.compiled import CompiledRule

# A bucket with fewer rules than this is scanned: three map probes cost about as much as
# testing two or three rules (~0.3-0.6 µs each), and small buckets then hold no maps.
SCAN_BELOW = 4

_WILDCARDS = "*?"


@functools.lru_cache(maxsize=4096)
def _anchor(pattern: str) -> tuple[int, bool, str]:
    """(length, is_prefix, literal) for a glob: its longer literal end (the prefix on a tie).
    Cached: the same patterns recur across thousands of rules (`admin:*`, `team-*`)."""
    first = min(pattern.find(c) if c in pattern else len(pattern) for c in _WILDCARDS)
    last = max(pattern.rfind(c) for c in _WILDCARDS)
    prefix, suffix = pattern[:first], pattern[last + 1 :]
    if len(prefix) >= len(suffix):
        return len(prefix), True, prefix
    return len(suffix), False, suffix


def _score(matcher: Matcher) -> tuple[int, int]:
    """Higher is more selective: exact-only matchers first (fewer values better), then the
    shortest anchor among the matcher's globs (longer better); (0, 0): no usable anchor."""
    if not matcher.globs:
        return (2, -len(matcher.exact))
    shortest = min(_anchor(glob.pattern)[0] for glob in matcher.globs)
    return (1, shortest) if shortest else (0, 0)


def _choose(rule: CompiledRule) -> tuple[int, Matcher] | None:
    """The (dimension, matcher) to index `rule` by, or None when it has no usable anchor.

    Any matcher of a dimension will do: a dimension's matchers are a conjunction (policy
    target and rule target), so every value the rule accepts is accepted by each of them."""
    best_score, best = (0, 0), None
    for dimension, matchers in enumerate(
        (rule.subject_matchers, rule.application_matchers, rule.scope_matchers)
    ):
        for matcher in matchers:
            score = _score(matcher)
            if score > best_score:  # ties: the earlier dimension
                best_score, best = score, (dimension, matcher)
    return best


class _Dimension:
    """The maps of one dimension: exact values, and glob anchors by length (ascending)."""

    __slots__ = ("exact", "prefixes", "suffixes")

    def __init__(self) -> None:
        self.exact: dict[str, tuple[CompiledRule, ...]] = {}
        self.prefixes: tuple[tuple[int, dict[str, tuple[CompiledRule, ...]]], ...] = ()
        self.suffixes: tuple[tuple[int, dict[str, tuple[CompiledRule, ...]]], ...] = ()

    def gather(self, value: str, hits: list[tuple[CompiledRule, ...]]) -> None:
        """Appends the rule tuples filed under `value`, its prefixes and its suffixes."""
        hit = self.exact.get(value)
        if hit is not None:
            hits.append(hit)
        if self.prefixes:
            size = len(value)
            for length, by_prefix in self.prefixes:
                if length > size:
                    break
                hit = by_prefix.get(value[:length])
                if hit is not None:
                    hits.append(hit)
        if self.suffixes:
            size = len(value)
            for length, by_suffix in self.suffixes:
                if length > size:
                    break
                hit = by_suffix.get(value[size - length :])
                if hit is not None:
                    hits.append(hit)


# What a scanned index holds instead of maps: never read, shared by every small bucket.
_UNUSED = (_Dimension(), _Dimension(), _Dimension())


class RuleIndex:
    """The rules of one effect in one bucket (layer and integration), in (policy, rule) order.

    `rules` is every rule; `candidates(subject, application, scope)` returns a sequence of
    them, in the same order and without repeats, that contains every rule whose `applies_to`
    accepts the request (it may contain others; callers confirm with `applies_to`). Immutable
    once built; lookups allocate only when hits from several keys must be merged.
    """

    __slots__ = ("_always", "_dimensions", "_ordinal", "rules", "scan")

    def __init__(self, rules: Iterable[CompiledRule], *, scan_below: int = SCAN_BELOW) -> None:
        """`rules` in (policy, rule) order; with fewer than `scan_below` of them, every rule is
        a candidate and no maps are built."""
        self.rules: tuple[CompiledRule, ...] = tuple(rules)
        self.scan = len(self.rules) < scan_below
        self._dimensions = _UNUSED
        self._always: tuple[CompiledRule, ...] = ()
        self._ordinal: dict[CompiledRule, int] = {}
        if not self.scan:
            self._dimensions = (_Dimension(), _Dimension(), _Dimension())
            self._build()

    def _build(self) -> None:
        exact: list[dict[str, list[CompiledRule]]] = [{}, {}, {}]
        prefixes: list[dict[int, dict[str, list[CompiledRule]]]] = [{}, {}, {}]
        suffixes: list[dict[int, dict[str, list[CompiledRule]]]] = [{}, {}, {}]
        always: list[CompiledRule] = []
        for ordinal, rule in enumerate(self.rules):
            self._ordinal[rule] = ordinal
            chosen = _choose(rule)
            if chosen is None:
                always.append(rule)
                continue
            dimension, matcher = chosen
            # Rules arrive in order, so every list stays sorted. A rule is filed once per key
            # (a repeat would make it a candidate twice): `exact` is a set, anchors deduped.
            by_value = exact[dimension]
            for value in matcher.exact:
                by_value.setdefault(value, []).append(rule)
            for length, is_prefix, literal in {_anchor(glob.pattern) for glob in matcher.globs}:
                by_length = prefixes[dimension] if is_prefix else suffixes[dimension]
                by_length.setdefault(length, {}).setdefault(literal, []).append(rule)
        for dimension, maps in enumerate(self._dimensions):
            maps.exact = {key: tuple(found) for key, found in exact[dimension].items()}
            maps.prefixes = _frozen(prefixes[dimension])
            maps.suffixes = _frozen(suffixes[dimension])
        self._always = tuple(always)

    def candidates(self, subject: str, application: str, scope: str) -> Sequence[CompiledRule]:
        """The rules that may apply to the request, in (policy, rule) order, each once."""
        if self.scan:
            return self.rules
        hits: list[tuple[CompiledRule, ...]] = []
        subjects, applications, scopes = self._dimensions
        subjects.gather(subject, hits)
        applications.gather(application, hits)
        scopes.gather(scope, hits)
        if self._always:
            hits.append(self._always)
        if not hits:
            return ()
        if len(hits) == 1:
            return hits[0]
        # A rule is filed under one dimension, but under several keys of it ("alice" and
        # "al*" both match "alice"): merge, drop repeats, restore the bucket order.
        found = {rule for hit in hits for rule in hit}
        return sorted(found, key=self._ordinal.__getitem__)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleIndex({len(self.rules)} rules{', scanned' if self.scan else ''})"


def _frozen(
    by_length: dict[int, dict[str, list[CompiledRule]]],
) -> tuple[tuple[int, dict[str, tuple[CompiledRule, ...]]], ...]:
    return tuple(
        (length, {key: tuple(found) for key, found in by_length[length].items()})
        for length in sorted(by_length)
    )
