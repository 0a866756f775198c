"""Static target patterns: exact values and `*`/`?` globs, compiled once to be indexed."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from policy_engine.cel.functions import GlobPattern

WILDCARD = "*"

# Distinct target tuples kept built. A set of 10,000 user policies holds about 10,000 (one
# subject each) plus a few shared ones (`*`, `admin:*`); past the bound the least recently
# used are built again when asked for, so a reload never grows this.
MATCHER_CACHE_SIZE = 32 * 1024


def is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


@dataclass(frozen=True, slots=True)
class Matcher:
    """Matches a value against a set of exact values and globs; `everything` short-circuits `*`."""

    exact: frozenset[str]
    # The same glob semantics as the CEL `glob` helper: one implementation, linear-time matching.
    globs: tuple[GlobPattern, ...]
    everything: bool
    patterns: tuple[str, ...]

    @classmethod
    def of(cls, patterns: Iterable[str]) -> Matcher:
        """The matcher of `patterns` (exact values and globs, as a target lists them).

        Matchers are immutable, so one is built per distinct tuple and shared: the same few
        targets recur across thousands of rules, and each call is then a dict lookup."""
        key = patterns if type(patterns) is tuple else tuple(patterns)
        if cls is Matcher:
            return _shared_matcher(key)
        return cls._build(key)

    @classmethod
    def _build(cls, patterns: tuple[str, ...]) -> Matcher:
        everything = WILDCARD in patterns
        exact = frozenset(p for p in patterns if not is_glob(p))
        globs = () if everything else tuple(GlobPattern(p) for p in patterns if is_glob(p))
        return cls(exact=exact, globs=globs, everything=everything, patterns=patterns)

    def __call__(self, value: str) -> bool:
        if self.everything or value in self.exact:
            return True
        for glob in self.globs:  # noqa: SIM110 (no generator: runs for every candidate rule)
            if glob.match(value):
                return True
        return False


@functools.lru_cache(maxsize=MATCHER_CACHE_SIZE)
def _shared_matcher(patterns: tuple[str, ...]) -> Matcher:
    return Matcher._build(patterns)
