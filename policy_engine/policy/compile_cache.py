"""What a load can reuse from the loads before it: parsed files, compiled rules, conditions.

A reload usually changes one file out of thousands. `CompileCache` (one per DirectoryBackend)
keeps, for the last good load:

- each policy file's parsed documents, keyed by its path and the SHA-256 of its bytes (so
  an unchanged file is neither parsed again nor are its rules compiled again), with the
  compiled rules of its policies;
- each compiled CEL condition, keyed by its source text and the compile environment it was
  compiled with (Declarations and CompileLimits): identical conditions anywhere in the set
  are compiled once, and a text compiled against other declarations or limits is never
  shared.

Everything cached is a pure function of its key (parsing depends only on the file's path and
bytes, compiling only on the policy, the rule and the environment), and only what parsed and
compiled without a single issue is cached, so a broken file can never poison a later load.
Indexes, catalog checks, duplicate-name checks and the revision are rebuilt by every load.

Bounded: after each attempt the cache keeps only what the last good load used plus what the
attempt itself used (at most two sets' worth, each bounded by policy_limits.max_set_bytes),
so entries cannot pile up across edits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from policy_engine import metrics
from policy_engine.cel import CompiledExpression, compile_expression
from policy_engine.cel.compiler import CompileLimits, Declarations
from policy_engine.policy.compiled import CompiledRule
from policy_engine.policy.model import OrganizationConfig, Policy, Rule

__all__ = ["CompileCache", "LoadAttempt", "ParsedFile"]

# (source text, declared variables with their fields, limits): what a compile depends on.
_EnvironmentKey = tuple[tuple[tuple[str, frozenset[str] | None], ...], CompileLimits]
_ConditionKey = tuple[str, _EnvironmentKey]
_FileKey = tuple[str, bytes]  # (path as the loader names it, SHA-256 of its bytes)
_DEFAULT_LIMITS = CompileLimits()


@dataclass(slots=True, eq=False)
class ParsedFile:
    """One policy file's documents, parsed without a single issue, and the rules compiled so
    far for its policies: `rules` maps id(rule) of a Rule in `policies` (kept alive by this
    entry, so the id is stable) to its CompiledRule and the condition cache key it used."""

    configs: tuple[OrganizationConfig, ...]
    policies: tuple[Policy, ...]
    rules: dict[int, tuple[CompiledRule, _ConditionKey | None]] = field(default_factory=dict)


def environment_key(declarations: Declarations, limits: CompileLimits) -> _EnvironmentKey:
    """A hashable value equal for equal compile environments (Declarations holds a mapping,
    which is not hashable itself)."""
    variables = tuple(sorted(declarations.variables.items()))
    return variables, limits


class CompileCache:
    """Parsed files, compiled rules and conditions of the last good load (see module doc).

    `parses` counts files parsed and `compiles` CEL conditions compiled through this cache
    (counts, never times): what a test or a metric watches to see what a load redid.
    Thread-safe: one attempt at a time holds it (`begin` to `finish`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[_FileKey, ParsedFile] = {}
        self._conditions: dict[_ConditionKey, CompiledExpression] = {}
        # What the last good load used: kept through failed attempts.
        self._good_files: frozenset[_FileKey] = frozenset()
        self._good_conditions: frozenset[_ConditionKey] = frozenset()
        self.parses = 0
        self.compiles = 0

    def __len__(self) -> int:
        """Entries held: parsed files plus compiled conditions."""
        return len(self._files) + len(self._conditions)

    def begin(self) -> LoadAttempt:
        """Starts one load's use of the cache; pair with `finish` (in a finally block)."""
        self._lock.acquire()
        return LoadAttempt(self)

    def finish(self, attempt: LoadAttempt, *, good: bool) -> None:
        """Ends `attempt`; a `good` one (it loaded without issues) becomes the set whose
        entries are kept. Drops every entry neither the last good load nor `attempt` used."""
        try:
            if good:
                self._good_files = frozenset(attempt.files)
                self._good_conditions = frozenset(attempt.conditions)
            keep_files = self._good_files | attempt.files
            keep_conditions = self._good_conditions | attempt.conditions
            self._files = {k: v for k, v in self._files.items() if k in keep_files}
            self._conditions = {k: v for k, v in self._conditions.items() if k in keep_conditions}
        finally:
            self._lock.release()


class LoadAttempt:
    """One load's view of a CompileCache: looks entries up, adds new ones, and records which
    it used (see CompileCache.finish). Without a cache (`LoadAttempt(None)`) it memoises
    within this load only, so identical conditions are still compiled once."""

    def __init__(self, cache: CompileCache | None) -> None:
        self._cache = cache if cache is not None else CompileCache()
        self.files: set[_FileKey] = set()
        self.conditions: set[_ConditionKey] = set()
        self._rule_homes: dict[int, ParsedFile] = {}  # id(rule) -> the entry holding it
        self._environments: dict[int, tuple[Declarations, CompileLimits, _EnvironmentKey]] = {}
        self._condition_used: _ConditionKey | None = None  # by the rule being compiled

    def parsed_file(
        self, path: Path, digest: bytes, parse: Callable[[], tuple[ParsedFile, bool]]
    ) -> ParsedFile:
        """The file at `path` whose bytes hash to `digest`: cached, or `parse()`, which
        returns the parsed file and whether it parsed without issues (only then is it cached:
        its policies' rules are compiled anew by every load until it is fixed)."""
        key = (str(path), digest)
        entry = self._cache._files.get(key)
        if entry is None:
            self._cache.parses += 1
            metrics.POLICY_WORK.labels(unit="file").inc()
            entry, clean = parse()
            if not clean:
                return entry
            self._cache._files[key] = entry
        self.files.add(key)
        for policy in entry.policies:
            for rule in policy.rules:
                self._rule_homes[id(rule)] = entry
        return entry

    def compiled_rule(
        self, rule: Rule, compile_rule: Callable[[], CompiledRule | None]
    ) -> CompiledRule | None:
        """`rule`'s CompiledRule: the one compiled by an earlier load of the same file, or
        `compile_rule()`, kept with the file when it succeeds (None: it had an issue)."""
        home = self._rule_homes.get(id(rule))
        if home is not None:
            known = home.rules.get(id(rule))
            if known is not None:
                if known[1] is not None:
                    self.conditions.add(known[1])  # still in use: kept by `finish`
                return known[0]
        self._condition_used = None
        compiled = compile_rule()
        if compiled is not None and home is not None:
            home.rules[id(rule)] = (compiled, self._condition_used)
        return compiled

    def condition(
        self,
        source: str,
        declarations: Declarations,
        limits: CompileLimits = _DEFAULT_LIMITS,
    ) -> CompiledExpression:
        """compile_expression(source, declarations, limits), compiled once per distinct
        (text, environment); raises CelCompileError (errors are not cached)."""
        key = (source, self._environment(declarations, limits))
        compiled = self._cache._conditions.get(key)
        if compiled is None:
            self._cache.compiles += 1
            metrics.POLICY_WORK.labels(unit="condition").inc()
            compiled = compile_expression(source, declarations, limits)
            self._cache._conditions[key] = compiled
        self.conditions.add(key)
        self._condition_used = key
        return compiled

    def _environment(self, declarations: Declarations, limits: CompileLimits) -> _EnvironmentKey:
        # Memoised by identity (the objects are held, so ids stay theirs): one key per load.
        known = self._environments.get(id(declarations))
        if known is not None and known[0] is declarations and known[1] is limits:
            return known[2]
        key = environment_key(declarations, limits)
        self._environments[id(declarations)] = (declarations, limits, key)
        return key


def cached_conditions(cache: CompileCache) -> Mapping[_ConditionKey, CompiledExpression]:
    """The conditions `cache` holds (for tests)."""
    return dict(cache._conditions)
