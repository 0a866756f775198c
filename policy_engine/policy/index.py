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
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Generic, Protocol, TypeVar

from policy_engine.policy.patterns import Matcher


class Targeted(Protocol):
    """What the index reads of an entry: its target matchers, and (policy, name) for order.
    Rules (`_R`) and quotas (`CompiledQuota`) both are; entries are hashable."""

    @property
    def policy(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def subject_matchers(self) -> tuple[Matcher, ...]: ...
    @property
    def application_matchers(self) -> tuple[Matcher, ...]: ...
    @property
    def scope_matchers(self) -> tuple[Matcher, ...]: ...
    def __hash__(self) -> int: ...


_R = TypeVar("_R", bound=Targeted)  # the kind of entry one index holds


def applies_to_any(
    entry: Targeted, subjects: tuple[str, ...], application: str, scope: str
) -> bool:
    """Whether `entry` applies to a request made as all of `subjects` at once (an external
    user: the person its ID maps to, and the ID): each subject matcher must accept one of
    them, so a policy naming the person whose rule names the external ID holds for that
    account; application and scope as `applies_to`. A superset of `applies_to` for each."""
    for matcher in entry.subject_matchers:
        if not any(matcher(subject) for subject in subjects):
            return False
    for matcher in entry.application_matchers:
        if not matcher(application):
            return False
    return all(matcher(scope) for matcher in entry.scope_matchers)


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


def _choose(rule: Targeted) -> tuple[int, Matcher] | None:
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


class _Dimension(Generic[_R]):
    """The maps of one dimension: exact values, and glob anchors by length (ascending)."""

    __slots__ = ("exact", "prefixes", "suffixes")

    def __init__(self) -> None:
        self.exact: dict[str, tuple[_R, ...]] = {}
        self.prefixes: tuple[tuple[int, dict[str, tuple[_R, ...]]], ...] = ()
        self.suffixes: tuple[tuple[int, dict[str, tuple[_R, ...]]], ...] = ()

    def gather(self, value: str, hits: list[tuple[_R, ...]]) -> None:
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
_UNUSED: tuple[_Dimension[Any], ...] = (_Dimension(), _Dimension(), _Dimension())


class RuleIndex(Generic[_R]):
    """The rules of one effect in one bucket (layer and integration), in (policy, rule) order.

    `rules` is every rule; `candidates(subject, application, scope)` returns a sequence of
    them, in the same order and without repeats, that contains every rule whose `applies_to`
    accepts the request (it may contain others; callers confirm with `applies_to`). Immutable
    once built; lookups allocate only when hits from several keys must be merged.
    """

    __slots__ = ("_always", "_dimensions", "_ordinal", "_scan_below", "rules", "scan")

    def __init__(self, rules: Iterable[_R], *, scan_below: int = SCAN_BELOW) -> None:
        """`rules` in (policy, rule) order; with fewer than `scan_below` of them, every rule is
        a candidate and no maps are built."""
        self.rules: tuple[_R, ...] = tuple(rules)
        self._scan_below = scan_below
        self.scan = len(self.rules) < scan_below
        self._dimensions = _UNUSED
        self._always: tuple[_R, ...] = ()
        self._ordinal: dict[_R, int] = {}
        if not self.scan:
            self._dimensions = (_Dimension(), _Dimension(), _Dimension())
            self._build()

    def _build(self) -> None:
        exact: list[dict[str, list[_R]]] = [{}, {}, {}]
        prefixes: list[dict[int, dict[str, list[_R]]]] = [{}, {}, {}]
        suffixes: list[dict[int, dict[str, list[_R]]]] = [{}, {}, {}]
        always: list[_R] = []
        for ordinal, rule in enumerate(self.rules):
            self._ordinal[rule] = ordinal
            # Rules arrive in order, so every list stays sorted.
            for dimension, anchor, key in _keys(rule):
                if dimension < 0:
                    always.append(rule)
                elif anchor == 0:
                    exact[dimension].setdefault(key, []).append(rule)
                else:
                    by_length = prefixes[dimension] if anchor > 0 else suffixes[dimension]
                    by_length.setdefault(len(key), {}).setdefault(key, []).append(rule)
        for dimension, maps in enumerate(self._dimensions):
            maps.exact = {key: tuple(found) for key, found in exact[dimension].items()}
            maps.prefixes = _frozen(prefixes[dimension])
            maps.suffixes = _frozen(suffixes[dimension])
        self._always = tuple(always)

    def updated(self, removed: AbstractSet[_R], added: Iterable[_R]) -> RuleIndex[_R]:
        """This index with the `removed` rules (by identity) taken out and `added` put in:
        equal, in every lookup and in `rules`, to RuleIndex(the resulting rules in (policy,
        rule) order), but built in time proportional to the rules (a few dict operations
        each) plus the keys the changed rules are filed under, not to the rules' targets.

        For a reload that changes one policy among thousands: the other rules keep the keys
        they were filed under. (policy, rule) names are unique in a bucket (the loader refuses
        duplicates), so that order is total."""
        added = tuple(added)
        if not removed and not added:
            return self
        rules = sorted(
            [rule for rule in self.rules if rule not in removed] + list(added), key=_order
        )
        if self.scan or len(rules) < self._scan_below:
            return RuleIndex(rules, scan_below=self._scan_below)
        new: RuleIndex[_R] = RuleIndex((), scan_below=self._scan_below)
        new.rules, new.scan = tuple(rules), False
        new._ordinal = {rule: ordinal for ordinal, rule in enumerate(rules)}
        # Only the keys a changed rule is filed under change: copy the maps, not their tuples.
        exact = [dict(maps.exact) for maps in self._dimensions]
        prefixes = [{n: dict(m) for n, m in maps.prefixes} for maps in self._dimensions]
        suffixes = [{n: dict(m) for n, m in maps.suffixes} for maps in self._dimensions]
        always = list(self._always)
        for rule in removed:
            if rule not in self._ordinal:
                continue
            for dimension, anchor, key in _keys(rule):
                if dimension < 0:
                    always.remove(rule)
                    continue
                table = _table(exact, prefixes, suffixes, dimension, anchor, key)
                kept = tuple(r for r in table[key] if r is not rule)
                if kept:
                    table[key] = kept
                else:
                    del table[key]
        order = new._ordinal.__getitem__
        for rule in added:
            for dimension, anchor, key in _keys(rule):
                if dimension < 0:
                    always.append(rule)
                    continue
                table = _table(exact, prefixes, suffixes, dimension, anchor, key)
                table[key] = tuple(sorted((*table.get(key, ()), rule), key=order))
        new._dimensions = (_Dimension(), _Dimension(), _Dimension())
        for dimension, maps in enumerate(new._dimensions):
            maps.exact = exact[dimension]
            maps.prefixes = _frozen_tuples(prefixes[dimension])
            maps.suffixes = _frozen_tuples(suffixes[dimension])
        new._always = tuple(sorted(always, key=order))
        return new

    def candidates(self, subject: str, application: str, scope: str) -> Sequence[_R]:
        """The rules that may apply to the request, in (policy, rule) order, each once."""
        if self.scan:
            return self.rules
        hits: list[tuple[_R, ...]] = []
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

    def candidates_for_any(
        self, subjects: tuple[str, ...], application: str, scope: str
    ) -> Sequence[_R]:
        """The rules that may apply to a request made as any of `subjects` (an external user:
        the person its ID maps to and the external ID itself), in (policy, rule) order, each
        once: every rule `applies_to_any` accepts is among them (a rule is filed under one
        matcher's keys, and that matcher accepts one of `subjects`)."""
        if self.scan or len(subjects) == 1:
            return self.candidates(subjects[0], application, scope)
        found = {rule for s in subjects for rule in self.candidates(s, application, scope)}
        return sorted(found, key=self._ordinal.__getitem__)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleIndex({len(self.rules)} rules{', scanned' if self.scan else ''})"


def _order(rule: Targeted) -> tuple[str, str]:
    return (rule.policy, rule.name)


def _keys(rule: Targeted) -> Iterator[tuple[int, int, str]]:
    """Where `rule` is filed: (dimension, anchor, key) per key, anchor 0 for an exact value,
    1 for a glob's literal prefix, -1 for its suffix; a single (-1, 0, "") when it has no
    usable anchor (a candidate for every request). Each key once (a repeat would make the
    rule a candidate twice): `exact` is a set, anchors are deduplicated."""
    chosen = _choose(rule)
    if chosen is None:
        yield (-1, 0, "")
        return
    dimension, matcher = chosen
    for value in matcher.exact:
        yield (dimension, 0, value)
    for _, is_prefix, literal in {_anchor(glob.pattern) for glob in matcher.globs}:
        yield (dimension, 1 if is_prefix else -1, literal)


def _table(
    exact: list[dict[str, tuple[_R, ...]]],
    prefixes: list[dict[int, dict[str, tuple[_R, ...]]]],
    suffixes: list[dict[int, dict[str, tuple[_R, ...]]]],
    dimension: int,
    anchor: int,
    key: str,
) -> dict[str, tuple[_R, ...]]:
    """The map a key of `_keys` lives in (created empty for a new anchor length)."""
    if anchor == 0:
        return exact[dimension]
    by_length = prefixes[dimension] if anchor > 0 else suffixes[dimension]
    return by_length.setdefault(len(key), {})


def _frozen_tuples(
    by_length: dict[int, dict[str, tuple[_R, ...]]],
) -> tuple[tuple[int, dict[str, tuple[_R, ...]]], ...]:
    return tuple((length, by_length[length]) for length in sorted(by_length) if by_length[length])


def _frozen(
    by_length: dict[int, dict[str, list[_R]]],
) -> tuple[tuple[int, dict[str, tuple[_R, ...]]], ...]:
    return tuple(
        (length, {key: tuple(found) for key, found in by_length[length].items()})
        for length in sorted(by_length)
    )
