"""JSON-lines file sink with size-based rotation.

The live file is `path`; a full file is renamed to `path.<UTC time>` (for example
`audit.jsonl.20261123T101500.123456Z`), so the shell's sorted glob `audit.jsonl.*` lists the
rotated files oldest first and `pdp audit verify audit.jsonl.* audit.jsonl` checks them all in
order. Only the newest `keep` rotated files are kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from policy_engine.audit.chain import Sealed
from policy_engine.audit.sinks.base import OpenState, Sink, parse_record

_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z(?:-\d+)?")
_TAIL_CHUNK = 64 * 1024


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of `path`, oldest first."""
    prefix = path.name + "."
    try:
        names = [
            n
            for n in os.listdir(path.parent)
            if n.startswith(prefix) and _STAMP.fullmatch(n[len(prefix) :])
        ]
    except FileNotFoundError:
        return []
    return [path.parent / n for n in sorted(names, key=lambda n: _stamp_key(n[len(prefix) :]))]


def _stamp_key(stamp: str) -> tuple[str, int]:
    base, _, counter = stamp.partition("-")
    return base, int(counter or 0)


def last_record(path: Path) -> dict[str, Any] | None:
    """The last complete, parseable record of a file (reads backwards from its end)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError:
        return None
    with handle:
        end = handle.seek(0, os.SEEK_END)
        buffer = b""
        position = end
        while position > 0:
            step = min(_TAIL_CHUNK, position)
            position -= step
            handle.seek(position)
            buffer = handle.read(step) + buffer
            lines = buffer.split(b"\n")
            # The first piece may be a partial line unless we reached the file's start.
            candidates = lines if position == 0 else lines[1:]
            for line in reversed(candidates):
                if line.strip():
                    record = parse_record(line)
                    if record is not None and "hash" in record:
                        return record
            buffer = lines[0] if position > 0 else b""
    return None


class FileSink(Sink):
    """Appends whole lines with one write per batch; a failed write is truncated away."""

    name = "file"

    def __init__(
        self, path: Path, *, max_bytes: int = 0, keep: int = 10, fsync: bool = False
    ) -> None:
        self.path = Path(path)
        self.rotate_at = max(int(max_bytes), 0)
        self.keep = max(int(keep), 0)
        self.fsync = fsync
        self._handle: BinaryIO | None = None
        self._size = 0

    def open(self) -> OpenState:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        previous = last_record(self.path)
        if previous is None:
            # The live file may be gone (a crash right after a rotation): link to the newest
            # rotated file instead.
            rotated = rotated_files(self.path)
            if rotated:
                previous = last_record(rotated[-1])
        self._open_live()
        return OpenState(previous, self._size)

    def _open_live(self) -> None:
        handle = open(self.path, "ab")  # noqa: SIM115 (kept open until close/rotate)
        size = handle.seek(0, os.SEEK_END)
        if size:
            with open(self.path, "rb") as reader:
                reader.seek(size - 1)
                if reader.read(1) != b"\n":
                    # A torn last line (crash mid-write): never glue the next record onto it.
                    handle.write(b"\n")
                    handle.flush()
                    size += 1
        self._handle = handle
        self._size = size

    def write(self, records: Sequence[Sealed]) -> None:
        handle = self._handle
        if handle is None:
            self._open_live()
            handle = self._handle
            assert handle is not None
        data = "".join(f"{r.line}\n" for r in records).encode("utf-8")
        start = self._size
        try:
            handle.write(data)
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        except OSError:
            self._undo(start)
            raise
        self._size = start + len(data)

    def _undo(self, size: int) -> None:
        """Cut a partly written batch so the retry does not duplicate or tear lines."""
        with contextlib.suppress(OSError):
            if self._handle is not None:
                self._handle.close()
        self._handle = None
        with contextlib.suppress(OSError):
            os.truncate(self.path, size)

    def rotate(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.path.exists():
            stamp = datetime.fromtimestamp(time.time(), UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            target = self.path.with_name(f"{self.path.name}.{stamp}")
            counter = 0
            while target.exists():
                counter += 1
                target = self.path.with_name(f"{self.path.name}.{stamp}-{counter}")
            os.rename(self.path, target)
            self._prune()
        self._open_live()

    def _prune(self) -> None:
        rotated = rotated_files(self.path)
        for old in rotated[: max(len(rotated) - self.keep, 0)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.flush()
                if self.fsync:
                    os.fsync(self._handle.fileno())
            finally:
                self._handle.close()
                self._handle = None
