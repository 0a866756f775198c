"""Static target patterns: exact values and `*`/`?` globs, compiled once to be indexed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from policy_engine.cel.functions import GlobPattern

WILDCARD = "*"


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
        patterns = tuple(patterns)
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
