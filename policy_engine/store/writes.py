"""Knowing when a policy file is still being written, so that it is never read half-done.

Two sources, either one enough to hold a reload back:

* the watcher's record (`WriteTracker`): a file that inotify reported modified (IN_MODIFY) and
  not yet closed after writing (IN_CLOSE_WRITE), renamed or deleted is being written;
* the kernel itself (`open_for_writing`): a file that some process holds open for writing.
  This also covers what the watcher cannot have seen: a write that began before the server
  started or before the watch was in place, or events lost to an inotify queue overflow.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import threading
import time
from pathlib import Path

# A lease break would signal us (SIGIO by default, whose default action ends the process).
# SIGURG's default action is to ignore it, so a writer opening the file during the few
# microseconds a probe holds its lease costs nothing.
_LEASE_BREAK_SIGNAL = signal.SIGURG


def open_for_writing(path: Path) -> bool | None:
    """Whether any process holds `path` open for writing right now: True, False, or None when
    the kernel cannot tell us (not a regular file, gone, not ours to lease, or a file system
    without leases).

    Uses a read lease (fcntl(2) F_SETLEASE with F_RDLCK), which the kernel refuses with EAGAIN
    while the file is open for writing anywhere, taken and released at once. Taking one needs
    the caller to own the file or hold CAP_LEASE, and fs.leases-enable (the default) set.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_BREAK_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    finally:
        os.close(fd)  # closing the descriptor releases the lease
    return False


class WriteTracker:
    """Files the watcher saw modified and not yet finished (closed after writing, renamed over
    or deleted), with when each was first seen modified (time.monotonic() seconds).

    Written by the watch thread, read by the reload thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}

    def modified(self, path: str) -> None:
        with self._lock:
            self._since.setdefault(path, time.monotonic())

    def finished(self, path: str) -> None:
        """The write to `path` ended; for a folder, every write below it is forgotten too."""
        prefix = path.rstrip(os.sep) + os.sep
        with self._lock:
            self._since.pop(path, None)
            for other in [p for p in self._since if p.startswith(prefix)]:
                del self._since[other]

    def pending(self) -> dict[str, float]:
        """path -> monotonic time it was first seen modified, for every unfinished write."""
        with self._lock:
            return dict(self._since)
