"""What the watcher saw change since the loader last looked, so a reload need not walk the tree.

A reload of a 10,000-file set used to walk the policy directory and stat every file twice
(before reading, and after, to refuse a load torn by a deploy landing mid-read): ~0.2 s of a
one-file edit. The kernel already told the watcher which paths changed (inotify), so the
watcher records them here (`ChangeJournal.record`), and the backend re-stats only those
(see DirectoryBackend._fingerprint).

The journal is only trusted while it is *exact*: every change since the last `take` went
through a watch that was already in place when that `take` happened, and no event was lost.
It stops being exact (`lose`) when a watch is (re)established or dropped, the watched folders
change (a folder created, removed or renamed: new folders were not watched before), or the
kernel queue overflows; and for good (until `resume`) while a folder the loader reads has a
second name (a symlinked folder, a bind mount: a change is reported under one name only) or
cannot be watched (fs.inotify.max_user_watches reached, EACCES: its changes are not reported
at all). A `take` while it is not exact returns None: the backend walks the whole tree, as
before. The backend adds what only a stat shows (DirectoryBackend._fingerprint): while a file
it reads is a symlink, has more than one hard link (another name, in the tree or outside it,
that no watch here reports), or was reached through a symlinked folder, it walks too.

Ordering: the watcher reads the kernel queue and records a batch while holding `lock`, and
`settle` waits until the kernel holds no unread event for this watch. So after `settle`, every
change the kernel queued before it is in the journal: a `take` that follows it misses nothing
that happened before it, which is what the "changed during the load" check needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# How long a `take` waits for the watcher to record what the kernel has queued (it records a
# batch within milliseconds; a longer wait means the watch thread is stuck or gone).
SETTLE_TIMEOUT_SECONDS = 0.2
_SETTLE_POLL_SECONDS = 0.001


class ChangeJournal:
    """Absolute paths the watcher saw change (files closed after writing, renamed, deleted,
    modified, their metadata changed), since the last `take`; see the module docstring.

    Written by the watch thread (holding `lock` around each batch it reads and records), read
    by the reload thread.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._paths: set[str] = set()
        self._exact = False  # every change since the last take is in _paths
        self._live = False  # a watch is in place and records here
        self._unread: Callable[[], bool] | None = None  # the kernel holds unread events

    # --- the watch thread ------------------------------------------------------------------

    def attach(self, unread: Callable[[], bool], *, exact: bool) -> None:
        """A watch is in place from now on; `unread()` says whether its kernel queue holds
        events not read yet. Changes before this were not seen: the next `take` is None.
        `exact`: False when this watch cannot see every change by the name the loader uses
        (symlinked folders), so no `take` is trusted while it lasts."""
        with self.lock:
            self._paths.clear()
            self._exact = False
            self._live = exact
            self._unread = unread

    def detach(self) -> None:
        """The watch is gone: nothing is recorded until the next `attach`."""
        with self.lock:
            self._exact = self._live = False
            self._unread = None

    def lose(self, *, for_good: bool = False) -> None:
        """Changes may have been missed (queue overflow, folders watched anew or gone);
        `for_good`: and may be again while this watch lasts, until `resume` (a folder with a
        second name or without a watch)."""
        with self.lock:
            self._exact = False
            if for_good:
                self._live = False

    def resume(self) -> None:
        """What made `lose(for_good=True)` is gone (every folder watched again, by one name):
        the periods from the next `take` on are exact again, while this watch lasts."""
        with self.lock:
            if self._unread is not None:
                self._live = True

    def record(self, path: str) -> None:
        """`path` (absolute, as the watch spells it) changed."""
        with self.lock:
            self._paths.add(path)

    # --- the reload thread -----------------------------------------------------------------

    def settle(self, timeout: float = SETTLE_TIMEOUT_SECONDS) -> bool:
        """Waits (at most `timeout` seconds) until the watcher has recorded every event the
        kernel has queued; False when it did not in time or no watch is in place."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                unread = self._unread
                if unread is None:
                    return False
                if not unread():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_SETTLE_POLL_SECONDS)  # lets the watch thread read and record

    def take(self) -> frozenset[str] | None:
        """The paths changed since the last take, or None when that is not known exactly (the
        caller walks the tree). Starts the next period: exact from here while a watch is in
        place."""
        settled = self.settle()
        with self.lock:
            paths, exact = self._paths, self._exact and settled
            self._paths = set()
            self._exact = self._live
        return frozenset(paths) if exact else None
