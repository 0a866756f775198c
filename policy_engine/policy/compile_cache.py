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

- each compiled organization, keyed by the (path, SHA-256) of every policy file in its folder,
  in order: an organization none of whose files changed keeps its rules, indexes and checks
  (only its token settings are built again: a JWKS file or URL is not among those files);
  one where a few files changed is updated from it (`previous_organization`: the loader
  replaces just those files' rules in its indexes);
- each policy file as it was read (`KnownFile`: its identity before reading, the SHA-256 of its
  bytes and their count), so that a load told a file is unchanged since (by the backend, which
  compares identities: see DirectoryBackend) reuses its digest without opening it.

Everything cached is a pure function of its key (parsing depends only on the file's path and
bytes, compiling only on the policy, the rule and the environment, an organization's layers
only on its files), and only what parsed and compiled without a single issue is cached, so a
broken file can never poison a later load. The revision is computed by every load (from the
files' digests).

Bounded: after each attempt the cache keeps only what the last good load used plus what the
attempt itself used (at most two sets' worth, each bounded by policy_limits.max_set_bytes),
so entries cannot pile up across edits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policy_engine import metrics
from policy_engine.cel import CompiledExpression, compile_expression
from policy_engine.cel.compiler import CompileLimits, Declarations
from policy_engine.domain.decision import Layer
from policy_engine.policy.compiled import CompiledOrganization, CompiledRule, FileRead
from policy_engine.policy.model import (
    Catalog,
    IdentityMapping,
    OrganizationConfig,
    Policy,
    QuotaDefinition,
    Rule,
)

__all__ = ["CompileCache", "KnownFile", "KnownOrganization", "LoadAttempt", "ParsedFile"]

# (declarations' key: variables with their fields and types, limits): what a compile
# depends on besides the source text.
_EnvironmentKey = tuple[tuple[Any, ...], CompileLimits]


class _Environment:
    """One compile environment (its `key`: declared variables and limits), interned per
    CompileCache so that equal environments are one object, hashed and compared by identity:
    the key's own hash calls CompileLimits' dataclass __hash__ in Python, and a reload hashes
    each of up to 20,000 condition keys several times."""

    __slots__ = ("key",)

    def __init__(self, key: _EnvironmentKey) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"_Environment({self.key!r})"


_ConditionKey = tuple[str, _Environment]
_FileKey = tuple[str, bytes]  # (path as the loader names it, SHA-256 of its bytes)
_OrganizationKey = tuple[_FileKey, ...]  # every policy file of the folder, in load order
_DEFAULT_LIMITS = CompileLimits()


@dataclass(slots=True, eq=False)
class ParsedFile:
    """One policy file's documents, parsed without a single issue, and the rules compiled so
    far for its policies: `rules` maps id(rule) of a Rule in `policies` (kept alive by this
    entry, so the id is stable) to its CompiledRule and the condition cache key it used."""

    configs: tuple[OrganizationConfig, ...]
    policies: tuple[Policy, ...]
    rules: dict[int, tuple[CompiledRule, _ConditionKey | None]] = field(default_factory=dict)
    # Once every rule compiled: (layer, compiled rule, integration matcher) per rule in file
    # order, and the condition keys they hold, so a later load appends them without a lookup
    # per rule. Set by the loader.
    layered: tuple[tuple[Layer, CompiledRule, Callable[[str], bool]], ...] | None = None
    conditions: tuple[_ConditionKey, ...] = ()
    # The catalog (by identity) every policy here was checked against without an issue.
    catalog_checked: Catalog | None = None
    # Its `kind: Quota` documents (compiled with the organization on every load: they are few).
    quotas: tuple[QuotaDefinition, ...] = ()
    # Its `kind: IdentityMapping` documents (compiled with the organization on every load).
    mappings: tuple[IdentityMapping, ...] = ()


@dataclass(frozen=True, slots=True)
class KnownFile:
    """A policy file as a good load read it: `read` (its identity, taken before reading, and
    where it really was), the SHA-256 `digest` of its bytes and their `size` in bytes."""

    read: FileRead
    digest: bytes
    size: int


@dataclass(frozen=True, slots=True)
class KnownOrganization:
    """An organization a good load built from `files` (its `compiled` form), with what a
    later load needs to update it rather than build it again: the `config` (its
    Organization document, by identity), its `policy_names`, how many of its files hold
    each condition (`condition_counts`: what its rules hold, kept in the cache with it) and
    the layers whose every rule applies to every catalog integration (`general`: one bucket
    shared by all integrations)."""

    files: _OrganizationKey
    condition_counts: Mapping[_ConditionKey, int]
    compiled: CompiledOrganization
    config: OrganizationConfig | None = None
    policy_names: frozenset[str] = frozenset()
    general: frozenset[Layer] = frozenset()


def environment_key(declarations: Declarations, limits: CompileLimits) -> _EnvironmentKey:
    """A hashable value equal for equal compile environments (Declarations holds a mapping,
    which is not hashable itself)."""
    return declarations.key, limits


class CompileCache:
    """Parsed files, compiled rules and conditions of the last good load (see module doc).

    `reads` counts policy files read (opened), `parses` files parsed, `compiles` CEL
    conditions compiled and `organizations` organizations built (layers and indexes) through
    this cache: counts, never times, that a test or a metric watches to see what a load redid.
    Thread-safe: one attempt at a time holds it (`begin` to `finish`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[_FileKey, ParsedFile] = {}
        self._conditions: dict[_ConditionKey, CompiledExpression] = {}
        # What the last good load used: kept through failed attempts.
        self._good_files: frozenset[_FileKey] = frozenset()
        self._good_conditions: frozenset[_ConditionKey] = frozenset()
        self._known_files: dict[str, KnownFile] = {}  # by relative path
        self._known_organizations: dict[str, KnownOrganization] = {}  # by folder name
        self._environments: dict[_EnvironmentKey, _Environment] = {}  # interned, never dropped
        self.reads = 0
        self.parses = 0
        self.compiles = 0
        self.organizations = 0

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
                self._known_files = attempt.known_files
                self._known_organizations = attempt.known_organizations
            # Set operations (in C) find the few stale entries; most loads drop one or none.
            for key in self._files.keys() - self._good_files - attempt.files:
                del self._files[key]
            for condition in self._conditions.keys() - self._good_conditions - attempt.conditions:
                del self._conditions[condition]
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
        # What this load read or reused, and the organizations it built or reused: what the
        # cache keeps for the next load if this one is good.
        self.known_files: dict[str, KnownFile] = {}
        self.known_organizations: dict[str, KnownOrganization] = {}
        self._environments: dict[int, tuple[Declarations, CompileLimits, _Environment]] = {}
        self._condition_used: _ConditionKey | None = None  # by the rule being compiled

    def known_file(
        self, relative: str, identity: tuple[int, int, int, int, int] | None
    ) -> KnownFile | None:
        """What the last good load read at `relative` (a path below the policy directory), if
        the file had `identity` then and its parse is still cached; else None (read it). The
        caller vouches that the file has not changed since (see DirectoryBackend)."""
        known = self._cache._known_files.get(relative)
        if known is None or identity is None or known.read.identity != identity:
            return None
        return known

    def remember_file(self, relative: str, known: KnownFile) -> None:
        """Records how this load got `relative`'s bytes (read, or reused as `known_file`)."""
        self.known_files[relative] = known

    def count_read(self) -> None:
        """One policy file was opened and read (a count for tests and metrics)."""
        self._cache.reads += 1

    def cached_file(self, key: _FileKey) -> ParsedFile | None:
        """The parsed file cached under `key` ((path, SHA-256)), marked used; None if absent."""
        entry = self._cache._files.get(key)
        if entry is not None:
            self.files.add(key)
        return entry

    def parsed_file(
        self, key: _FileKey, parse: Callable[[], tuple[ParsedFile, bool]]
    ) -> ParsedFile:
        """The file whose (path, SHA-256 of its bytes) is `key`: cached, or `parse()`, which
        returns the parsed file and whether it parsed without issues (only then is it cached:
        its policies' rules are compiled anew by every load until it is fixed)."""
        entry = self.cached_file(key)
        if entry is None:
            self._cache.parses += 1
            metrics.POLICY_WORK.labels(unit="file").inc()
            entry, clean = parse()
            if clean:
                self._cache._files[key] = entry
                self.files.add(key)
        return entry

    def known_organization(self, name: str, files: _OrganizationKey) -> CompiledOrganization | None:
        """The organization `name` as the last good load built it from exactly `files` ((path,
        SHA-256) of each policy file, in order), marked used with what it holds; else None."""
        known = self._cache._known_organizations.get(name)
        if known is None or known.files != files:
            return None
        self.files.update(files)
        self.conditions.update(known.condition_counts)
        self.known_organizations[name] = known
        return known.compiled

    def previous_organization(self, name: str) -> KnownOrganization | None:
        """The organization `name` as the last good load built it (from other files than
        this load's, if `known_organization` said None), to update; marks nothing used."""
        return self._cache._known_organizations.get(name)

    def previous_file(self, key: _FileKey) -> ParsedFile | None:
        """The parsed file cached under `key`, without marking it used (a file the last good
        load had and this one has not)."""
        return self._cache._files.get(key)

    def updated_organization(self, known: KnownOrganization) -> None:
        """Records `known`, updated from the previous one without issues, and marks the
        conditions it holds used (its files were marked as this load found them). Counted
        with the organizations built: its layers and indexes are new."""
        self._cache.organizations += 1
        self.conditions.update(known.condition_counts)
        self.known_organizations[known.compiled.name] = known

    def start_organization(self) -> None:
        """An organization is about to be built (a count for tests and metrics)."""
        self._cache.organizations += 1

    def built_organization(self, name: str, known: KnownOrganization) -> None:
        """Records `known`, built without issues since `start_organization`."""
        self.known_organizations[name] = known

    def use_conditions(self, keys: tuple[_ConditionKey, ...]) -> None:
        """Marks conditions held by rules reused whole (ParsedFile.layered) as in use."""
        self.conditions.update(keys)

    def compiled_rule(
        self, home: ParsedFile, rule: Rule, compile_rule: Callable[[], CompiledRule | None]
    ) -> CompiledRule | None:
        """`rule`'s CompiledRule (`rule` is one of `home`'s policies'): the one compiled by an
        earlier load of the same file, or `compile_rule()`, kept with the file when it
        succeeds (None: it had an issue)."""
        known = home.rules.get(id(rule))
        if known is not None:
            if known[1] is not None:
                self.conditions.add(known[1])  # still in use: kept by `finish`
            return known[0]
        self._condition_used = None
        compiled = compile_rule()
        if compiled is not None:
            # An uncached (broken) file's entry is dropped with this load: harmless.
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

    def _environment(self, declarations: Declarations, limits: CompileLimits) -> _Environment:
        # Memoised by identity (the objects are held, so ids stay theirs): one key per load.
        known = self._environments.get(id(declarations))
        if known is not None and known[0] is declarations and known[1] is limits:
            return known[2]
        key = environment_key(declarations, limits)
        interned = self._cache._environments.setdefault(key, _Environment(key))
        self._environments[id(declarations)] = (declarations, limits, interned)
        return interned


def cached_conditions(cache: CompileCache) -> Mapping[_ConditionKey, CompiledExpression]:
    """The conditions `cache` holds (for tests)."""
    return dict(cache._conditions)
