"""Where the loader's bytes come from: the directory itself, or one verified in-memory snapshot.

The loader never opens a file itself. It asks a `PolicySource` for the policy files' names and
for each file's bytes (policy files, and the JWKS files organizations reference):
- `DirectorySource` reads the directory as it is, each file once, bounded;
- `SnapshotSource` serves bytes read earlier, once, e.g. the files whose hashes a signed
  bundle's manifest was checked against (policy_engine.policy.bundle). It never touches the
  disk again, so nothing swapped in after the check can be loaded.

Both enforce PolicyLimits before a byte is parsed: a file larger than `max_file_bytes` is not
read past that size, and the set stops being read once it exceeds `max_set_bytes`.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from policy_engine.config import PolicyLimits
from policy_engine.errors import PolicyEngineError

POLICY_SUFFIXES = (".yaml", ".yml")
# Policy test suites (`pdp test`, policy_engine.testing) live beside the policies: the loader
# never reads them, so editing one changes no policy set, yet a bundle signs them.
SUITE_SUFFIXES = (".test.yaml", ".test.yml")
BUNDLE_FILE = "policy-bundle.jws"
# Kubernetes ConfigMap/Secret volumes keep their versions in root-level `..<timestamp>`
# folders behind a `..data` symlink; the published names link through them.
KUBERNETES_PREFIX = ".."
_READ_CHUNK = 64 * 1024


class SourceError(PolicyEngineError):
    """A file cannot be used: unreadable, not a regular file, too large, or not in the
    snapshot. The message says which and why; `set_too_large` stops reading the set."""

    def __init__(self, message: str, *, set_too_large: bool = False) -> None:
        super().__init__(message)
        self.set_too_large = set_too_large


@dataclass(frozen=True, slots=True)
class SourceFile:
    data: bytes
    real_path: str  # where the bytes were read, symlinks resolved


def is_policy_file(relative: str) -> bool:
    """A `*.yaml`/`*.yml` path (relative, `/`-separated) with no hidden part, and no test
    suite (`*.test.yaml`/`*.test.yml`)."""
    parts = relative.split("/")
    return (
        relative.endswith(POLICY_SUFFIXES)
        and not relative.endswith(SUITE_SUFFIXES)
        and not any(p.startswith(".") for p in parts)
    )


def is_suite_file(name: str) -> bool:
    """A test suite's name (`*.test.yaml`/`*.test.yml`): never a policy file."""
    return name.endswith(SUITE_SUFFIXES)


def policy_files(directory: Path) -> list[Path]:
    """Every `*.yaml`/`*.yml` path below `directory` but test suites, regular file or not (the
    loader says which cannot be read). Hidden files and folders are skipped; symlinked
    folders are followed, as Kubernetes volumes use them, and a symlink cycle is walked once."""
    return [directory / name for name in policy_names(directory)]


def policy_names(directory: Path) -> list[str]:
    """The files policy_files lists, as relative `/`-separated paths in the same order (sorted
    as Paths sort: by their parts). Cheaper than Paths for a large tree."""
    found: list[str] = []
    seen: set[str] = set()
    top = os.fspath(directory)
    for folder, subfolders, names in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink cycle
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = os.path.relpath(folder, top)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        found.extend(
            prefix + name
            for name in names
            if not name.startswith(".")
            and name.endswith(POLICY_SUFFIXES)
            and not name.endswith(SUITE_SUFFIXES)
        )
    # Paths sort by their lists of parts; with "/" made "\0", which sorts before any
    # character a name can hold, the strings sort exactly so (and faster than lists).
    found.sort(key=_parts_order)
    return found


def _parts_order(relative: str) -> str:
    return relative.replace("/", "\0")


def tree_files(directory: Path) -> list[str]:
    """Every file the loader could be asked to read below `directory`, as sorted relative
    `/`-separated paths: hidden files and folders included (a JWKS may live in `.keys/`), links
    followed (a cycle walked once), anything that is not a folder listed (a FIFO or a dangling
    link too). Left out: the bundle signature itself and Kubernetes' root-level `..*` entries,
    whose files are reached through the published names."""
    found: list[str] = []
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        relative_folder = Path(folder).relative_to(directory).as_posix()
        at_root = relative_folder == "."
        if at_root:
            subfolders[:] = [n for n in subfolders if not n.startswith(KUBERNETES_PREFIX)]
        subfolders.sort()
        for name in names:
            if at_root and (name == BUNDLE_FILE or name.startswith(KUBERNETES_PREFIX)):
                continue
            found.append(name if at_root else f"{relative_folder}/{name}")
    return sorted(found)


def read_bounded(
    path: Path | str, max_bytes: int, real_folders: dict[str, str] | None = None
) -> SourceFile:
    """The bytes of the regular file at `path` (symlinks followed), reading at most
    `max_bytes + 1` of them. Raises SourceError when it is not a regular file (a FIFO would
    block, a device never end), cannot be read, or is larger than `max_bytes`.

    `real_folders` (folder as written -> os.path.realpath of it) lets many reads share the
    resolution of their folder: the caller's, for the duration of one load (a folder link
    swapped after its first read is seen by the next load). The real path is then the real
    folder joined with the file's name, opened with O_NOFOLLOW: it is exactly what
    os.path.realpath returns, since the name is no link (or the open fails and the path is
    resolved in full, as without `real_folders`)."""
    opened = (
        _open_in_real_folder(os.fspath(path), real_folders) if real_folders is not None else None
    )
    if opened is not None:
        fd, real_path = opened
    else:
        real_path = os.path.realpath(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; no effect on regular files.
            fd = os.open(real_path, _OPEN_FLAGS)
        except OSError as exc:
            raise SourceError(f"cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SourceError(f"cannot read: {os.strerror(errno.EINVAL)}: not a regular file")
        if info.st_size > max_bytes:
            raise _too_large(info.st_size, max_bytes)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # it grew after the fstat
            raise _too_large(size, max_bytes)
        return SourceFile(b"".join(chunks), real_path)
    except OSError as exc:
        raise SourceError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _open_in_real_folder(path: str, real_folders: dict[str, str]) -> tuple[int, str] | None:
    """(open descriptor, real path) for `path` when its last part is no symlink, its folder
    resolved once per `real_folders`; None when that cannot be shown (a link, a missing file,
    any error): the caller then resolves and opens the whole path, as it always did."""
    folder, name = os.path.split(path)
    if not _NO_FOLLOW or name in ("", ".", ".."):
        return None
    real_folder = real_folders.get(folder)
    if real_folder is None:
        real_folder = real_folders[folder] = os.path.realpath(folder)
    real_path = os.path.join(real_folder, name)
    try:
        return os.open(real_path, _OPEN_FLAGS | _NO_FOLLOW), real_path
    except OSError:  # ELOOP for a symlink; any other error is reported by the full path
        return None


def _too_large(size: int, max_bytes: int) -> SourceError:
    return SourceError(
        f"file is {size} bytes or more, over policy_limits.max_file_bytes ({max_bytes}); "
        "it was not parsed"
    )


def within(real_path: str, real_folder: str) -> bool:
    return real_path == real_folder or real_path.startswith(real_folder.rstrip("/") + "/")


def join_inside(folder: str, relative: str) -> str | None:
    """`folder/relative` normalised, or None when `relative` is absolute or `..` leaves the
    folder: a lexical check, before any symlink is followed."""
    if relative.startswith("/") or "\\" in relative or "\0" in relative:
        return None
    joined = posixpath.normpath(posixpath.join(folder, relative))
    return joined if joined.startswith(folder + "/") else None


class PolicySource(Protocol):
    """Bytes for the loader; every read is bounded by the source's PolicyLimits."""

    @property
    def directory(self) -> Path: ...

    def policy_paths(self) -> list[str]:
        """Relative `/`-separated paths of the policy files, sorted."""
        ...

    def read(self, relative: str) -> SourceFile:
        """The bytes of one file; raises SourceError."""
        ...

    def real_folder(self, relative: str) -> str:
        """Where the folder `relative` really is (symlinks resolved), to check that a file
        read through it stays inside it."""
        ...


class _Budget:
    """Counts the bytes a load reads; past `max_set_bytes` every further read is refused."""

    def __init__(self, limits: PolicyLimits) -> None:
        self.limits = limits
        self.total = 0

    def spend(self, size: int) -> None:
        self.total += size
        if self.total > self.limits.max_set_bytes:
            raise SourceError(
                f"the policy set is {self.total} bytes or more, over "
                f"policy_limits.max_set_bytes ({self.limits.max_set_bytes}); nothing was parsed",
                set_too_large=True,
            )


class DirectorySource:
    """The directory as it is now: each file read once, when the loader asks for it.

    `paths`: the policy files as the caller just listed them (policy_names), so the
    directory is not walked again; by default it is walked when the loader asks."""

    def __init__(
        self,
        directory: Path,
        limits: PolicyLimits | None = None,
        paths: Sequence[str] | None = None,
    ) -> None:
        self._directory = Path(directory)
        self._limits = limits or PolicyLimits()
        self._budget = _Budget(self._limits)
        self._paths = list(paths) if paths is not None else None
        # Folder -> its real path, resolved once per folder for this source's reads: a
        # DirectorySource serves one load (see read_bounded).
        self._real_folders: dict[str, str] = {}
        self._top = os.fspath(self._directory)

    @property
    def directory(self) -> Path:
        return self._directory

    def policy_paths(self) -> list[str]:
        return list(self._paths) if self._paths is not None else policy_names(self._directory)

    def read(self, relative: str) -> SourceFile:
        file = read_bounded(
            os.path.join(self._top, relative), self._limits.max_file_bytes, self._real_folders
        )
        self._budget.spend(len(file.data))
        return file

    def charge(self, size: int) -> None:
        """Counts `size` bytes of a file not read again (its content is known unchanged)
        against max_set_bytes, as reading it would; raises SourceError past it."""
        self._budget.spend(size)

    def real_folder(self, relative: str) -> str:
        return os.path.realpath(self._directory / relative)


class SnapshotSource:
    """Files read earlier, once: the loader gets exactly these bytes and nothing else.

    `files` maps relative paths to what was read; `real_folders` maps each top-level folder
    to where it really was when they were read (see PolicySource.real_folder).
    """

    def __init__(
        self,
        directory: Path,
        files: Mapping[str, SourceFile],
        real_folders: Mapping[str, str],
        *,
        missing: str = "is not in the snapshot",
        signed_at: datetime | None = None,
    ) -> None:
        self._directory = Path(directory)
        self.files = dict(files)
        self._real_folders = dict(real_folders)
        self._missing = missing
        self.signed_at = signed_at  # a signed bundle's signing time

    @property
    def directory(self) -> Path:
        return self._directory

    def policy_paths(self) -> list[str]:
        return sorted(name for name in self.files if is_policy_file(name))

    def read(self, relative: str) -> SourceFile:
        file = self.files.get(relative)
        if file is None:
            raise SourceError(f"{relative} {self._missing}")
        return file

    def real_folder(self, relative: str) -> str:
        return self._real_folders.get(relative, "")


def read_snapshot(
    directory: Path, names: list[str], limits: PolicyLimits | None = None
) -> tuple[dict[str, SourceFile], dict[str, str], list[str]]:
    """Reads `names` (relative paths below `directory`) once each, bounded by `limits`.

    Returns the files read, the real location of every top-level folder, and one problem per
    file that could not be read (`name: why`); stops at the first file past max_set_bytes.
    """
    limits = limits or PolicyLimits()
    budget = _Budget(limits)
    files: dict[str, SourceFile] = {}
    problems: list[str] = []
    real_parents: dict[str, str] = {}  # see read_bounded
    top = os.fspath(directory)
    for name in names:
        try:
            file = read_bounded(os.path.join(top, name), limits.max_file_bytes, real_parents)
            budget.spend(len(file.data))
        except SourceError as exc:
            problems.append(f"{name}: {exc}")
            if exc.set_too_large:
                break
            continue
        files[name] = file
    tops = {name.split("/", 1)[0] for name in names if "/" in name}
    real_folders = {top: os.path.realpath(directory / top) for top in sorted(tops)}
    return files, real_folders, problems
