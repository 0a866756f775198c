"""Where policy sets come from: the storage backend interface and the directory backend.

The store only needs two things from a backend: load the whole set (all or nothing), and
tell it when the set may have changed. Keeping that behind `PolicyBackend` lets another
backend (a bundle server, object storage, git) come later without touching the store,
the reload thread or the server.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from policy_engine import metrics
from policy_engine.auth.keys import RemoteKeySets
from policy_engine.config import PolicyLimits
from policy_engine.errors import PolicyEngineError
from policy_engine.policy import CompiledPolicySet, PolicyLoadError, load_policy_set
from policy_engine.policy.bundle import BUNDLE_FILE
from policy_engine.policy.compile_cache import CompileCache
from policy_engine.policy.loader import FileRead, Listing, file_identity
from policy_engine.policy.source import is_policy_file, policy_names, tree_files
from policy_engine.store.journal import ChangeJournal
from policy_engine.store.watch import watch_tree
from policy_engine.store.writes import WriteTracker, open_for_writing

log = logging.getLogger(__name__)

STABLE_LOAD_ATTEMPTS = 5  # loads retried while files keep changing underneath
STABLE_LOAD_PAUSE_SECONDS = 0.05
# A file whose change time is this close to (or after) the moment the last load started
# reading may have been written again within one tick of the file system's clock without
# its identity changing: such a set is read again (through the caches) rather than trusted
# from its stat identities. Covers coarse kernel timestamps (a jiffy) and small clock skew.
RACY_WINDOW_NS = 1_000_000_000


class SourceChangedDuringLoad(PolicyEngineError):
    """The files changed while being read: the result may mix two versions, so it is dropped."""


class FilesBeingWritten(PolicyEngineError):
    """Some files are still being written: reading them now could load a truncated version,
    so the load waits until their writers close them. `paths` names them, relative to the
    policy directory."""

    def __init__(self, directory: Path, paths: list[str]) -> None:
        self.paths = paths
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(f"{directory}: still being written (open for writing): {shown}")


class PolicyBackend(Protocol):
    """A source of whole policy sets."""

    @property
    def location(self) -> str:
        """Where the policies come from, for logs and the status RPC."""
        ...

    def load(self, *, full: bool = False) -> CompiledPolicySet:
        """The whole compiled set; raises PolicyLoadError (with file:line issues) when invalid,
        SourceChangedDuringLoad when it could not get a consistent snapshot, FilesBeingWritten
        when a file is still being written (try again once it is closed). `full`: read every
        file's bytes, trusting no shortcut (an operator's SIGHUP)."""
        ...

    def changes(self, stop: threading.Event, debounce_ms: int) -> Iterator[str]:
        """Blocks, yielding a short description each time the set may have changed, until
        `stop` is set. Spurious yields are fine: reloading an unchanged set is a no-op."""
        ...

    def resync(self) -> tuple[list[str], bool]:
        """Compares the source with what the last load read, for changes `changes` did not
        report: (what differs, whether the source holds an item reachable by two names).
        A source that cannot tell returns ([], False)."""
        ...


_Identity = tuple[int, int]
_FileIdentity = tuple[int, int, int, int, int]  # see loader.file_identity


@dataclass(frozen=True, slots=True, eq=False)
class _Snapshot:
    """One look at the directory: which directory it is (`root`), the files a load would
    read as one walk lists them (`names`: policy files; every file of the tree with a bundle
    key), and one stat per file (`identities`: those files and every other file the last
    loads read, e.g. JWKS files and the bundle signature). `aliased`: the relative paths among
    `identities` whose file has another name too (a symlink, or more than one hard link), as
    the same lstat found; a write through that other name is reported by no watch on this
    one, so while any is listed the next look walks (see DirectoryBackend._fingerprint)."""

    root: _Identity | None
    names: tuple[str, ...]
    identities: dict[str, _FileIdentity | None]
    aliased: frozenset[str] = frozenset()

    def same_tree(self, other: _Snapshot) -> bool:
        return self.root == other.root and self.names == other.names


_Fingerprint = _Snapshot  # the name tests know it by


def _identity(path: Path) -> _Identity | None:
    """Which directory `path` is right now (following symlinks), or None when it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class DirectoryBackend:
    """Policies as files in a directory, one folder per organization (see the loader).

    Each `load` looks at the directory once before reading (a `_Snapshot`), and once more
    after: nothing else is listed or stat'ed. While the watcher runs and its journal knows
    every path that changed since the last look (see policy_engine.store.journal), a look
    re-stats only those paths (and the directory itself), as long as every file a load reads
    has one name (see _fingerprint); otherwise (no watcher, startup, a queue overflow, folders
    added or removed, a folder with two names or none watched, a symlinked or hard-linked
    file, a signed bundle, SIGHUP) it walks the tree and stats every file. A file whose
    identity (loader.file_identity: device, inode, size, mtime, ctime) is the one the last
    good load recorded, and that was last changed well before that load started reading (see
    RACY_WINDOW_NS), is settled: its bytes are the ones already loaded. `load` returns that
    same set when every file is settled and the walk lists the same files
    (`unchanged_since_load`); otherwise it reads only the files that are not settled, and
    parses and compiles only files whose bytes changed (`cache`, a CompileCache: see
    policy_engine.policy.compile_cache). With a bundle key every file of a changed set is read
    and verified again.

    `load` reads a consistent snapshot: the walk and every identity taken after loading must
    match those taken before, and every file the load read (FileRead: JWKS files and the
    bundle signature too) must still be the one it read; otherwise the result is refused, so
    a deploy that lands mid-read is never half-applied. Nor is a file still being written read
    at all: `load` raises FilesBeingWritten while the watcher saw one of those files modified
    and not yet closed, or the kernel reports one that is not settled open for writing (also
    when the load failed: a truncated file usually does not parse). `changes` watches the tree
    and every file the last load read with inotify and reports finished writes only (see
    policy_engine.store.watch).
    """

    # Asked of every file the loader reads; a class attribute so a test can take it away.
    probe_open_for_writing = staticmethod(open_for_writing)
    racy_window_ns = RACY_WINDOW_NS  # a class attribute so a test can narrow it

    def __init__(
        self,
        directory: Path,
        *,
        bundle_public_key: bytes | None = None,
        bundle_not_before: datetime | None = None,
        limits: PolicyLimits | None = None,
        remote_keys: RemoteKeySets | None = None,
    ) -> None:
        """`remote_keys`: the JWKS URLs' key sets (the "jwks" component a server starts and
        stops); without it the backend keeps its own, started by the first load that needs
        one."""
        self.directory = Path(directory)
        self.bundle_public_key = bundle_public_key
        # No bundle signed before this loads (`bundle.not_before`); raised to each loaded
        # set's signing time, so an older signed set put back cannot replace a newer one.
        self.bundle_not_before = bundle_not_before
        self.limits = limits or PolicyLimits()  # per file and per set, checked before parsing
        # JWKS URLs' keys survive reloads; a load takes them without waiting for the network.
        self._remote_keys = remote_keys if remote_keys is not None else RemoteKeySets()
        self._writes = WriteTracker()  # fed by the watcher in changes()
        self._journal = ChangeJournal()  # fed by the watcher in changes()
        self._base: _Snapshot | None = None  # the last look _fingerprint took
        self._expected: tuple[tuple[FileRead, ...], tuple[str, ...]] | None = None
        self._settled_memo: (
            tuple[_Snapshot, tuple[FileRead, ...], tuple[int, int], set[str]] | None
        ) = None
        # _reads_through_links's answer per list of files read (the last two asked).
        self._linked_memo: list[tuple[tuple[FileRead, ...], bool]] = []
        # What the last load read or tried to read; replaced whole by the reload thread, read
        # by the watch thread.
        self._files_read: tuple[FileRead, ...] = ()
        self.cache = CompileCache()  # what the last good load parsed and compiled
        # The set the last good load returned (the one the store serves: no extra memory),
        # with what that load read, when it started reading, and which directory it read.
        self._last_good: CompiledPolicySet | None = None
        self._last_good_read: tuple[FileRead, ...] = ()
        self._last_good_read_ns = 0  # time.time_ns()
        self._last_good_root: _Identity | None = None
        self.full_loads = 0  # loads that read the files (a count for tests and metrics)
        # The look the last load took before failing (None after a good one): what a resync
        # compares with then, so a broken tree left alone is not reloaded again and again.
        self._failed_look: _Snapshot | None = None

    @property
    def location(self) -> str:
        return str(self.directory)

    @property
    def remote_keys(self) -> RemoteKeySets:
        """The JWKS URLs' key sets this backend's loads use (a lifecycle component)."""
        return self._remote_keys

    @property
    def files_read(self) -> tuple[FileRead, ...]:
        """Every file the last load read or tried to read (see FileRead)."""
        return self._files_read

    def load(self, *, full: bool = False) -> CompiledPolicySet:
        """See PolicyBackend.load. Without `full`, files whose stat identity shows no change
        since the last good load are not read again (their cached digest and parse are reused),
        and a set whose files all show none is not read at all. A writer can change a file's
        bytes without changing its identity (stores through a shared mmap after the first
        dirty page leave size, mtime and ctime alone), so `full` (SIGHUP) reads and hashes
        every file; parsing and compiling are still reused by content hash, and the tree is
        walked before and after reading."""
        if full:
            self._base = None  # trust no journal either: walk
        before = self._fingerprint()
        self._refuse_files_being_written(before)
        last_good = self._last_good
        if last_good is not None and not full and self._unchanged(before):
            log.debug(
                "%s: every file is the one revision %s was loaded from; nothing read",
                self.directory,
                last_good.revision,
            )
            self._files_read = self._last_good_read
            metrics.POLICY_LOADS.labels(kind="unchanged").inc()
            self._failed_look = None
            return last_good
        self.full_loads += 1
        metrics.POLICY_LOADS.labels(kind="read").inc()
        read_ns = time.time_ns()
        listing = None
        if self.bundle_public_key is None:
            settled = set() if full else self._settled(before)
            listing = Listing(before.names, before.identities, settled)
        try:
            policies = load_policy_set(
                self.directory,
                bundle_public_key=self.bundle_public_key,
                bundle_not_before=self._not_before(),
                remote_keys=self._remote_keys,
                limits=self.limits,
                cache=self.cache,
                listing=listing,
            )
        except PolicyLoadError as exc:
            self._files_read = exc.files_read
            self._refuse_files_being_written()  # the error may be a truncated file's
            # A file deleted or replaced between the look and its read fails the load too:
            # that is a torn read, tried again, not the set's own error.
            self._check_consistent(before, exc.files_read, full)
            self._failed_look = before  # what a resync compares with until a load is good
            raise
        self._files_read = policies.files_read
        after = self._check_consistent(before, policies.files_read, full)
        self._refuse_files_being_written(after)  # opened for writing while we read
        if last_good is not None and last_good.revision == policies.revision:
            # The same content read again: keep serving the same object, so the store and
            # this backend never hold two copies of one revision.
            policies, self._files_read = last_good, policies.files_read
        self._last_good, self._last_good_read = policies, self._files_read
        self._last_good_read_ns, self._last_good_root = read_ns, before.root
        self._failed_look = None
        return policies

    def _check_consistent(
        self, before: _Snapshot, files_read: tuple[FileRead, ...], full: bool
    ) -> _Snapshot:
        """The look after a load that began with `before` and read `files_read`; raises
        SourceChangedDuringLoad when the tree or a file read changed in between."""
        # Files the walk does not list (JWKS files, the signature) are stat'ed here, the
        # others by the second look: each file once after loading.
        changed = self.changed_since_read(
            tuple(file for file in files_read if file.relative not in before.identities)
        )
        if full:
            self._base = None
        after = self._fingerprint()
        changed += [
            file.relative
            for file in files_read
            if file.relative in after.identities
            and after.identities[file.relative] != file.identity
        ]
        if changed or not after.same_tree(before):
            shown = f" ({', '.join(changed[:5])})" if changed else ""
            raise SourceChangedDuringLoad(
                f"{self.directory} changed while it was being loaded{shown}"
            )
        return after

    def _not_before(self) -> datetime | None:
        """The earliest signing time a bundle may have: the configured floor, raised to the
        serving set's signing time."""
        serving = self._last_good.signed_at if self._last_good is not None else None
        floors = [t for t in (self.bundle_not_before, serving) if t is not None]
        return max(floors) if floors else None

    def unchanged_since_load(self, root: _Identity | None = None) -> bool:
        """True when loading now would read exactly the files the last good load read: the
        directory is the same one, the walk finds the same files, and every file read is
        settled (same identity, last changed well before that load started reading: see
        RACY_WINDOW_NS). Costs a walk and a stat per file; reads none. `root` is ignored
        (the directory's identity is taken with the walk)."""
        return self._unchanged(self._snapshot())

    def _unchanged(self, snapshot: _Snapshot) -> bool:
        return self._last_good is not None and next(self._differences(snapshot), None) is None

    def _differences(self, snapshot: _Snapshot) -> Iterator[str]:
        """What keeps `snapshot` from being the look the last good load read, lazily (a load
        stops at the first; a resync lists them): "<directory>" (gone or another one),
        "+name"/"-name" (a policy file the walk lists now / no longer), "name" (a file read
        whose identity differs), "~name" (same identity, but changed within the racy window
        of that load: it may have been written again within one clock tick). Nothing when
        there is no last good load either (callers check that)."""
        if self._last_good is None:
            return
        if snapshot.root is None or snapshot.root != self._last_good_root:
            yield str(self.directory)
            return
        files_read = self._last_good_read
        expected = self._expected_names(files_read)
        # The same order almost always; a set compare is what decides.
        if snapshot.names != expected:
            listed, wanted = set(snapshot.names), set(expected)
            yield from (f"+{name}" for name in sorted(listed - wanted, key=_walk_order))
            yield from (f"-{name}" for name in sorted(wanted - listed, key=_walk_order))
        racy_after = self._last_good_read_ns - self.racy_window_ns
        for file in files_read:
            identity = snapshot.identities.get(file.relative, _UNKNOWN)
            if identity != file.identity:
                yield file.relative
            elif (
                file.identity is not None and max(file.identity[3], file.identity[4]) >= racy_after
            ):
                yield f"~{file.relative}"

    def resync(self) -> tuple[list[str], bool]:
        """Walks the tree as a load's slow path does (one stat per file, nothing read) and
        compares it with what the last load read, for changes no watch reported (a write
        through a hard link made later outside the tree, a network file system's other
        clients). Compared with the last good load (see _differences) or, when the last load
        failed, with that attempt's look (its tree, and the identities it saw), so a broken
        tree left alone is not reloaded over and over.

        Returns (differences, aliased): the paths that differ, relative to the directory
        (marked as in _differences; empty: reloading now would read nothing new), and whether
        a file the walk lists has another name (a symlink, more than one hard link). Either
        makes the journal inexact, so the next reload walks: a difference means a change
        went unreported, and an aliased file means edits through its other name may too
        (the rule _fingerprint applies to its own looks). Called with loads excluded
        (PolicyStore.resync holds the reload lock)."""
        snapshot = self._snapshot()
        failed = self._failed_look
        if failed is not None:
            differences = _snapshot_differences(failed, snapshot, str(self.directory))
        elif self._last_good is None:
            differences = []  # nothing loaded nor tried yet: the first load walks anyway
        else:
            differences = list(self._differences(snapshot))
            gone = {d[1:] for d in differences if d.startswith("-")}
            if gone:  # a removed file is listed once, not also as changed
                differences = [d for d in differences if d not in gone]
        if differences or snapshot.aliased:
            self._journal.lose()
        return differences, bool(snapshot.aliased)

    def _expected_names(self, files_read: tuple[FileRead, ...]) -> tuple[str, ...]:
        """The walk's names that would list exactly the files `files_read` names (the last
        good load's), in the walk's order; computed once per good load."""
        if self._expected is None or self._expected[0] is not files_read:
            if self.bundle_public_key is not None:
                # The signature covers every other file of the tree.
                read = [file.relative for file in files_read if file.relative != BUNDLE_FILE]
            else:
                read = [file.relative for file in files_read if is_policy_file(file.relative)]
            # files_read is sorted by name; the walk sorts by path parts (see _walk_order).
            self._expected = (files_read, tuple(sorted(read, key=_walk_order)))
        return self._expected[1]

    def changed_since_read(self, files_read: tuple[FileRead, ...]) -> list[str]:
        """The relative paths among `files_read` whose file is no longer the one read (written,
        replaced, removed or created since; see FileRead.identity)."""
        return [
            file.relative
            for file in files_read
            if file_identity(self.directory / file.relative) != file.identity
        ]

    def files_being_written(self) -> list[str]:
        """Files the loader would read that are still being written, relative to the
        directory, sorted: those the watcher saw modified and not yet closed, and those the
        kernel reports open for writing (see writes.open_for_writing) among the policy files,
        the bundle signature and every file the last load read. A file the watcher
        still records but the kernel says no process holds open for writing is finished
        (its close event was lost, e.g. to a queue overflow) and is forgotten."""
        return self._being_written(self._snapshot())

    def _being_written(self, snapshot: _Snapshot) -> list[str]:
        found: set[str] = set()
        for path in self._writes.pending():
            held = self.probe_open_for_writing(Path(path))
            if held is False:
                self._writes.finished(path)
            elif held is None and not Path(path).exists():
                self._writes.finished(path)  # gone: nothing left to read half-done
            else:
                found.add(path)
        settled = self._settled(snapshot)
        names = [
            *snapshot.names,
            BUNDLE_FILE,
            *(file.relative for file in self._files_read),
        ]
        top = str(self.directory)
        for name in dict.fromkeys(names):
            if name in settled:
                continue
            path = os.path.join(top, name)
            if path not in found and self.probe_open_for_writing(Path(path)):
                found.add(path)
        return sorted(_relative(self.directory, path) for path in found)

    def _settled(self, snapshot: _Snapshot) -> set[str]:
        """Files the last good load read that have not changed since, by `snapshot`'s
        identities (same identity, last changed well before that load read them: see
        RACY_WINDOW_NS). Reading one of these now gives the bytes already loaded, however
        many writers hold it open, so it is neither read again nor probed for writers; once
        one writes, its identity changes."""
        memo = self._settled_memo
        if (
            memo is not None
            and memo[0] is snapshot
            and memo[1] is self._last_good_read
            and memo[2] == (self._last_good_read_ns, self.racy_window_ns)
        ):
            return memo[3]  # asked again of the same look at the same last good load
        racy_after = self._last_good_read_ns - self.racy_window_ns
        identities = snapshot.identities
        settled = set()
        for file in self._last_good_read:
            identity = file.identity
            if (
                identity is not None
                and identity[3] < racy_after
                and identity[4] < racy_after
                and identities.get(file.relative, _UNKNOWN) == identity
            ):
                settled.add(file.relative)
        self._settled_memo = (
            snapshot,
            self._last_good_read,
            (self._last_good_read_ns, self.racy_window_ns),
            settled,
        )
        return settled

    def _refuse_files_being_written(self, snapshot: _Snapshot | None = None) -> None:
        being_written = self._being_written(snapshot if snapshot is not None else self._snapshot())
        if being_written:
            raise FilesBeingWritten(self.directory, being_written)

    def _fingerprint(self) -> _Snapshot:
        """The snapshot `load` takes before and after reading (a hook for tests): the last
        one with just the paths the watcher saw change since stat'ed again, when its journal
        knows them all (see ChangeJournal) and every file the loader reads has just the name
        it reads it by: no file of the last look was aliased (a symlink, or hard-linked: see
        _Snapshot.aliased) and no file the last loads read was reached through a symlinked
        folder (see _reads_through_links). Otherwise a walk of the tree (`_snapshot`): a
        change made through a file's other name is reported under that name or not at all
        (a hard link outside the tree), so only a stat by the loader's name sees it."""
        changed = self._journal.take()
        base, snapshot = self._base, None
        if (
            changed is not None
            and base is not None
            and not base.aliased
            and self.bundle_public_key is None
            and not self._reads_through_links()
        ):
            snapshot = self._derived(base, changed)
        if snapshot is None:
            snapshot = self._snapshot()
        self._base = snapshot
        return snapshot

    def _derived(self, base: _Snapshot, changed: frozenset[str]) -> _Snapshot | None:
        """`base` brought up to date by stat'ing the `changed` absolute paths (and the files
        the last loads read that `base` did not stat): the snapshot a walk would take now, as
        the watcher reported every change since `base` (ChangeJournal.take). None when it
        cannot tell (the directory itself changed, a path outside it): walk instead."""
        root = _identity(self.directory)
        if root is None or root != base.root:
            return None
        top = os.path.join(str(self.directory), "")
        identities = dict(base.identities)
        aliased = set(base.aliased)  # empty: _fingerprint walks otherwise
        listed: set[str] | None = None
        added: list[str] = []
        removed: set[str] = set()
        for path in changed:
            if not path.startswith(top):
                return None
            relative = path[len(top) :].replace(os.sep, "/")
            if is_policy_file(relative):
                if listed is None:
                    listed = set(base.names)
                # What os.walk lists as a file: any entry but a folder (links followed), a
                # FIFO or dangling link too (the loader says it cannot be read).
                exists = os.path.lexists(path) and not os.path.isdir(path)
                if exists and relative not in listed:
                    added.append(relative)
                elif not exists and relative in listed:
                    removed.add(relative)
                identities[relative] = _look(path, relative, aliased)
            elif relative in identities:  # another file a load read (a JWKS file)
                identities[relative] = _look(path, relative, aliased)
        for file in (*self._last_good_read, *self._files_read):
            if file.relative not in identities:
                identities[file.relative] = _look(
                    os.path.join(top, file.relative), file.relative, aliased
                )
        names = base.names
        if added or removed:
            kept = [name for name in names if name not in removed]
            names = tuple(sorted(kept + added, key=_walk_order))
        return _Snapshot(root, names, identities, frozenset(aliased))

    def _snapshot(self) -> _Snapshot:
        """One walk of the directory and one stat of each file it lists and of each other file
        the last loads read (see _Snapshot)."""
        root = _identity(self.directory)
        if self.bundle_public_key is not None:
            names = tree_files(self.directory)
        else:
            names = policy_names(self.directory)
        # One string concatenation per name: os.path.join costs more than the stat at 10,000
        # files, and a relative name never restarts the path.
        top = os.path.join(str(self.directory), "")
        aliased: set[str] = set()
        identities: dict[str, _FileIdentity | None] = {
            name: _look(top + name, name, aliased) for name in names
        }
        for file in (*self._last_good_read, *self._files_read):
            if file.relative not in identities:
                identities[file.relative] = _look(
                    os.path.join(top, file.relative), file.relative, aliased
                )
        return _Snapshot(root, tuple(names), identities, frozenset(aliased))

    def _reads_through_links(self) -> bool:
        """True when a file the last loads read was not where its name below the directory
        (the directory's real path joined with it) says: a symlinked folder on its way (a JWKS
        file in a hidden `.keys` linked to `.keys-v2`), which the watcher may report under the
        folder's other name. Computed once per load's list (a string compare per file)."""
        top = os.path.join(os.path.realpath(self.directory), "")
        memo = self._linked_memo
        answers: list[tuple[tuple[FileRead, ...], bool]] = []
        for files in (self._last_good_read, self._files_read):
            known = next((linked for seen, linked in memo if seen is files), None)
            if known is None:
                # The plain case compares equal as joined; normalize only what does not.
                known = any(
                    top + file.relative != file.real_path
                    and os.path.normpath(top + file.relative) != os.path.normpath(file.real_path)
                    for file in files
                )
            answers.append((files, known))
        self._linked_memo = answers  # both lists: the next load's first look asks again
        return any(linked for _, linked in answers)

    def changes(self, stop: threading.Event, debounce_ms: int) -> Iterator[str]:
        """Yields once per burst of finished changes (files closed after writing, renamed,
        deleted; folders added or removed; the directory deleted, recreated or swapped; any
        file the last load read, hidden or not, changed or, if it was missing, created) and
        records files being written for `load`; see watch.watch_tree."""
        return watch_tree(
            self.directory,
            stop,
            debounce_ms,
            self._writes,
            lambda: self._files_read,
            self._journal,
        )


_UNKNOWN = object()  # not stat'ed: never equal to an identity


def _look(path: str, relative: str, aliased: set[str]) -> _FileIdentity | None:
    """loader.file_identity of a path already joined (the hot loop of a snapshot), adding
    `relative` to `aliased` when the file has another name: `path` is a symlink (even a
    dangling one), or the file has more than one hard link (another organization's file, a
    copy outside the tree made by `cp -al` or `rsync --link-dest`). One lstat per file, as a
    plain file's lstat is its stat; a symlink's target is stat'ed too."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            aliased.add(relative)
            st = os.stat(path)
        elif st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            aliased.add(relative)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _snapshot_differences(before: _Snapshot, now: _Snapshot, directory: str) -> list[str]:
    """The relative paths whose identity or listing differs between two looks (marked as in
    DirectoryBackend._differences), or [`directory`] when it is another one or gone."""
    if before.root != now.root or now.root is None:
        return [directory]
    listed, was = set(now.names), set(before.names)
    found = [f"+{name}" for name in sorted(listed - was, key=_walk_order)]
    found += [f"-{name}" for name in sorted(was - listed, key=_walk_order)]
    found += [
        name
        for name, identity in now.identities.items()
        if before.identities.get(name, _UNKNOWN) != identity and name in before.identities
    ]
    return found


def _walk_order(relative: str) -> str:
    """Sort key giving the order policy_names lists paths in (by their parts: "/" made "\\0",
    which sorts before any character a name holds)."""
    return relative.replace("/", "\0")


def _relative(directory: Path, path: str) -> str:
    try:
        return str(Path(path).relative_to(directory))
    except ValueError:
        return path
