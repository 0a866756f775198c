"""Loads a policy directory into a CompiledPolicySet, all at once or not at all.

Layout: one folder per organization under the policy directory; every `*.yaml`/`*.yml` inside
it (at any depth) holds `kind: Organization` (exactly one per folder) or `kind: Policy`
documents. Test suites (`*.test.yaml`/`*.test.yml`, see policy_engine.testing) and hidden
files and folders are not policy files (editors' temporaries), though an organization may
keep its JWKS in one.

Every byte comes from a PolicySource (policy_engine.policy.source): the directory read once,
or, with a bundle key, the snapshot whose hashes the signed manifest was checked against.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from types import MappingProxyType

import yaml

from policy_engine.auth.discovery import issuer_problem
from policy_engine.auth.fetch import scheme_problem
from policy_engine.auth.keys import (
    KeySetError,
    KeySource,
    RemoteKeySets,
    StaticKeySet,
    one_off_key_sets,
    parse_jwks,
)
from policy_engine.auth.tokens import UNVERIFIED, TokenRules, warm_imports
from policy_engine.cel import CelCompileError, CompiledExpression, require_bool
from policy_engine.config import PolicyLimits
from policy_engine.domain.decision import POLICY_LAYERS, Effect, Layer
from policy_engine.engine.activation import CEL_DECLARATIONS
from policy_engine.errors import PolicyEngineError
from policy_engine.policy.bundle import BUNDLE_FILE, BundleVerificationError, read_signed_snapshot
from policy_engine.policy.compile_cache import (
    CompileCache,
    KnownFile,
    KnownOrganization,
    LoadAttempt,
    ParsedFile,
)
from policy_engine.policy.compiled import (
    CompiledOrganization,
    CompiledPolicySet,
    CompiledRule,
    FileRead,
    LayerIndex,
    RuleBucket,
)
from policy_engine.policy.identity_documents import (
    KIND_IDENTITY_MAPPING,
    compile_identity_mappings,
    parse_identity_mapping,
)
from policy_engine.policy.index import RuleIndex
from policy_engine.policy.model import (
    IdentityMapping,
    OrganizationConfig,
    Policy,
    QuotaDefinition,
    Rule,
    TokenSettings,
)
from policy_engine.policy.parse import (
    KIND_ORGANIZATION,
    KIND_POLICY,
    KIND_QUOTA,
    NAME_PATTERN,
    DocumentParser,
    LoadIssue,
)
from policy_engine.policy.patterns import WILDCARD, Matcher, is_glob
from policy_engine.policy.quotas import compile_quotas
from policy_engine.policy.source import (
    POLICY_SUFFIXES,
    DirectorySource,
    PolicySource,
    SourceError,
    SourceFile,
    join_inside,
    policy_files,
    tree_files,
    within,
)
from policy_engine.policy.yamlpos import PositionedDict, error_line, load_documents

__all__ = [
    "POLICY_SUFFIXES",
    "CompileCache",
    "FileRead",
    "Listing",
    "PolicyLoadError",
    "file_identity",
    "load_policy_set",
    "load_policy_source",
    "policy_files",
]


class PolicyLoadError(PolicyEngineError):
    """The policy set is invalid; `issues` lists every problem found, each with file:line.
    `files_read` names every file the failed load read or tried to read (a missing JWKS
    file too), so a watcher can reload when one of them changes or appears."""

    def __init__(self, issues: list[LoadIssue], files_read: tuple[FileRead, ...] = ()) -> None:
        self.issues = issues
        self.files_read = files_read
        super().__init__("\n".join(str(issue) for issue in issues))


def file_identity(path: Path) -> tuple[int, int, int, int, int] | None:
    """(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of the file `path` names, symlinks
    followed, or None when there is none. Any write, rename over or link swap changes it
    (ctime cannot be set back, unlike mtime); see FileRead."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_FileIdentity = tuple[int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class Listing:
    """What a caller found in the policy directory just before a load, so the load need not
    look again: `paths`, the policy files (relative `/`-separated paths, as policy_names lists
    them); `identities`, file_identity per relative path (policy files, and any other file it
    stat'ed), taken before the load read anything; `unchanged`, the policy files the caller
    vouches have not changed since the last good load through the same cache read them (see
    load_policy_set); a set, as it is asked once per file."""

    paths: Sequence[str]
    identities: Mapping[str, _FileIdentity | None]
    unchanged: AbstractSet[str] = frozenset()


class _RecordingSource:
    """A PolicySource that records every file the loader asks it for (see FileRead).

    `identities` (relative path -> file_identity) are identities taken before this load read
    anything: a file's recorded identity is that one when given (one stat fewer), else a stat
    taken just before reading it."""

    def __init__(
        self, source: PolicySource, identities: Mapping[str, _FileIdentity | None] | None = None
    ) -> None:
        self._source = source
        self._read: dict[str, FileRead] = {}
        self._identities = identities or {}

    @property
    def directory(self) -> Path:
        return self._source.directory

    def policy_paths(self) -> list[str]:
        return self._source.policy_paths()

    def read(self, relative: str) -> SourceFile:
        path = self._source.directory / relative
        # Before reading: a write after it changes it.
        identity = (
            self._identities[relative] if relative in self._identities else file_identity(path)
        )
        try:
            file = self._source.read(relative)
        except SourceError:
            self.record(relative, os.path.realpath(path), identity)
            raise
        self.record(relative, file.real_path, identity)
        return file

    def real_folder(self, relative: str) -> str:
        return self._source.real_folder(relative)

    def reuse(self, known: KnownFile) -> None:
        """Counts a file not read again (its bytes are `known`'s) as read: recorded, and its
        size charged to the set's budget (raises SourceError past max_set_bytes)."""
        charge = getattr(self._source, "charge", None)
        if charge is not None:
            charge(known.size)
        self._read.setdefault(known.read.relative, known.read)

    def recorded(self, relative: str) -> FileRead | None:
        return self._read.get(relative)

    def record(
        self, relative: str, real_path: str, identity: tuple[int, int, int, int, int] | None
    ) -> None:
        self._read.setdefault(relative, FileRead(relative, real_path, identity))

    @property
    def files_read(self) -> tuple[FileRead, ...]:
        return tuple(self._read[name] for name in sorted(self._read))


def _record_path(recording: _RecordingSource, relative: str) -> None:
    path = recording.directory / relative
    recording.record(relative, os.path.realpath(path), file_identity(path))


def _revision(contents: Iterable[tuple[str, bytes]]) -> str:
    """The content hash of the set: `contents` is (relative `/`-separated path, SHA-256 of
    the file's bytes) per file, in load order."""
    digest = hashlib.sha256()
    for relative, file_digest in contents:
        digest.update(relative.encode())
        digest.update(b"\0")
        digest.update(file_digest)
    return digest.hexdigest()[:16]


def load_policy_set(
    directory: Path,
    *,
    bundle_public_key: bytes | None = None,
    bundle_not_before: datetime | None = None,
    remote_keys: RemoteKeySets | None = None,
    limits: PolicyLimits | None = None,
    cache: CompileCache | None = None,
    listing: Listing | None = None,
) -> CompiledPolicySet:
    """Loads `directory`; raises PolicyLoadError listing every problem (file:line).

    With `bundle_public_key`, the directory must carry a valid signature, made no earlier than
    `bundle_not_before` (a rollback to an older signed set is refused), over exactly the
    files the loader could read (policy_engine.policy.bundle), and the set is compiled from the
    verified bytes only, read once. `limits` bound each file and the whole set before anything
    is parsed. `remote_keys` keeps JWKS URLs' key sets across loads (a long-running server
    passes one): the load takes each set at once, its first fetch in the background, and
    never waits for the network. Without it the load is a one-off (`pdp eval`, `pdp
    validate`): it fetches for itself and, once loaded, waits for those fetches (each within
    its 5 s timeout). With `cache`, files and conditions
    that an earlier load through the same cache parsed and compiled are reused (see
    policy_engine.policy.compile_cache); the result is the same as without it.

    With a `listing`, the policy files loaded are `listing.paths` (the directory is not walked
    again), a file read is recorded with its identity in `listing.identities` (FileRead), and
    a file in `listing.unchanged` whose identity there is still the one the last good load
    through `cache` recorded is not opened again: its digest and parse are reused and its size
    still counts against max_set_bytes. Ignored with `bundle_public_key`: every signed byte is
    read and verified."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyLoadError([LoadIssue(directory, 0, "policy directory does not exist")])
    if bundle_public_key is not None:
        # Verification read the signature and every file of the tree (hidden ones too): a
        # change to any of them changes what loads, so all count as read.
        tree = {name: file_identity(directory / name) for name in tree_files(directory)}
        bundle = directory / BUNDLE_FILE
        bundle_read = FileRead(BUNDLE_FILE, os.path.realpath(bundle), file_identity(bundle))
        try:
            snapshot = read_signed_snapshot(
                directory, bundle_public_key, limits, not_before=bundle_not_before
            )
        except BundleVerificationError as exc:
            raise PolicyLoadError(
                [LoadIssue(directory / BUNDLE_FILE, 0, p) for p in exc.problems],
                (
                    bundle_read,
                    *(
                        FileRead(name, os.path.realpath(directory / name), identity)
                        for name, identity in sorted(tree.items())
                    ),
                ),
            ) from None
        recording = _RecordingSource(snapshot)
        recording.record(BUNDLE_FILE, bundle_read.real_path, bundle_read.identity)
        for name, file in snapshot.files.items():
            recording.record(name, file.real_path, tree.get(name))
        listing = None
    else:
        paths = listing.paths if listing is not None else None
        identities = listing.identities if listing is not None else None
        recording = _RecordingSource(DirectorySource(directory, limits, paths), identities)
        snapshot = None
    policies = load_policy_source(recording, remote_keys=remote_keys, cache=cache, listing=listing)
    if snapshot is not None:
        policies = dataclasses.replace(policies, signed_at=snapshot.signed_at)
    return policies


def load_policy_source(
    source: PolicySource,
    *,
    remote_keys: RemoteKeySets | None = None,
    cache: CompileCache | None = None,
    listing: Listing | None = None,
) -> CompiledPolicySet:
    """Compiles the policy set from `source` alone (see load_policy_set): every file is read
    (or reused, see `unchanged`) and size-checked before the first is parsed. Raises
    PolicyLoadError. Both the set and the error carry `files_read`: every file asked of
    `source` (see FileRead). `cache`: see load_policy_set; without one, identical conditions
    are still compiled once per load. `listing`: its identities and unchanged files are used
    as load_policy_set says (its paths are the source's business)."""
    recording = (
        source
        if isinstance(source, _RecordingSource)
        else _RecordingSource(source, listing.identities if listing is not None else None)
    )
    attempt = cache.begin() if cache is not None else LoadAttempt(None)
    good = False
    try:
        with (
            nullcontext(remote_keys) if remote_keys is not None else one_off_key_sets()
        ) as key_sets:
            policies = _load(
                recording,
                key_sets,
                attempt,
                listing.identities if listing is not None else {},
                listing.unchanged if listing is not None else frozenset(),
            )
        good = True
    except PolicyLoadError as exc:
        exc.files_read = recording.files_read
        raise
    finally:
        if cache is not None:
            cache.finish(attempt, good=good)
    return policies


_FileKey = tuple[str, bytes]  # (path as the loader names it, SHA-256 of its bytes)


def _load(
    source: _RecordingSource,
    remote_keys: RemoteKeySets,
    attempt: LoadAttempt,
    identities: Mapping[str, tuple[int, int, int, int, int] | None],
    unchanged: AbstractSet[str],
) -> CompiledPolicySet:
    directory = source.directory
    top = os.fspath(directory)
    issues: list[LoadIssue] = []
    # (relative path, SHA-256): what the revision hashes, JWKS files appended as read.
    contents: list[tuple[str, bytes]] = []
    # The policy files: (relative path, cache key, bytes, or None when reused unread).
    files: list[tuple[str, _FileKey, bytes | None]] = []
    for relative in source.policy_paths():
        key_path = os.path.join(top, relative)  # as str(directory / relative), cheaper
        try:
            known = (
                attempt.known_file(relative, identities.get(relative))
                if relative in unchanged
                else None
            )
            if known is not None and attempt.cached_file((key_path, known.digest)) is not None:
                source.reuse(known)
                digest, data = known.digest, None
            else:
                known = None
                data = source.read(relative).data
                attempt.count_read()
                digest = hashlib.sha256(data).digest()
        except SourceError as exc:
            issues.append(LoadIssue(directory / relative, 0, str(exc)))
            if exc.set_too_large:
                raise PolicyLoadError(issues) from None
            continue
        read = known.read if known is not None else source.recorded(relative)
        if read is not None:
            size = known.size if known is not None else len(data or b"")
            attempt.remember_file(relative, known or KnownFile(read, digest, size))
        contents.append((relative, digest))
        files.append((relative, (key_path, digest), data))
    if not contents and not issues:
        issues.append(LoadIssue(directory, 0, "no policy files (*.yaml) found"))

    by_org: dict[str, list[tuple[_FileKey, ParsedFile]]] = {}
    for relative, key, data in files:
        parts = relative.split("/")
        if len(parts) < 2:
            issues.append(
                LoadIssue(directory / relative, 1, "policy files belong in an organization folder")
            )
            continue
        org = parts[0]
        if not NAME_PATTERN.fullmatch(org):
            issues.append(
                LoadIssue(directory / relative, 1, f"organization folder name {org!r} is not valid")
            )
            continue
        if data is None:  # reused unread: its parse is cached (checked above)
            parsed = attempt.cached_file(key)
            assert parsed is not None
        else:
            path = directory / relative
            parsed = attempt.parsed_file(key, partial(_parse_new, path, data, org, issues))
        by_org.setdefault(org, []).append((key, parsed))

    organizations = {}
    for org, org_files in sorted(by_org.items()):
        compiled = _organization(source, org, org_files, issues, contents, remote_keys, attempt)
        if compiled is not None:
            organizations[org] = _with_identities(
                _with_quotas(compiled, org_files, issues), org_files, issues
            )
    issues.extend(
        _shared_token_audiences(
            config for _, org_files in sorted(by_org.items()) for config in _configs(org_files)
        )
    )
    if issues:
        raise PolicyLoadError(issues)
    return CompiledPolicySet(
        revision=_revision(contents),
        organizations=MappingProxyType(organizations),
        file_count=len(contents),
        files_read=source.files_read,
    )


def _configs(files: list[tuple[_FileKey, ParsedFile]]) -> list[OrganizationConfig]:
    return [config for _, parsed in files for config in parsed.configs]


# Pairs of organizations sharing token issuer and audience reported one by one; one more
# issue counts the rest (a set of thousands of unbound organizations is one mistake).
MAX_SHARED_TOKEN_ISSUES = 20


def _shared_token_audiences(configs: Iterable[OrganizationConfig]) -> list[LoadIssue]:
    """One issue for each pair of organizations that would accept each other's subject
    tokens: the same `audience` and the same `issuer` (an organization naming no issuer
    accepts any its keys signed, so it shares every issuer), unless both bind tokens to
    their organization with `organization_claim`. A token is checked for subject and
    application, but those IDs are each organization's own and may well coincide.

    The first MAX_SHARED_TOKEN_ISSUES pairs by name are reported and the rest counted, not
    listed: a set of thousands of organizations sharing one issuer and audience unbound (one
    written before audiences were compared, the usual multi-tenant setup) holds millions of
    pairs, and building each took minutes and GiBs at every load. Grouped by audience, then
    issuer; for each organization only its first pairs are looked at (a binary search in
    its group, sorted by name): O(n log n) in all."""
    by_audience: dict[str, list[OrganizationConfig]] = {}
    for config in configs:
        if config.tokens is not None and config.tokens.audience is not None:
            by_audience.setdefault(config.tokens.audience, []).append(config)
    limit = MAX_SHARED_TOKEN_ISSUES
    total = 0
    pairs: list[tuple[str, str, OrganizationConfig, OrganizationConfig]] = []
    for unsorted in by_audience.values():
        if len(unsorted) < 2:
            continue
        group = sorted(unsorted, key=lambda c: c.name)  # stable: equal names keep their order
        # Positions in `group` of each issuer's organizations: all of them, and the unbound.
        members: dict[str | None, list[int]] = {}
        unbound: dict[str | None, list[int]] = {}
        for index, config in enumerate(group):
            assert config.tokens is not None
            members.setdefault(config.tokens.issuer, []).append(index)
            if not config.tokens.organization_claim:
                unbound.setdefault(config.tokens.issuer, []).append(index)
        total += _sharing_pair_count(members, unbound)
        if not unbound:
            continue
        everyone, every_unbound = list(range(len(group))), sorted(_flat(unbound))
        for index, config in enumerate(group):
            assert config.tokens is not None
            bound = bool(config.tokens.organization_claim)
            partners = unbound if bound else members
            issuer = config.tokens.issuer
            sources = (
                [every_unbound if bound else everyone]
                if issuer is None
                else [partners.get(issuer, []), partners.get(None, [])]
            )
            later: list[int] = []
            for source in sources:
                first = bisect.bisect_right(source, index)
                later += source[first : first + limit]
            for other in sorted(later)[:limit]:
                pairs.append((config.name, group[other].name, config, group[other]))
    pairs.sort(key=lambda pair: pair[:2])
    found = [_shared_token_issue(first, second) for _, _, first, second in pairs[:limit]]
    if total > limit:
        last = found[-1]
        found.append(
            LoadIssue(
                last.file,
                last.line,
                f"and {total - limit} more pairs of organizations verifying tokens from one "
                "issuer for one audience without tokens.organization_claim",
            )
        )
    return found


def _flat(lists: Mapping[str | None, list[int]]) -> list[int]:
    return [index for positions in lists.values() for index in positions]


def _sharing_pair_count(
    members: Mapping[str | None, list[int]], unbound: Mapping[str | None, list[int]]
) -> int:
    """How many pairs of one audience's organizations share an issuer (or one names none)
    with at least one of the two unbound: every sharing pair less those both bound."""

    def pairs_with_an_unbound(everyone: int, bound: int) -> int:
        return everyone * (everyone - 1) // 2 - bound * (bound - 1) // 2

    bound = {issuer: len(members[issuer]) - len(unbound.get(issuer, [])) for issuer in members}
    anyone, anyone_bound = len(members.get(None, [])), bound.get(None, 0)
    count = pairs_with_an_unbound(anyone, anyone_bound)
    for issuer, positions in members.items():
        if issuer is not None:
            count += pairs_with_an_unbound(len(positions), bound[issuer])
            # With each organization naming no issuer: all pairs but those both bound.
            count += anyone * len(positions) - anyone_bound * bound[issuer]
    return count


def _shared_token_issue(first: OrganizationConfig, second: OrganizationConfig) -> LoadIssue:
    """The issue for `second` (its Organization document), sharing with `first`."""
    tokens, other = second.tokens, first.tokens
    assert tokens is not None and other is not None
    issuer = tokens.issuer or other.issuer
    return LoadIssue(
        second.position.file,
        tokens.line or second.position.line,
        f"organizations {first.name!r} and {second.name!r} verify tokens "
        + (f"from issuer {issuer!r} " if issuer is not None else "")
        + f"for the same audience {tokens.audience!r}, so each would accept the other's "
        "tokens: give each its own audience, or set tokens.organization_claim in both (a "
        "claim whose value is the organization's name)",
    )


def _with_quotas(
    organization: CompiledOrganization,
    files: list[tuple[_FileKey, ParsedFile]],
    issues: list[LoadIssue],
) -> CompiledOrganization:
    """`organization` with the quotas its `files` declare, compiled on every load (they are
    few, and the organization cache keeps only rules); their problems go to `issues`."""
    definitions = [quota for _, parsed in files for quota in parsed.quotas]
    if not definitions:
        return organization
    quotas, problems = compile_quotas(organization.name, organization.catalog, definitions)
    issues.extend(
        LoadIssue(d.position.file, d.position.line, f"quota {d.name}: {message}")
        for d, message in problems
    )
    return dataclasses.replace(organization, quotas=quotas)


def _with_identities(
    organization: CompiledOrganization,
    files: list[tuple[_FileKey, ParsedFile]],
    issues: list[LoadIssue],
) -> CompiledOrganization:
    """`organization` with the identity mappings its `files` declare, compiled on every load
    (checked against its catalog: a few small documents); problems go to `issues`."""
    documents = [mapping for _, parsed in files for mapping in parsed.mappings]
    if not documents:
        return organization
    mappings = compile_identity_mappings(documents, organization.catalog, issues)
    return dataclasses.replace(organization, identities=mappings)


def _organization(
    source: PolicySource,
    org: str,
    files: list[tuple[_FileKey, ParsedFile]],
    issues: list[LoadIssue],
    contents: list[tuple[str, bytes]],
    remote_keys: RemoteKeySets,
    attempt: LoadAttempt,
) -> CompiledOrganization | None:
    """The organization in folder `org` from its parsed policy `files`: reused whole when the
    last good load built it from the same files (its token settings are built again: a JWKS
    file is not one of those files, and is read and counted in `contents` every load);
    updated from it when only a few files differ (see _updated_organization); else built."""
    files_key = tuple(key for key, _ in files)
    known = attempt.known_organization(org, files_key)
    if known is not None:
        (config,) = (config for _, parsed in files for config in parsed.configs)
        tokens = _token_rules(
            source, org, config.tokens, issues, contents, config.position.file, remote_keys
        )
        return dataclasses.replace(known, tokens=tokens)
    previous = attempt.previous_organization(org)
    if previous is not None:
        updated = _updated_organization(previous, files, files_key, issues, attempt)
        if updated is not None:
            assert updated.config is not None
            config = updated.config
            tokens = _token_rules(
                source, org, config.tokens, issues, contents, config.position.file, remote_keys
            )
            attempt.updated_organization(updated)
            return dataclasses.replace(updated.compiled, tokens=tokens)
    attempt.start_organization()
    before = len(issues)
    built = _compile_organization(source, org, files, issues, contents, remote_keys, attempt)
    if built is None:
        return None
    compiled, general = built
    if len(issues) == before:
        attempt.built_organization(
            org,
            KnownOrganization(
                files=files_key,
                condition_counts=_condition_counts(parsed for _, parsed in files),
                compiled=compiled,
                config=next(config for _, parsed in files for config in parsed.configs),
                policy_names=frozenset(p.name for _, parsed in files for p in parsed.policies),
                general=general,
            ),
        )
    return compiled


# An organization in which more policy files than this changed is built again, not updated.
UPDATE_MAX_FILES = 64


def _condition_counts(files: Iterable[ParsedFile]) -> Counter[tuple]:
    """How many of `files` hold each condition (cache key) their rules use."""
    counts: Counter[tuple] = Counter()
    for parsed in files:
        counts.update(set(parsed.conditions))
    return counts


def _updated_organization(
    previous: KnownOrganization,
    files: list[tuple[_FileKey, ParsedFile]],
    files_key: tuple[_FileKey, ...],
    issues: list[LoadIssue],
    attempt: LoadAttempt,
) -> KnownOrganization | None:
    """`previous` (built by the last good load) with the rules of the policy files it had
    and `files` has not taken out of its indexes, and the rules of those `files` has that it
    had not compiled and put in (RuleIndex.updated): the organization _compile_organization
    would build from `files`, in time proportional to the changed files plus one pass over
    the indexes' rules, with no target of an unchanged rule looked at again.

    None, with nothing added to `issues`, when it cannot be done so (then build it): more
    than UPDATE_MAX_FILES files changed, the Organization document is not the same object
    (a changed catalog or defaults re-checks every policy), a changed file has an issue
    (the full build reports every issue, in order), a policy name repeats, or a changed
    layer does not share one bucket across all integrations before and after."""
    known_keys = set(previous.files)
    now_keys = set(files_key)
    removed = [key for key in previous.files if key not in now_keys]
    added = [(key, parsed) for key, parsed in files if key not in known_keys]
    if len(removed) + len(added) > UPDATE_MAX_FILES:
        return None
    configs = [config for _, parsed in files for config in parsed.configs]
    config = previous.config
    if len(configs) != 1 or config is None or configs[0] is not config:
        return None
    gone: list[ParsedFile] = []
    for key in removed:
        parsed = attempt.previous_file(key)
        if parsed is None or parsed.layered is None:
            return None
        gone.append(parsed)
    names = set(previous.policy_names)
    for parsed in gone:
        names.difference_update(policy.name for policy in parsed.policies)
    for _, parsed in added:
        for policy in parsed.policies:
            if policy.name in names:
                return None  # a duplicate: the full build says where both are
            names.add(policy.name)
    before = len(issues)
    compiled_added: list[ParsedFile] = []
    for _, parsed in added:
        if parsed.catalog_checked is not config.catalog:
            for policy in parsed.policies:
                _check_catalog_references(config, policy, issues)
            if len(issues) != before:
                break
            parsed.catalog_checked = config.catalog
        if not _compile_file(parsed, issues, attempt)[1]:
            break
        compiled_added.append(parsed)
    if len(issues) != before:
        del issues[before:]  # reported again, in file order, by the full build
        return None
    integrations = config.catalog.integrations
    removed_by_layer: dict[Layer, set[CompiledRule]] = {}
    for parsed in gone:
        for layer, rule, _ in parsed.layered or ():
            removed_by_layer.setdefault(layer, set()).add(rule)
    added_by_layer: dict[Layer, list[CompiledRule]] = {}
    general = set(previous.general)
    for parsed in compiled_added:
        for layer, rule, matches in parsed.layered or ():
            added_by_layer.setdefault(layer, []).append(rule)
            if not all(matches(name) for name in integrations):
                general.discard(layer)
    layers = dict(previous.compiled.layers)
    for layer in removed_by_layer.keys() | added_by_layer.keys():
        index = layers[layer]
        buckets = set(map(id, index.by_integration.values()))
        if (
            layer not in general
            or len(buckets) != 1
            or len(index.by_integration) != len(integrations)
        ):
            return None  # several buckets (or none): build them all again
        bucket = next(iter(index.by_integration.values()))
        gone_rules = removed_by_layer.get(layer, set())
        new_rules = added_by_layer.get(layer, [])
        updated = RuleBucket(
            denies=bucket.denies.updated(
                gone_rules, (r for r in new_rules if r.effect is Effect.DENY)
            ),
            allows=bucket.allows.updated(
                gone_rules, (r for r in new_rules if r.effect is Effect.ALLOW)
            ),
        )
        if not updated.denies.rules and not updated.allows.rules:
            return None  # an emptied layer has no bucket: build it again
        layers[layer] = LayerIndex(
            default=index.default,
            by_integration=MappingProxyType(dict.fromkeys(index.by_integration, updated)),
        )
    counts = Counter(previous.condition_counts)
    for condition, count in _condition_counts(gone).items():
        left = counts[condition] - count
        if left > 0:
            counts[condition] = left
        else:
            del counts[condition]  # no file holds it any more
    counts.update(_condition_counts(compiled_added))
    policy_count = previous.compiled.policy_count
    rule_count = previous.compiled.rule_count
    for parsed, sign in [*((p, -1) for p in gone), *((p, 1) for p in compiled_added)]:
        policy_count += sign * len(parsed.policies)
        rule_count += sign * sum(len(policy.rules) for policy in parsed.policies)
    compiled = dataclasses.replace(
        previous.compiled,
        layers=MappingProxyType(layers),
        policy_count=policy_count,
        rule_count=rule_count,
    )
    return KnownOrganization(
        files=files_key,
        condition_counts=counts,
        compiled=compiled,
        config=config,
        policy_names=frozenset(names),
        general=frozenset(general),
    )


# (layer, rule, its integration matcher: a Matcher or a _Conjunction of two)
_Layered = tuple[tuple[Layer, CompiledRule, Callable[[str], bool]], ...]


def _compile_file(
    parsed: ParsedFile, issues: list[LoadIssue], attempt: LoadAttempt
) -> tuple[_Layered, bool]:
    """Compiles every rule of `parsed` (reusing what it holds): each rule that compiled with
    its layer and integration matcher, and whether all did. When all did, `parsed.layered`
    and `parsed.conditions` keep them for the next load; an issue is added to `issues`."""
    if parsed.layered is not None:  # every rule compiled before: reuse them whole
        attempt.use_conditions(parsed.conditions)
        return parsed.layered, True
    layered: list[tuple[Layer, CompiledRule, Callable[[str], bool]]] = []
    complete = True
    for policy in parsed.policies:
        for rule in policy.rules:
            compiled = attempt.compiled_rule(
                parsed,
                rule,
                partial(_compile_rule, policy, rule, issues, attempt),
            )
            if compiled is None:
                complete = False
                continue
            integrations = Matcher.of(policy.target.integrations)
            narrowed = Matcher.of(rule.target.integrations)
            layered.append((policy.layer, compiled, _conjunction(integrations, narrowed)))
    if complete:
        parsed.layered = tuple(layered)
        parsed.conditions = tuple(
            known[1] for known in parsed.rules.values() if known[1] is not None
        )
    return tuple(layered), complete


def _parse_new(
    path: Path, data: bytes, org: str, issues: list[LoadIssue]
) -> tuple[ParsedFile, bool]:
    """Parses one file; True when it added no issue (only then may it be cached)."""
    before = len(issues)
    configs: list[OrganizationConfig] = []
    policies: list[Policy] = []
    quotas: list[QuotaDefinition] = []
    mappings: list[IdentityMapping] = []
    _parse_file(path, data, org, configs, policies, issues, quotas, mappings)
    parsed = ParsedFile(
        tuple(configs), tuple(policies), quotas=tuple(quotas), mappings=tuple(mappings)
    )
    return parsed, len(issues) == before


def _parse_file(
    path: Path,
    data: bytes,
    org: str,
    configs: list[OrganizationConfig],
    policies: list[Policy],
    issues: list[LoadIssue],
    quotas: list[QuotaDefinition],
    mappings: list[IdentityMapping],
) -> None:
    try:
        loaded = load_documents(data.decode("utf-8"))
    except UnicodeDecodeError:
        issues.append(LoadIssue(path, 1, "not UTF-8 text"))
        return
    except yaml.YAMLError as exc:
        issues.append(LoadIssue(path, error_line(exc), f"invalid YAML: {_yaml_problem(exc)}"))
        return
    issues.extend(LoadIssue(path, p.line, p.message) for p in loaded.problems)
    documents = loaded.documents
    if not documents:
        # Usually the truncated moment of an in-place save: never load a set without the file.
        issues.append(LoadIssue(path, 1, "empty policy file (no YAML documents)"))
        return
    parser = DocumentParser(path, issues)
    for document in documents:
        doc = document.value
        if not isinstance(doc, PositionedDict):
            issues.append(LoadIssue(path, document.line, "a document must be a mapping"))
            continue
        kind = doc.get("kind")
        if kind == KIND_ORGANIZATION:
            config = parser.organization(doc, org)
            if config is not None:
                configs.append(config)
        elif kind == KIND_POLICY:
            policy = parser.policy(doc)
            if policy is not None:
                policies.append(policy)
        elif kind == KIND_QUOTA:
            quota = parser.quota(doc)
            if quota is not None:
                quotas.append(quota)
        elif kind == KIND_IDENTITY_MAPPING:
            mapping = parse_identity_mapping(parser, doc)
            if mapping is not None:
                mappings.append(mapping)
        else:
            issues.append(
                LoadIssue(
                    path,
                    doc.line_of("kind"),
                    f"'kind' must be {KIND_ORGANIZATION}, {KIND_POLICY}, {KIND_QUOTA} or "
                    f"{KIND_IDENTITY_MAPPING}, not {kind!r} "
                    "(keywords are spelled exactly so)",
                )
            )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    return str(getattr(exc, "problem", None) or exc).strip()


def _token_rules(
    source: PolicySource,
    org: str,
    settings: TokenSettings | None,
    issues: list[LoadIssue],
    contents: list[tuple[str, bytes]],
    config_file: Path,
    remote_keys: RemoteKeySets,
) -> TokenRules:
    """Keys are part of the policy set: a JWKS file is read from the source now and counts in
    the revision. It must stay inside the organization's folder, as written (no `..`, not
    absolute) and once symlinks are resolved. A `jwks_url` must be http or https; its key set
    is taken from `remote_keys` without waiting for the network. With neither, the issuer
    must be an http or https URL without query or fragment, and its key set (found through
    its metadata, `policy_engine.auth.discovery`) is taken from `remote_keys` the same way."""
    if settings is None:
        return UNVERIFIED
    warm_imports()  # here, off the event loop, not with the first token
    keys: KeySource
    if settings.jwks_file is not None:
        relative = join_inside(org, settings.jwks_file)
        try:
            if relative is None:
                raise SourceError("must be inside the organization's folder")
            file = source.read(relative)
            if not within(file.real_path, source.real_folder(org)):
                raise SourceError(
                    "must be inside the organization's folder (it leads out through a symlink)"
                )
            keys = StaticKeySet(parse_jwks(file.data, source=str(source.directory / relative)))
        except SourceError as exc:
            issues.append(
                LoadIssue(config_file, settings.line, f"jwks_file {settings.jwks_file!r}: {exc}")
            )
            return UNVERIFIED
        except KeySetError as exc:
            issues.append(LoadIssue(config_file, settings.line, f"jwks_file: {exc}"))
            return UNVERIFIED
        contents.append((relative, hashlib.sha256(file.data).digest()))
    elif settings.jwks_url is not None:
        url = settings.jwks_url
        problem = scheme_problem(url)
        if problem is not None:
            issues.append(LoadIssue(config_file, settings.line, f"jwks_url {url!r}: {problem}"))
            return UNVERIFIED
        keys = remote_keys.get(url)  # at once: the first fetch lands in the background
    else:
        issuer = str(settings.issuer)  # the parser demands one when no keys are named
        problem = issuer_problem(issuer)
        if problem is not None:
            issues.append(
                LoadIssue(
                    config_file,
                    settings.line,
                    f"issuer {issuer!r}: its keys are discovered (no jwks_file or jwks_url), "
                    f"so it must be an http or https URL: {problem}",
                )
            )
            return UNVERIFIED
        # At once, like a jwks_url; the jwks_uri found must be on the issuer's origin or
        # one of jwks_hosts (auth.discovery.origin_problem).
        keys = remote_keys.discover(issuer, settings.discovery, settings.jwks_hosts)
    return TokenRules(
        keys=keys,
        issuer=settings.issuer,
        audience=settings.audience,
        algorithms=settings.algorithms,
        leeway_seconds=settings.leeway_seconds,
        required=settings.required,
        external_subject_claim=settings.external_subject_claim,
        application_claim=(
            None if settings.application_claim == "none" else settings.application_claim
        ),
        organization_claim=settings.organization_claim,
        organization=org,
    )


def _compile_organization(
    source: PolicySource,
    org: str,
    files: list[tuple[_FileKey, ParsedFile]],
    issues: list[LoadIssue],
    contents: list[tuple[str, bytes]],
    remote_keys: RemoteKeySets,
    attempt: LoadAttempt,
) -> tuple[CompiledOrganization, frozenset[Layer]] | None:
    """The organization built from its parsed `files`, and the layers whose every rule
    applies to every catalog integration (see _index_by_integration); None when it has not
    exactly one Organization document. Issues go to `issues`."""
    configs = [config for _, parsed in files for config in parsed.configs]
    policies = [policy for _, parsed in files for policy in parsed.policies]
    if len(configs) != 1:
        where = configs[1].position if len(configs) > 1 else None
        issues.append(
            LoadIssue(
                where.file if where else source.directory / org,
                where.line if where else 0,
                f"expected exactly one 'kind: {KIND_ORGANIZATION}' document, found {len(configs)}",
            )
        )
        return None
    config = configs[0]
    seen: dict[str, Policy] = {}
    for policy in policies:
        if policy.name in seen:
            issues.append(
                LoadIssue(
                    policy.position.file,
                    policy.position.line,
                    f"duplicate policy name (first at {seen[policy.name].position})",
                    policy.name,
                )
            )
        seen.setdefault(policy.name, policy)

    rules_by_layer: dict[Layer, list[tuple[CompiledRule, Callable[[str], bool]]]] = {
        layer: [] for layer in POLICY_LAYERS
    }
    for _, parsed in files:
        if parsed.catalog_checked is not config.catalog:
            before = len(issues)
            for policy in parsed.policies:
                _check_catalog_references(config, policy, issues)
            if len(issues) == before:  # the same catalog object need not be checked again
                parsed.catalog_checked = config.catalog
        for layer, compiled, matches in _compile_file(parsed, issues, attempt)[0]:
            rules_by_layer[layer].append((compiled, matches))

    layers: dict[Layer, LayerIndex] = {}
    general: set[Layer] = set()
    for layer in POLICY_LAYERS:
        index, everywhere = _index_layer(config.catalog.integrations, rules_by_layer[layer])
        layers[layer] = LayerIndex(
            default=config.defaults.get(layer, Effect.DENY),
            by_integration=MappingProxyType(index),
        )
        if everywhere:
            general.add(layer)
    organization = CompiledOrganization(
        name=config.name,
        catalog=config.catalog,
        layers=MappingProxyType(layers),
        policy_count=len(policies),
        rule_count=sum(len(p.rules) for p in policies),
        tokens=_token_rules(
            source, org, config.tokens, issues, contents, config.position.file, remote_keys
        ),
    )
    return organization, frozenset(general)


class _Conjunction:
    """Both matchers must accept; only used at load time to resolve integration targets."""

    def __init__(self, first: Matcher, second: Matcher) -> None:
        self.first, self.second = first, second

    def __call__(self, value: str) -> bool:
        return self.first(value) and self.second(value)


def _conjunction(first: Matcher, second: Matcher) -> Matcher | _Conjunction:
    if first.everything:
        return second
    if second.everything:
        return first
    return _Conjunction(first, second)


def _index_by_integration(
    integrations: frozenset[str], rules: list[tuple[CompiledRule, Callable[[str], bool]]]
) -> dict[str, RuleBucket]:
    """The buckets of one layer's `rules` by integration (see _index_layer)."""
    return _index_layer(integrations, rules)[0]


def _index_layer(
    integrations: frozenset[str], rules: list[tuple[CompiledRule, Callable[[str], bool]]]
) -> tuple[dict[str, RuleBucket], bool]:
    """Sorted by (policy, rule) so file and rule order can never change a decision or a trace.

    Integrations whose applicable rules are the same (usually all of them: most rules do not
    target integrations) share one bucket, so its target indexes are built and held once.
    Also says whether every rule applies to every integration (then, with any rule, every
    integration has the one bucket of all rules)."""
    ordered = sorted(rules, key=lambda item: (item[0].policy, item[0].name))
    names = sorted(integrations)
    # Thousands of rules share a few distinct integration targets (usually "*"): test each
    # target against the catalog once, not once per rule. Equal Matchers accept the same.
    accepts: dict[Callable[[str], bool], frozenset[str]] = {}
    accepted: list[frozenset[str]] = []
    for _, matches in ordered:
        found = accepts.get(matches)
        if found is None:
            found = accepts[matches] = frozenset(name for name in names if matches(name))
        accepted.append(found)
    every = tuple(rule for rule, _ in ordered)
    everywhere = frozenset(names)
    general = all(found == everywhere for found in accepts.values())
    index: dict[str, RuleBucket] = {}
    shared: dict[tuple[CompiledRule, ...], RuleBucket] = {}
    for integration in names:
        applicable = (
            every
            if general
            else tuple(
                rule for rule, found in zip(every, accepted, strict=True) if integration in found
            )
        )
        if not applicable:
            continue
        bucket = shared.get(applicable)  # CompiledRule compares by identity
        if bucket is None:
            bucket = shared[applicable] = RuleBucket(
                denies=RuleIndex(r for r in applicable if r.effect is Effect.DENY),
                allows=RuleIndex(r for r in applicable if r.effect is Effect.ALLOW),
            )
        index[integration] = bucket
    return index, general


def _check_catalog_references(
    config: OrganizationConfig, policy: Policy, issues: list[LoadIssue]
) -> None:
    """An exact ID that is not in the catalog is almost always a typo: refuse it at load time."""
    known = {
        "integrations": config.catalog.integrations,
        "applications": config.catalog.applications,
    }
    targets = [(policy.target, policy.position.line, "")] + [
        (rule.target, rule.position.line, rule.name) for rule in policy.rules
    ]
    for target, line, rule_name in targets:
        for dimension, catalog in known.items():
            for value in getattr(target, dimension):
                if value != WILDCARD and not is_glob(value) and value not in catalog:
                    issues.append(
                        LoadIssue(
                            policy.position.file,
                            line,
                            f"{dimension[:-1]} {value!r} is not in the organization's catalog",
                            policy.name,
                            rule_name,
                        )
                    )


def _compile_rule(
    policy: Policy, rule: Rule, issues: list[LoadIssue], attempt: LoadAttempt
) -> CompiledRule | None:
    condition: CompiledExpression | None = None
    if rule.condition is not None:
        try:
            condition = attempt.condition(rule.condition, CEL_DECLARATIONS)
            require_bool(condition)
        except CelCompileError as exc:
            issues.append(
                LoadIssue(
                    rule.condition_position.file,
                    rule.condition_position.line + max(exc.line, 1) - 1,
                    f"invalid condition (column {exc.column}): {exc.message}",
                    policy.name,
                    rule.name,
                )
            )
            return None

    def matchers(dimension: str) -> tuple[Matcher, ...]:
        candidates = (
            Matcher.of(getattr(policy.target, dimension)),
            Matcher.of(getattr(rule.target, dimension)),
        )
        return tuple(m for m in candidates if not m.everything)

    return CompiledRule(
        policy=policy.name,
        name=rule.name,
        effect=rule.effect,
        code=rule.code,
        message=rule.message,
        condition=condition,
        subject_matchers=matchers("subjects"),
        application_matchers=matchers("applications"),
        scope_matchers=matchers("scopes"),
        reads_clock=condition is not None and "now" in condition.variables,
        cacheable=policy.cache,
    )
