"""Background reloading: a watch thread notices changes, a reload thread applies them.

`PolicyReloader` is the policy store's lifecycle `Component` ("policy_store"): `start()` does
the first load (logging every issue of an invalid set; it never raises for the policies'
sake) and starts both threads; the store is ready once a valid set has loaded, and stays so
(a failed reload leaves the last good set serving); its status is DEGRADED, with the reason,
while the last reload failed or waits for a writer, or while the directory is not watched.

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

from policy_engine.lifecycle.component import ComponentStatus, State
from policy_engine.store.store import PolicyStore, ReloadResult, StoreStatus
from policy_engine.store.watch import WatchNotice

log = logging.getLogger(__name__)

WATCH_RETRY_SECONDS = 1.0  # after the watcher itself failed unexpectedly
# While a reload waits for a writer: the watcher's close event usually comes first; this
# covers writers it cannot see (started before the server, no watch, lost events).
DEFERRED_RETRY_SECONDS = 0.25
# How often the source is compared with what the last load read, for changes the watcher is
# not told of (reload.resync_seconds; see PolicyStore.resync).
DEFAULT_RESYNC_SECONDS = 30.0
STOP_SECONDS = 5.0  # `stop()` without a deadline


class PolicyReloader:
    """Reloads `store` when its backend reports a change (if `watch`) or on `request()`; the
    store's lifecycle component (see the module docstring)."""

    name = "policy_store"

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
        self._state = State.NEW
        # Why the source is not watched right now ("" while it is): told by the watcher.
        self._watch_problem = ""

    @property
    def watching(self) -> bool:
        """True while changes to the policy source are picked up without a signal: the
        watcher runs and has a watch in place."""
        return not self._watch_problem and any(
            t.name == "pdp-policy-watch" and t.is_alive() for t in self._threads
        )

    def start(self) -> None:
        """The first load, unless the store has tried one already (a set that fails to load
        leaves the store not ready, and the server answering deny), then the reload thread
        and, with `watch`, the watch thread. A second call does nothing."""
        if self._state is not State.NEW:
            return
        self._state = State.STARTING
        if not self.store.status().attempts:
            self.store.reload("startup")  # logs every issue when invalid; never raises
        self._threads.append(
            threading.Thread(target=self._reload_loop, name="pdp-policy-reload", daemon=True)
        )
        if self.watch:
            self._threads.append(
                threading.Thread(target=self._watch_loop, name="pdp-policy-watch", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        self._state = State.RUNNING

    def request(self, reason: str = "requested", *, full: bool = False) -> None:
        """Ask for a reload soon; never blocks (safe in a signal handler). `full`: read every
        file anew (see PolicyStore.reload), as an operator's SIGHUP asks."""
        self._reason = reason
        self._full = self._full or full
        self._pending.set()

    def stop(self, deadline: float | None = None) -> bool:
        """Stop both threads by `deadline` (`time.monotonic()` seconds; default STOP_SECONDS
        from now): a load in progress is finished, none is started. False when a thread
        was still running at the deadline (a load longer than that, logged)."""
        if deadline is None:
            deadline = time.monotonic() + STOP_SECONDS
        if self._state is not State.NEW:
            self._state = State.STOPPING
        self._stop.set()
        self._pending.set()
        clean = True
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                log.warning("%s did not stop by its deadline", thread.name)
                clean = False
        self._state = State.STOPPED
        return clean

    def status(self) -> ComponentStatus:
        """Ready while a valid set is loaded (from the first valid load on: a failed reload
        keeps the last good set serving); DEGRADED naming what is wrong. Never blocks."""
        state = self._state
        store = self.store.status()
        if state is not State.RUNNING:
            return ComponentStatus(self.name, state, False, _serving(store))
        problems = _reload_problems(store)
        if self.watch:
            if self._watch_problem:
                problems.append(f"not watching: {self._watch_problem}")
            elif not any(t.name == "pdp-policy-watch" and t.is_alive() for t in self._threads):
                problems.append("not watching: the watcher has stopped (SIGHUP reloads)")
        if not any(t.name == "pdp-policy-reload" and t.is_alive() for t in self._threads):
            problems.append("the reload thread has stopped: no change is loaded")
        detail = "; ".join([_serving(store), *problems])
        return ComponentStatus(
            self.name, State.DEGRADED if problems else State.RUNNING, store.serving, detail
        )

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
                    if isinstance(reason, WatchNotice):
                        self._watch_problem = reason.problem
                    self.request(reason)
            except Exception as exc:
                self._watch_problem = f"the watcher failed ({exc!r}); retrying"
                log.exception("watching %s failed; retrying", backend.location)
            self._stop.wait(WATCH_RETRY_SECONDS)  # only reached on failure or when stopping


def _serving(store: StoreStatus) -> str:
    if not store.serving:
        return "no valid policy set loaded: every Check is denied"
    return f"serving revision {store.revision} ({len(store.organizations)} organization(s))"


def _reload_problems(store: StoreStatus) -> list[str]:
    """The last reload's trouble, on one line: its first issue and how many more."""
    if store.last_result not in (ReloadResult.FAILED, ReloadResult.DEFERRED):
        return []
    lines = store.last_error.splitlines() or ["no detail"]
    more = f" (and {len(lines) - 1} more issue(s))" if len(lines) > 1 else ""
    if store.deferred:
        return [lines[0] + more]
    return [f"last reload ({store.last_reason}) failed: {lines[0]}{more}"]
