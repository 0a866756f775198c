"""The policy store: the one compiled policy set the server decides with, and its history.

Requests read `current()` once and decide everything with that set, so each request (and
each batch) sees exactly one revision. `reload()` builds a complete new set away from the
request path and publishes it with a single reference assignment, and only when it loaded
without a single issue: a broken change never half-applies, and the last good set keeps
serving while the error is logged with file:line and shown in `status()`.

An emptied or deleted policy directory is treated as a broken change, not as "no policies":
the last good set keeps serving and the status reports the error. An empty directory is far
more often a botched deploy or an unmounted volume than an intent; an operator who wants to
deny everything writes that as policy (every layer defaults to deny).
"""

from __future__ import annotations

import enum
import functools
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from policy_engine import metrics
from policy_engine.errors import PolicyEngineError
from policy_engine.memory import release_free_memory
from policy_engine.policy import CompiledPolicySet, PolicyLoadError
from policy_engine.store.backend import (
    STABLE_LOAD_ATTEMPTS,
    STABLE_LOAD_PAUSE_SECONDS,
    FilesBeingWritten,
    PolicyBackend,
    SourceChangedDuringLoad,
)

log = logging.getLogger(__name__)

MAX_REPORTED_ISSUES = 100  # a status or log entry lists at most this many issues
# From this many rules on, the first set loaded is frozen out of the garbage collector's full
# collections (see _freeze_first_set); below it a full collection is cheap anyway.
FREEZE_MIN_RULES = 5_000
# A reload that has waited this long for a file's writer to close it is logged as a warning.
LONG_WRITE_WARNING_SECONDS = 10.0
RESYNC_SHOWN_PATHS = 5  # a resync's log line names at most this many differing paths

Clock = Callable[[], datetime]
Listener = Callable[[CompiledPolicySet], None]


def utc_now() -> datetime:
    return datetime.now(UTC)


class NoPolicyLoaded(PolicyEngineError, RuntimeError):
    """No valid policy set has loaded yet: the server must deny (kontext_server_error)."""


class ReloadResult(enum.Enum):
    LOADED = "loaded"  # a new revision is now serving
    UNCHANGED = "unchanged"  # valid, and the same revision as the one serving: nothing swapped
    FAILED = "failed"  # invalid or unreadable: the previous set (if any) keeps serving
    # A file is still being written: nothing was read, the previous set (if any) keeps
    # serving, and the reloader tries again until the writer has closed it.
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """What operators need to know about the store; replaced whole, never mutated."""

    source: str
    revision: str = ""  # the serving revision; empty until a valid set has loaded
    loaded_at: datetime | None = None  # when the serving revision was swapped in
    organizations: tuple[str, ...] = ()
    file_count: int = 0
    last_attempt_at: datetime | None = None
    last_result: ReloadResult | None = None
    last_error: str = ""  # every issue of the last failed attempt, one "file:line: ..." a line
    last_reason: str = ""  # what triggered the last attempt (startup, a file change, SIGHUP)
    attempts: int = 0

    @property
    def serving(self) -> bool:
        return bool(self.revision)

    @property
    def last_ok(self) -> bool:
        """The last attempt ended with the directory's current content serving."""
        return self.last_result in (ReloadResult.LOADED, ReloadResult.UNCHANGED)

    @property
    def deferred(self) -> bool:
        """The last attempt waits for a file's writer to close it (see ReloadResult)."""
        return self.last_result is ReloadResult.DEFERRED


class PolicyStore:
    """Holds the serving CompiledPolicySet behind a single, atomically replaced reference."""

    def __init__(self, backend: PolicyBackend, *, clock: Clock = utc_now) -> None:
        self.backend = backend
        self._clock = clock
        self._policies: CompiledPolicySet | None = None
        self._status = StoreStatus(source=backend.location)
        self._reload_lock = threading.Lock()  # one load at a time; readers never take it
        self._listeners: list[Listener] = []
        self._deferred_since: float | None = None  # time.monotonic() of the first deferral
        self._deferral_warned = False

    # --- the request path ----------------------------------------------------------------------

    def current(self) -> CompiledPolicySet:
        """The serving set; read it once per request. Raises NoPolicyLoaded before the first
        valid load, which the servicer answers with a kontext_server_error deny."""
        policies = self._policies
        if policies is None:
            raise NoPolicyLoaded(
                f"no valid policy set has loaded from {self.backend.location} yet; denying"
            )
        return policies

    def peek(self) -> CompiledPolicySet | None:
        return self._policies

    def status(self) -> StoreStatus:
        return self._status

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(new_set)` after each swap (on the reloading thread)."""
        self._listeners.append(listener)

    # --- reloading (never on the request path) -------------------------------------------------

    def reload(self, reason: str = "requested", *, full: bool = False) -> ReloadResult:
        """Load and compile the whole set; swap it in only if it is valid and new.

        Blocks for the duration of one load, so call it from a background thread (the
        reloader) or at startup. Never raises: failures are logged, counted and kept in
        the status, and the previous set keeps serving. DEFERRED when a file is still being
        written: nothing is read, and the caller tries again later (the reloader does).
        `full` asks the backend to read every file anew, trusting no shortcut (SIGHUP).
        """
        with self._reload_lock:
            attempt_at = self._clock()
            started = time.perf_counter()
            policies: CompiledPolicySet | None = None
            error = ""
            try:
                policies = self._load_consistent(full)
            except FilesBeingWritten as exc:
                return self._deferred(attempt_at, reason, exc)
            except PolicyLoadError as exc:
                error = format_issues(exc)
            except SourceChangedDuringLoad as exc:
                error = f"{exc}; waiting for the next change"
            except Exception as exc:  # a loader bug must not kill the reload thread
                log.exception("loading policies from %s failed unexpectedly", self.backend.location)
                error = f"{self.backend.location}:0: internal error while loading: {exc!r}"
            elapsed = time.perf_counter() - started
            metrics.RELOAD_DURATION.observe(elapsed)
            self._deferred_since = None
            if policies is None:
                result = self._failed(attempt_at, reason, error)
            else:
                result = self._succeeded(policies, attempt_at, reason, elapsed)
                del policies  # unchanged: this copy goes now, before the memory is handed back
            # The load's transient objects (and a replaced set) are freed by now; without
            # this, malloc keeps their pages and RSS stays at the load's peak (10-15 MB more at
            # 10,000 user policies; see policy_engine.memory). Costs ~1-8 ms, without the GIL.
            release_free_memory()
            return result

    def resync(self) -> list[str]:
        """Asks the backend whether its source differs from what the last load read, for
        changes its watcher was not told of (see DirectoryBackend.resync); returns what
        differs (empty: nothing to reload), logged at info with a count and the first few
        paths (at debug when only files changed within a clock tick of the last load differ,
        which a reload reads again, as the load's own racy check would).

        Takes the reload lock, so it never overlaps a load (its walk would race the load's
        own looks); never on the request path, which takes no lock. Never raises."""
        with self._reload_lock:
            started = time.perf_counter()
            try:
                differences, aliased = self.backend.resync()
            except Exception:  # a bug here must not kill the reload thread
                log.exception("resync of %s failed", self.backend.location)
                return []
            elapsed_ms = (time.perf_counter() - started) * 1000
        if not differences:
            log.debug(
                "resync of %s: nothing differs (%.0f ms)%s",
                self.backend.location,
                elapsed_ms,
                "; a file has a second name, so reloads walk" if aliased else "",
            )
            return []
        level = logging.DEBUG if all(d.startswith("~") for d in differences) else logging.INFO
        shown = ", ".join(differences[:RESYNC_SHOWN_PATHS])
        more = len(differences) - RESYNC_SHOWN_PATHS
        log.log(
            level,
            "resync of %s: %d path(s) differ from what the last load read, unreported by "
            "the watcher (+ listed now, - gone, ~ changed within a clock tick of that "
            "load): %s%s; reloading",
            self.backend.location,
            len(differences),
            shown,
            f" and {more} more" if more > 0 else "",
        )
        return differences

    def _load_consistent(self, full: bool) -> CompiledPolicySet:
        """Retry briefly while files change under the loader; a deploy usually lands fast."""
        load = functools.partial(self.backend.load, full=True) if full else self.backend.load
        for _ in range(STABLE_LOAD_ATTEMPTS - 1):
            try:
                return load()
            except SourceChangedDuringLoad:
                time.sleep(STABLE_LOAD_PAUSE_SECONDS)
        return load()

    def _deferred(self, attempt_at: datetime, reason: str, exc: FilesBeingWritten) -> ReloadResult:
        previous = self._status
        serving = (
            f"still serving revision {previous.revision}"
            if previous.serving
            else "no valid policy set yet, answering deny"
        )
        error = f"reload deferred: {exc}; {serving} until the writer closes it"
        self._status = replace(
            previous,
            last_attempt_at=attempt_at,
            last_result=ReloadResult.DEFERRED,
            last_error=error,
            last_reason=reason,
            attempts=previous.attempts + 1,
        )
        metrics.RELOADS.labels(result="deferred").inc()
        now = time.monotonic()
        if self._deferred_since is None:
            self._deferred_since = now
            self._deferral_warned = False
            log.info("policy reload (%s) %s", reason, error)
        elif not self._deferral_warned and now - self._deferred_since >= LONG_WRITE_WARNING_SECONDS:
            self._deferral_warned = True
            log.warning(
                "policy reload has waited %.0f s for %s to be closed; %s. Writers must close "
                "the file (or write a temporary file and rename it into place)",
                now - self._deferred_since,
                ", ".join(exc.paths),
                serving,
            )
        return ReloadResult.DEFERRED

    def _failed(self, attempt_at: datetime, reason: str, error: str) -> ReloadResult:
        previous = self._status
        self._status = replace(
            previous,
            last_attempt_at=attempt_at,
            last_result=ReloadResult.FAILED,
            last_error=error,
            last_reason=reason,
            attempts=previous.attempts + 1,
        )
        _record_attempt(ok=False, at=attempt_at)
        if previous.serving:
            log.error(
                "policy reload (%s) failed; still serving revision %s", reason, previous.revision
            )
        else:
            log.error("policy load (%s) failed; no valid policy set, answering deny", reason)
        for line in error.splitlines():  # one log line per issue, each with its file:line
            log.error("%s", line)
        return ReloadResult.FAILED

    def _succeeded(
        self, policies: CompiledPolicySet, attempt_at: datetime, reason: str, elapsed: float
    ) -> ReloadResult:
        previous = self._status
        _record_attempt(ok=True, at=attempt_at)
        if previous.revision == policies.revision:
            self._status = replace(
                previous,
                last_attempt_at=attempt_at,
                last_result=ReloadResult.UNCHANGED,
                last_error="",
                last_reason=reason,
                attempts=previous.attempts + 1,
            )
            if previous.last_result is ReloadResult.FAILED:
                log.info(
                    "policy reload (%s) succeeded again; revision %s (unchanged) keeps serving",
                    reason,
                    policies.revision,
                )
            else:
                log.debug("policy reload (%s): revision %s unchanged", reason, policies.revision)
            return ReloadResult.UNCHANGED
        self._policies = policies  # the swap: one reference assignment
        if not previous.revision:
            _freeze_first_set(policies)
        self._status = replace(
            previous,
            revision=policies.revision,
            loaded_at=attempt_at,
            organizations=tuple(sorted(policies.organizations)),
            file_count=policies.file_count,
            last_attempt_at=attempt_at,
            last_result=ReloadResult.LOADED,
            last_error="",
            last_reason=reason,
            attempts=previous.attempts + 1,
        )
        _record_revision(previous.revision, policies.revision)
        log.info(
            "policy set %s -> %s (%d organization(s), %d files) loaded in %.0f ms (%s)",
            previous.revision or "none",
            policies.revision,
            len(policies.organizations),
            policies.file_count,
            elapsed * 1000,
            reason,
        )
        for listener in list(self._listeners):
            try:
                listener(policies)
            except Exception:
                log.exception("policy swap listener failed")
        return ReloadResult.LOADED


def _freeze_first_set(policies: CompiledPolicySet) -> None:
    """After the first swap, move everything alive out of the cyclic collector's full passes.

    A compiled set holds ~60 tracked objects a rule (1.2 million at 20,000 rules), and most
    of them live as long as the server: later sets reuse the first one's parsed files,
    compiled rules and conditions. Every full collection walks them all (~0.25 s on an idle
    core at 20,000 rules, holding the GIL), and the objects a reload builds trigger one on most
    edits, delaying the first answer of the new revision. gc.freeze (Python's `gc` module
    docs) moves every tracked object to a permanent generation that collections skip;
    reference counting still frees each one when nothing holds it any more (a replaced set
    holds no cycle: tests/store/test_reload_memory.py). Done once, with no full collection
    first (it would cost the same ~0.25 s at startup): only the young generations are
    collected, and a full collection right after a load finds no cyclic garbage to freeze
    (measured at 10,000 user policies: 0 objects). Objects later reloads build stay collected
    as usual; they are few. Skipped for small sets, and when the application has turned the
    collector off.
    """
    rules = sum(org.rule_count for org in policies.organizations.values())
    if rules < FREEZE_MIN_RULES or not gc.isenabled():
        return
    gc.collect(1)
    gc.freeze()


def format_issues(exc: PolicyLoadError) -> str:
    """Every issue on its own line as `file:line: [policy, rule] message`, capped."""
    issues = list(getattr(exc, "issues", ()) or ())
    if not issues:
        return str(exc)
    lines = [str(issue) for issue in issues[:MAX_REPORTED_ISSUES]]
    if len(issues) > MAX_REPORTED_ISSUES:
        lines.append(f"... and {len(issues) - MAX_REPORTED_ISSUES} more issue(s)")
    return "\n".join(lines)


def _record_attempt(*, ok: bool, at: datetime) -> None:
    metrics.RELOADS.labels(result="success" if ok else "error").inc()
    metrics.LAST_RELOAD_SUCCESS.set(1 if ok else 0)
    metrics.LAST_RELOAD_TIME.set(at.timestamp())


def _record_revision(previous: str, current: str) -> None:
    """Info-style gauge: 1 for the serving revision. In multiprocess mode labels cannot be
    removed (the value lives in a shared file), so the old revision is set to 0 instead."""
    if previous:
        metrics.POLICY_REVISION.labels(revision=previous).set(0)
        if not _multiprocess():
            metrics.POLICY_REVISION.remove(previous)
    metrics.POLICY_REVISION.labels(revision=current).set(1)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
