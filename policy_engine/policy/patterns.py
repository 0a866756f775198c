"""Static target patterns: exact values and `*`/`?` globs, compiled once so targets can be indexed."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

WILDCARD = "*"


def is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`*` matches any run of characters (`:` and `/` included), `?` one; nothing else is special."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Matcher:
    """Matches a value against a set of exact values and globs; `everything` short-circuits `*`."""

    exact: frozenset[str]
    globs: tuple[re.Pattern[str], ...]
    everything: bool
    patterns: tuple[str, ...]

    @classmethod
    def of(cls, patterns: Iterable[str]) -> Matcher:
        patterns = tuple(patterns)
        everything = WILDCARD in patterns
        exact = frozenset(p for p in patterns if not is_glob(p))
        globs = () if everything else tuple(glob_to_regex(p) for p in patterns if is_glob(p))
        return cls(exact=exact, globs=globs, everything=everything, patterns=patterns)

    def __call__(self, value: str) -> bool:
        if self.everything or value in self.exact:
            return True
        return any(glob.fullmatch(value) for glob in self.globs)


MATCH_ALL = Matcher.of([WILDCARD])

