"""Watching a policy tree with inotify(7): a change is reported once a write is finished.

A reload is triggered by a file closed after writing (IN_CLOSE_WRITE), renamed into place
(IN_MOVED_TO), renamed away or deleted, a link or folder created, or metadata changed; never
by a write itself (IN_MODIFY). Writes only mark the file as being written (`WriteTracker`)
until it is closed, so a reload asked for some other way can wait for it too.

watchfiles (Rust `notify` underneath) was used before; it drops close events, so it cannot
tell a finished write from a half-done one. inotify_simple is a thin ctypes binding to the
same kernel interface that passes every event through.

inotify watches one folder each, not a tree: every folder below the root gets its own watch,
added when it appears (new folders are rescanned, files created in them before their watch
was in place included). A watch follows its inode, so a root that is deleted or replaced
(rename, symlink swap) is noticed by checking which folder the path names. When the kernel
queue overflows (IN_Q_OVERFLOW) events were lost: everything may have changed, so the tree
is rescanned and a reload requested; the reload asks the kernel which files are still open
for writing.

Besides the policy files the walk finds, every file the last load read or tried to read is
watched (`FileRead`: JWKS files named by `tokens.jwks_file`, hidden or not, the bundle
signature and, with a bundle key, every signed file), by the name the loader used and by
where its symlinks led: the folder holding each (hidden or not), or for a missing file its
nearest existing ancestor, so the file's appearing is noticed too. When a load reads a
different list, the watches follow and a reload is requested (a change made before the new
watch was in place is not lost).

Every path a passing event names is also recorded in a ChangeJournal (see
policy_engine.store.journal), read and recorded under the journal's lock, so a reload can
re-stat just those paths instead of walking the tree.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import select
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from inotify_simple import INotify, flags

from policy_engine.policy.bundle import BUNDLE_FILE
from policy_engine.policy.loader import POLICY_SUFFIXES, FileRead
from policy_engine.policy.source import is_suite_file
from policy_engine.store.journal import ChangeJournal
from policy_engine.store.writes import WriteTracker

log = logging.getLogger(__name__)

# How often the watcher checks that the directory it watches is still the configured one
# (deleted, recreated, replaced by a rename or a symlink swap: inotify reports none of these
# on the old watch).
IDENTITY_CHECK_MS = 500
MISSING_POLL_SECONDS = 0.2  # while the directory is gone, how often to look for it again
WATCH_STEP_MS = 50  # quiet time that ends a burst of changes (bounded by the debounce)
STOP_POLL_MS = 100  # longest a blocked read delays noticing `stop`

# Kubernetes ConfigMap/Secret volumes publish a new version by renaming the hidden
# `..data` symlink; that rename is the one hidden change that matters.
KUBERNETES_DATA_LINK = "..data"
_EDITOR_TEMPORARY = re.compile(
    r"(~|\.sw[a-p]|\.tmp|\.temp|\.bak|\.orig|\.part|\.crdownload|___jb_\w+___)$|^4913$|^#.*#$"
)

_FOLDER_MASK = (
    flags.MODIFY
    | flags.CLOSE_WRITE
    | flags.ATTRIB
    | flags.CREATE
    | flags.DELETE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
)
_GONE = flags.DELETE | flags.MOVED_FROM
_RESHAPES = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO


class PolicyChangeFilter:
    """Passes changes that can alter the policy set: *.yaml/*.yml files (not test suites,
    `*.test.yaml`, which the loader never reads), the bundle manifest,
    folders, and every file the last load read (`files_read`, hidden or not) with the
    folders leading to it.

    Other hidden paths and editor temporaries are dropped (the loader ignores them too),
    except Kubernetes' `..data` link swap. A deleted entry that is not known to be a file may
    have been a symlinked folder, so it passes unless it looks like a temporary; an extra
    reload is only a no-op.
    """

    def __init__(self, root: Path, files_read: Iterable[FileRead] = ()) -> None:
        self.root = Path(os.path.abspath(root))
        self.read_paths, self.read_folders = _read_targets(self.root, files_read)

    def reads(self, path: str) -> bool:
        """`path` is a file the last load read or one of the folders leading to it."""
        path = os.path.abspath(path)
        return path in self.read_paths or path in self.read_folders

    def __call__(self, path: str, *, deleted: bool = False, is_dir: bool = False) -> bool:
        if self.reads(path):
            return True
        candidate = Path(path)
        try:
            parts = candidate.relative_to(self.root).parts
        except ValueError:
            return True  # outside the root as we spelled it (e.g. a resolved symlink): be safe
        if not parts:
            return True  # the directory itself
        if KUBERNETES_DATA_LINK in parts:
            return True
        if any(part.startswith(".") for part in parts):
            return False
        name = parts[-1]
        if _EDITOR_TEMPORARY.search(name) or is_suite_file(name):
            return False  # a suite is no policy file (unless signed: then `reads` passed it)
        if candidate.suffix in POLICY_SUFFIXES or name == BUNDLE_FILE or is_dir:
            return True
        if deleted:
            return True
        return candidate.is_dir()


def _read_targets(
    root: Path, files_read: Iterable[FileRead]
) -> tuple[frozenset[str], frozenset[str]]:
    """The absolute paths naming each file read (as the loader named it below `root`, where
    its folder really is, and where its symlinks led) and every folder above those paths."""
    paths: set[str] = set()
    real_folders: dict[str, str] = {}  # thousands of files share a few folders: resolve once
    top = os.path.abspath(root)
    for file in files_read:
        named = os.path.normpath(os.path.join(top, file.relative))
        folder, name = os.path.split(named)
        real_folder = real_folders.get(folder)
        if real_folder is None:
            real_folder = real_folders[folder] = os.path.realpath(folder)
        paths.update((named, os.path.join(real_folder, name), os.path.normpath(file.real_path)))
    folders: set[str] = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in folders and parent != os.path.dirname(parent):
            folders.add(parent)
            parent = os.path.dirname(parent)
    return frozenset(paths), frozenset(folders)


def _nearest_folder(path: str) -> str | None:
    """The folder holding `path`, or its nearest existing ancestor when that is missing."""
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        if parent == os.path.dirname(parent):
            return None
        parent = os.path.dirname(parent)
    return parent


def _identity(path: Path) -> tuple[int, int] | None:
    """Which directory `path` is right now (following symlinks), or None when it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class WatchNotice(str):
    """A change `watch_tree` yields that also says whether `root` is watched from now on:
    `problem` is empty once a watch is in place, else why there is none (the directory is
    missing, inotify refused); the reloader shows it in the store's status."""

    problem: str

    def __new__(cls, text: str, problem: str = "") -> WatchNotice:
        notice = super().__new__(cls, text)
        notice.problem = problem
        return notice


def watch_tree(
    root: Path,
    stop: threading.Event,
    debounce_ms: int,
    writes: WriteTracker,
    files_read: Callable[[], tuple[FileRead, ...]] = tuple,
    journal: ChangeJournal | None = None,
) -> Iterator[str]:
    """Yields a short description each time the policy set under `root` may have changed,
    until `stop` is set; records unfinished writes in `writes` as they happen, and every
    changed path in `journal` (exact only while a watch is in place: see ChangeJournal).
    `files_read()` gives what the last load read (asked again about every STOP_POLL_MS): each
    of those files is watched too, hidden or not (see the module docstring).

    Survives the directory being deleted, recreated or swapped (rename, symlink): every
    IDENTITY_CHECK_MS it checks which directory the path names, waits for it to come back
    when it is gone, and re-watches when it is a different one. Each new watch yields once
    when established, covering changes made before it was in place. When inotify itself
    cannot be used (e.g. fs.inotify.max_user_instances reached) it logs and retries.
    """
    missing = f"the policy directory {root} is missing"
    reported_missing = False
    unwatchable = ""  # why inotify refused, while it does (said once, not every retry)
    while not stop.is_set():
        identity = _identity(root)
        if identity is None:
            if not reported_missing:
                reported_missing = True
                yield WatchNotice(f"{root} is missing", problem=missing)
            stop.wait(MISSING_POLL_SECONDS)
            continue
        if reported_missing:
            reported_missing = False
            yield f"{root} is back"
        try:
            tree = _TreeWatch(root, writes, files_read, journal or ChangeJournal())
        except OSError as exc:  # e.g. fs.inotify.max_user_instances reached
            log.warning("cannot watch %s (%s); retrying", root, exc)
            if not unwatchable:
                unwatchable = f"cannot watch {root} ({exc}); retrying"
                # A reload: changes made meanwhile are not reported by any watch.
                yield WatchNotice(f"{root} (cannot be watched)", problem=unwatchable)
            stop.wait(MISSING_POLL_SECONDS * 5)
            continue
        unwatchable = ""
        with tree:
            if not tree.established:  # vanished between the check and the watch
                stop.wait(MISSING_POLL_SECONDS)
                continue
            yield WatchNotice(f"watching {root}")
            while not stop.is_set():
                change = tree.next_change(stop, debounce_ms)
                now = _identity(root)
                if change:
                    # A change that took the directory away says so: it is its notice too.
                    yield WatchNotice(change, problem=missing) if now is None else change
                if now != identity:
                    if now is None:
                        reported_missing = change is not None
                    else:
                        yield f"{root} was replaced"
                    break


class _TreeWatch:
    """One inotify instance watching `root`, every (non-hidden) folder below it, and the
    folders holding the files the last load read."""

    def __init__(
        self,
        root: Path,
        writes: WriteTracker,
        files_read: Callable[[], tuple[FileRead, ...]],
        journal: ChangeJournal,
    ) -> None:
        self.root = root
        self.writes = writes
        self.journal = journal
        self._files_read = files_read
        self._read = files_read()
        self.filter = PolicyChangeFilter(root, self._read)
        self._inotify = INotify()
        self._poll = select.poll()  # waits for events without reading them (see next_change)
        self._poll.register(self._inotify.fileno(), select.POLLIN)
        self._folders: dict[int, Path] = {}  # watch descriptor -> folder as spelled from root
        self._real_folders: dict[int, str] = {}  # watch descriptor -> folder, links resolved
        self._full_reported = False
        self._blind = False  # the last sync left a folder unwatched or with two names
        self.established = self._sync()
        if self.established:
            journal.attach(self._unread, exact=not self._blind)

    def __enter__(self) -> _TreeWatch:
        return self

    def __exit__(self, *_: object) -> None:
        with self.journal.lock:  # no settle() may ask a closed descriptor
            self.journal.detach()
            self._inotify.close()  # drops every watch

    def _unread(self) -> bool:
        """The kernel holds events this watch has not read yet (FIONREAD, inotify(7))."""
        size = fcntl.ioctl(self._inotify.fileno(), termios.FIONREAD, struct.pack("i", 0))
        return struct.unpack("i", size)[0] > 0

    def _sync(self) -> bool:
        """Watch every folder the loader would read (walked as it walks: symlinked folders
        followed, hidden ones skipped), the folder of every file the last load read (or its
        nearest existing ancestor), and drop watches on folders no longer needed. False when
        the root itself cannot be watched.

        The journal is told (callers hold its lock) when it cannot be trusted: for good while
        a folder has a second name (a symlinked folder, or one the kernel gives an existing
        watch: a bind mount) or one could not be watched (the watch limit reached, EACCES),
        until a later sync finds neither (`resume`); once when folders were watched anew (they
        may have changed before their watch)."""
        folders: dict[int, Path] = {}
        seen: set[str] = set()
        linked = False  # a folder has a second name: changes may be reported under it
        unwatched = False  # a folder could not be watched: its changes are not reported
        for folder, subfolders, _ in os.walk(self.root, followlinks=True):
            # A symlinked folder may name files the loader names otherwise (or twice); a
            # link to a folder already walked too (the walk order decides which name wins).
            linked = linked or (Path(folder) != self.root and os.path.islink(folder))
            real = os.path.realpath(folder)
            if real in seen:  # a symlink cycle, or a second name for a watched folder
                subfolders[:] = []
                continue
            seen.add(real)
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            wd = self._add_watch(folder)
            if wd is None:
                if Path(folder) == self.root:
                    return False
                unwatched = True  # or deleted meanwhile: its parent's event syncs again
                continue
            if wd in folders:  # one folder by two names (a bind mount): events name one
                linked = True
                continue
            folders[wd] = Path(folder)
        if not folders:
            return False
        for path in sorted(self.filter.read_paths):
            nearest = _nearest_folder(path)
            if nearest is None or os.path.realpath(nearest) in seen:
                continue
            seen.add(os.path.realpath(nearest))
            wd = self._add_watch(nearest)
            if wd is None:
                unwatched = True
            elif wd in folders:
                linked = True
            else:
                folders[wd] = Path(nearest)
        for wd in set(self._folders) - set(folders):
            with contextlib.suppress(OSError):  # already removed by the kernel
                self._inotify.rm_watch(wd)
        blind = linked or unwatched
        if blind:
            self.journal.lose(for_good=True)
        elif any(wd not in self._folders for wd in folders):
            self.journal.lose()
        if self._blind and not blind:
            self.journal.resume()  # exact again from the next take on
        self._folders = folders
        self._real_folders = {wd: os.path.realpath(folder) for wd, folder in folders.items()}
        self._blind = blind
        return True

    def _add_watch(self, folder: str) -> int | None:
        """The watch descriptor for `folder` (an existing one when the kernel already watches
        that folder under another name), or None when it cannot be watched (logged once for
        the watch limit)."""
        try:
            return self._inotify.add_watch(folder, _FOLDER_MASK)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not self._full_reported:
                self._full_reported = True
                log.error(
                    "cannot watch %s: the inotify watch limit is reached "
                    "(raise fs.inotify.max_user_watches); changes below it are noticed "
                    "only on the next SIGHUP or other change (each reload walks the tree)",
                    folder,
                )
            elif exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENOSPC):
                log.warning("cannot watch %s (%s); each reload walks the tree", folder, exc)
            return None

    def _follow_files_read(self) -> str | None:
        """Re-watches when the last load read other files than those watched; returns the
        change to report then (a reload: the new files may have changed before their watch)."""
        files_read = self._files_read()
        if files_read is self._read:
            return None
        self._read = files_read
        new_filter = PolicyChangeFilter(self.root, files_read)
        if (new_filter.read_paths, new_filter.read_folders) == (
            self.filter.read_paths,
            self.filter.read_folders,
        ):
            return None
        self.filter = new_filter
        with self.journal.lock:
            synced = self._sync()
        if not synced:
            return f"{self.root} (cannot be watched)"
        return f"{self.root}: the files the last load read (now watched)"

    def next_change(self, stop: threading.Event, debounce_ms: int) -> str | None:
        """Waits up to IDENTITY_CHECK_MS for a finished change, then collects the burst it
        starts (until WATCH_STEP_MS pass quietly, at most `debounce_ms` in all). Returns a
        description of the burst, or None when nothing finished in time."""
        debounce = max(debounce_ms, 1) / 1000
        step_ms = min(WATCH_STEP_MS, max(debounce_ms, 1))
        deadline = time.monotonic() + IDENTITY_CHECK_MS / 1000
        changed: list[str] = []
        first_at = 0.0
        while not stop.is_set():
            followed = self._follow_files_read()
            if followed:
                if not changed:
                    first_at = time.monotonic()
                changed.append(followed)
            now = time.monotonic()
            if changed:
                left = first_at + debounce - now
                if left <= 0:
                    break
                timeout_ms = min(step_ms, left * 1000)
            else:
                left = deadline - now
                if left <= 0:
                    return None
                timeout_ms = min(STOP_POLL_MS, left * 1000)
            # Wait without reading, then read and record under the journal's lock: whoever
            # holds it sees every event read so far recorded (ChangeJournal.settle).
            if self._poll.poll(max(1, int(timeout_ms))):
                with self.journal.lock:
                    events = self._inotify.read(timeout=0)
                    found = self._handle(events) if events else []
            else:
                events, found = [], []
            if not events:
                if changed and timeout_ms >= step_ms:
                    break  # a quiet step: the burst is over
                continue
            if found and not changed:
                first_at = time.monotonic()
            changed.extend(found)
        return _describe(changed) if changed else None

    def _handle(self, events: list) -> list[str]:
        """Applies a read's events to the write record; returns the finished changes."""
        changed: list[str] = []
        reshaped = False
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                log.warning(
                    "inotify queue overflowed under %s: events were lost; rescanning and "
                    "reloading (files still open for writing are asked of the kernel)",
                    self.root,
                )
                changed.append("inotify queue overflow")
                self.journal.lose()
                reshaped = True
                continue
            folder = self._folders.get(event.wd)
            if folder is None:
                continue  # a watch already dropped
            if event.mask & (flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF):
                reshaped = True  # a watched folder went away: its parent reports the change
                self.journal.lose()  # with every file in it, reported by no event of theirs
                if folder == self.root and not event.mask & flags.IGNORED:
                    changed.append(str(folder))
                continue
            path = folder / event.name if event.name else folder
            is_dir = bool(event.mask & flags.ISDIR)
            gone = bool(event.mask & _GONE)
            # The same entry named through the folder's real location: a file read through a
            # symlink is matched where the link leads.
            real = os.path.join(self._real_folders.get(event.wd, ""), event.name)
            if not self.filter(str(path), deleted=gone, is_dir=is_dir) and not (
                event.name and self.filter.reads(real)
            ):
                continue
            # As the watch spells it: a path outside the root (a file read through a symlink,
            # watched where it leads) makes the next reload walk the tree.
            self.journal.record(str(path))
            if event.mask & flags.MODIFY:
                self.writes.modified(str(path))  # not a change yet: it is being written
                continue
            if event.mask & (flags.CLOSE_WRITE | flags.MOVED_TO | _GONE):
                self.writes.finished(str(path))
            if event.mask & _RESHAPES and (
                is_dir or gone or event.name == KUBERNETES_DATA_LINK or path.is_dir()
            ):
                reshaped = True  # folders (or links to one) came or went: rewatch the tree
                if is_dir and gone:
                    self.journal.lose()  # a folder renamed away: its files left unreported
            changed.append(str(path))
        if reshaped and not self._sync():
            changed.append(f"{self.root} (cannot be watched)")
        return changed


def _describe(changed: list[str]) -> str:
    unique = sorted(set(changed))
    more = f" and {len(unique) - 1} more" if len(unique) > 1 else ""
    return f"changed: {unique[0]}{more}"
