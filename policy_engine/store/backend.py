"""Where policy sets come from: the storage backend interface and the directory backend.

The store only needs two things from a backend: load the whole set (all or nothing), and
tell it when the set may have changed. Keeping that behind `PolicyBackend` lets another
backend (a bundle server, object storage, git) come later without touching the store,
the reload thread or the server.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from watchfiles import Change, watch

from policy_engine.auth.keys import RemoteKeySets
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.policy.bundle import BUNDLE_FILE
from policy_engine.policy.loader import POLICY_SUFFIXES, policy_files

log = logging.getLogger(__name__)
# watchfiles logs every batch at INFO; the store logs what each change did instead.
if logging.getLogger("watchfiles").level == logging.NOTSET:
    logging.getLogger("watchfiles").setLevel(logging.WARNING)

# How often the watcher checks that the directory it watches is still the configured one
# (deleted, recreated, replaced by a rename or a symlink swap: inotify reports none of these
# on the old watch). Also the longest wait before a newly (re)established watch is trusted.
IDENTITY_CHECK_MS = 500
MISSING_POLL_SECONDS = 0.2  # while the directory is gone, how often to look for it again
WATCH_STEP_MS = 50  # quiet time that ends a burst of changes (bounded by the debounce)
STABLE_LOAD_ATTEMPTS = 5  # loads retried while files keep changing underneath
STABLE_LOAD_PAUSE_SECONDS = 0.05

# Kubernetes ConfigMap/Secret volumes publish a new version by renaming the hidden
# `..data` symlink; that rename is the one hidden change that matters.
KUBERNETES_DATA_LINK = "..data"
_EDITOR_TEMPORARY = re.compile(
    r"(~|\.sw[a-p]|\.tmp|\.temp|\.bak|\.orig|\.part|\.crdownload|___jb_\w+___)$|^4913$|^#.*#$"
)


class SourceChangedDuringLoad(Exception):
    """The files changed while being read: the result may mix two versions, so it is dropped."""


class PolicyBackend(Protocol):
    """A source of whole policy sets."""

    @property
    def location(self) -> str:
        """Where the policies come from, for logs and the status RPC."""
        ...

    def load(self) -> CompiledPolicySet:
        """The whole compiled set; raises PolicyLoadError (with file:line issues) when invalid,
        SourceChangedDuringLoad when it could not get a consistent snapshot."""
        ...

    def changes(self, stop: threading.Event, debounce_ms: int) -> Iterator[str]:
        """Blocks, yielding a short description each time the set may have changed, until
        `stop` is set. Spurious yields are fine: reloading an unchanged set is a no-op."""
        ...


_Identity = tuple[int, int]
_Fingerprint = tuple[tuple[str, int, int, int], ...]


def _identity(path: Path) -> _Identity | None:
    """Which directory `path` is right now (following symlinks), or None when it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class PolicyChangeFilter:
    """Passes changes that can alter the policy set: *.yaml/*.yml files and directories.

    Hidden paths and editor temporaries are dropped (the loader ignores them too), except
    Kubernetes' `..data` link swap. A deleted path cannot be asked whether it was a folder,
    so deletions pass unless they look like temporaries; an extra reload is only a no-op.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))

    def __call__(self, change: Change, path: str) -> bool:
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
        if _EDITOR_TEMPORARY.search(name):
            return False
        if candidate.suffix in POLICY_SUFFIXES or name == BUNDLE_FILE:
            return True
        if change is Change.deleted:
            return True
        return candidate.is_dir()


class DirectoryBackend:
    """Policies as files in a directory, one folder per organization (see the loader).

    `load` reads a consistent snapshot: it fingerprints the files (path, size, mtime, inode)
    before and after loading and refuses the result if they differ, so a deploy that lands
    mid-read is never half-applied. `changes` watches the tree with watchfiles (inotify).
    """

    def __init__(self, directory: Path, *, bundle_public_key: bytes | None = None) -> None:
        self.directory = Path(directory)
        self.bundle_public_key = bundle_public_key
        self._remote_keys = RemoteKeySets()  # JWKS URLs' keys survive reloads

    @property
    def location(self) -> str:
        return str(self.directory)

    def load(self) -> CompiledPolicySet:
        before = self._fingerprint()
        policies = load_policy_set(
            self.directory,
            bundle_public_key=self.bundle_public_key,
            remote_keys=self._remote_keys,
        )
        if self._fingerprint() != before:
            raise SourceChangedDuringLoad(f"{self.directory} changed while it was being loaded")
        return policies

    def _fingerprint(self) -> tuple[_Identity | None, _Fingerprint]:
        entries = []
        for path in policy_files(self.directory):
            try:
                st = path.stat()
            except OSError:
                entries.append((str(path), -1, -1, -1))
                continue
            entries.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        return _identity(self.directory), tuple(entries)

    def changes(self, stop: threading.Event, debounce_ms: int) -> Iterator[str]:
        """Survives the directory being deleted, recreated or swapped (rename, symlink).

        inotify watches an inode: once the directory is deleted or replaced, the old watch
        goes quiet rather than failing. So every IDENTITY_CHECK_MS the watcher checks which
        directory the path names, waits for it to come back when it is gone, and re-watches
        when it is a different one. Each new watch yields once when established, covering
        changes made before it was in place.
        """
        root = self.directory
        watch_filter = PolicyChangeFilter(root)
        reported_missing = False
        while not stop.is_set():
            identity = _identity(root)
            if identity is None:
                if not reported_missing:
                    reported_missing = True
                    yield f"{root} is missing"
                stop.wait(MISSING_POLL_SECONDS)
                continue
            if reported_missing:
                reported_missing = False
                yield f"{root} is back"
            established = False
            try:
                for batch in watch(
                    root,
                    watch_filter=watch_filter,
                    debounce=max(debounce_ms, 1),
                    step=min(WATCH_STEP_MS, max(debounce_ms, 1)),
                    stop_event=stop,
                    rust_timeout=IDENTITY_CHECK_MS,
                    yield_on_timeout=True,
                    raise_interrupt=False,
                    ignore_permission_denied=True,
                ):
                    if batch:
                        yield _describe(batch)
                    elif not established:
                        yield f"watching {root}"
                    established = True
                    now = _identity(root)
                    if now != identity:
                        if now is None:
                            reported_missing = bool(batch)
                        else:
                            yield f"{root} was replaced"
                        break
            except (OSError, RuntimeError) as exc:  # vanished between the check and the watch
                log.warning("cannot watch %s (%s); retrying", root, exc)
                stop.wait(MISSING_POLL_SECONDS)


def _describe(batch: set[tuple[Change, str]]) -> str:
    first = sorted(path for _, path in batch)[0]
    more = f" and {len(batch) - 1} more" if len(batch) > 1 else ""
    return f"changed: {first}{more}"
