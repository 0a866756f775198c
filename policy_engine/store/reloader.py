"""Background reloading: a watch thread notices changes, a reload thread applies them.

Two threads so that neither blocks the other: changes that arrive while a load is running
collapse into one more reload afterwards, and a slow load never delays noticing changes.
`request()` only sets an event, so it is safe to call from a signal handler (SIGHUP).
A reload deferred because a file is still being written (at startup too) is tried again
every DEFERRED_RETRY_SECONDS until it is not, and `stop()` ends that wait at once.
While watching, every `resync_seconds` the reload thread also walks the source and compares
it with what the last load read (PolicyStore.resync): a change inotify never reported (a
write through a hard link made later outside the tree, another machine's write on a network
file system) is then reloaded without a signal.
"""

from __future__ import annotations

import logging
import threading
import time

from policy_engine.store.store import PolicyStore, ReloadResult

log = logging.getLogger(__name__)

WATCH_RETRY_SECONDS = 1.0  # after the watcher itself failed unexpectedly
# While a reload waits for a writer: the watcher's close event usually comes first; this
# covers writers it cannot see (started before the server, no watch, lost events).
DEFERRED_RETRY_SECONDS = 0.25
# How often the source is compared with what the last load read, for changes the watcher is
# not told of (reload.resync_seconds; see PolicyStore.resync).
DEFAULT_RESYNC_SECONDS = 30.0


class PolicyReloader:
    """Reloads `store` when its backend reports a change (if `watch`) or on `request()`."""

    def __init__(
        self,
        store: PolicyStore,
        *,
        watch: bool = True,
        debounce_ms: int = 150,
        resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    ) -> None:
        """`resync_seconds`: how often, while `watch`, the reload thread compares the source
        with what the last load read (PolicyStore.resync) and reloads when it differs, for
        changes the watcher is not told of; 0: never."""
        self.store = store
        self.watch = watch
        self.debounce_ms = debounce_ms
        self.resync_seconds = resync_seconds if watch else 0.0
        self._pending = threading.Event()
        self._reason = ""
        self._full = False  # a full reload was asked for (SIGHUP) and has not run yet
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def watching(self) -> bool:
        """True while changes to the policy source are picked up without a signal."""
        return any(t.name == "pdp-policy-watch" and t.is_alive() for t in self._threads)

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("reloader already started")
        self._threads.append(
            threading.Thread(target=self._reload_loop, name="pdp-policy-reload", daemon=True)
        )
        if self.watch:
            self._threads.append(
                threading.Thread(target=self._watch_loop, name="pdp-policy-watch", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def request(self, reason: str = "requested", *, full: bool = False) -> None:
        """Ask for a reload soon; never blocks (safe in a signal handler). `full`: read every
        file anew (see PolicyStore.reload), as an operator's SIGHUP asks."""
        self._reason = reason
        self._full = self._full or full
        self._pending.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._pending.set()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s did not stop within %.0fs", thread.name, timeout)

    def _reload_loop(self) -> None:
        status = self.store.status()
        deferred = status.deferred  # the startup load waits for a writer
        if deferred:
            self._reason = self._reason or status.last_reason
        resync_at = time.monotonic() + self.resync_seconds
        while True:
            timeout = DEFERRED_RETRY_SECONDS if deferred else None
            if self.resync_seconds > 0 and not deferred:
                timeout = max(0.0, resync_at - time.monotonic())
            asked = self._pending.wait(timeout)
            if self._stop.is_set():
                return
            if not asked and not deferred:
                # The resync runs here, on the reload thread: never beside a load. While a
                # reload is deferred it is tried every DEFERRED_RETRY_SECONDS anyway.
                resync_at = time.monotonic() + self.resync_seconds
                differences = self.store.resync()
                if not differences:
                    continue
                self._reason = f"resync: {len(differences)} path(s) differ"
            self._pending.clear()  # before loading: a change during the load reloads again
            full, self._full = self._full, False
            result = self.store.reload(self._reason or "requested", full=full)
            deferred = result is ReloadResult.DEFERRED

    def _watch_loop(self) -> None:
        backend = self.store.backend
        log.info("watching %s for policy changes", backend.location)
        while not self._stop.is_set():
            try:
                for reason in backend.changes(self._stop, self.debounce_ms):
                    self.request(reason)
            except Exception:
                log.exception("watching %s failed; retrying", backend.location)
            self._stop.wait(WATCH_RETRY_SECONDS)  # only reached on failure or when stopping
