"""`AuditLog`: the request path hands decisions to a bounded queue; threads write them out.

    request threads --record()--> bounded queue --dispatcher--> per-sink worker --> sink
                                                (builds records)  (chain, checkpoints,
                                                                   retries, rotation)

* `record()` only appends a tuple to a deque (about a microsecond). When the queue is full it
  waits up to `block_timeout_ms` for room (`when_full=block`) or gives up at once (`drop`);
  a decision that is given up is counted (`pdp_audit_dropped_total`), logged (rate-limited)
  and reported inside the log itself by a `dropped` record, so nothing is lost silently.
* One dispatcher thread builds each record once and hands it to every sink's worker. It
  works in rounds of up to 512 records, letting a trickle gather for 5 ms first: records
  reach the sinks a few milliseconds later, at a fraction of the CPU.
* Each sink has its own worker thread and hash chain, so a slow or failing sink never holds
  up the others. A failing sink is retried with exponential backoff (up to `retry_max_ms`),
  keeping order. While it fails, its backlog grows up to `sink_buffer` records, counting
  every record it holds (decisions and the chain's own: start, checkpoints, `dropped`); past
  that, new decisions are not added to its chain (counted as `sink_backlog_full`) and, once
  there is room, one `dropped` record per reason in its chain says how many are missing and
  when. Room for those chain records is reserved, so they are never starved by decisions.
* A sink that finds records removed under it (a Redis Stream deleted, replaced or trimmed
  past the writer's last entry) says so: a log line, `pdp_audit_stream_removed_total`, and a
  `dropped` record (`stream_reset` / `stream_trimmed`) naming the last seq that is gone.
* `close()` drains everything: the queue, every worker's backlog, a final checkpoint per sink.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policy_engine import metrics
from policy_engine.audit.canonical import Parts
from policy_engine.audit.chain import Chain, Sealed
from policy_engine.audit.record import (
    PreparedHit,
    default_instance,
    encode_invalid_record,
)

# A name of this module (the dispatcher looks it up here), which audit/bench.py replaces to
# time record() alone.
from policy_engine.audit.record import encode_record as encode_record
from policy_engine.audit.sinks.base import Sink, StreamGap
from policy_engine.audit.sinks.file import FileSink
from policy_engine.audit.sinks.stdout import StdoutSink
from policy_engine.config import AuditSettings, ConfigError
from policy_engine.domain.decision import Decision
from policy_engine.domain.request import CheckRequest
from policy_engine.lifecycle.component import ComponentStatus, State

if TYPE_CHECKING:
    # Imported where used: redis (~10 MB) and cryptography (~8 MB) only when configured.
    from policy_engine.audit.keys import Signer

log = logging.getLogger(__name__)

SINK_NAMES = ("file", "redis", "stdout")
WHEN_FULL = ("block", "drop")

_BATCH = 512  # records per dispatcher round and per sink write
_LINGER = 0.005  # seconds the dispatcher lets records gather before a partial batch
_IDLE_WAIT = 0.5  # seconds the dispatcher sleeps with nothing to do (woken earlier on work)
_RETRY_INITIAL = 0.05
_COUNT_GRACE = 0.5  # seconds past close's deadline for workers to count what they left

_DECISION = 0
_INVALID = 1
_LAZY = 2


class _Rotate:
    """Marker in a sink's outbox: rotate the file here (the old file is sealed before it)."""


@dataclass
class _Missing:
    """Records missing from a stream for one reason, not yet said in its chain.

    `count` decisions (or, for stream gaps, records seq 1..`through_seq`) between `since` and
    `until` (epoch seconds).
    """

    count: int
    since: float
    until: float
    through_seq: int | None = None

    def add(self, count: int, since: float, until: float) -> None:
        self.count += count
        self.since = min(self.since, since)
        self.until = max(self.until, until)


ROTATE = _Rotate()


class _RateLimitedWarning:
    """At most one log line per `interval` for a repeating problem, with the repeat count."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last = -interval
        self._suppressed = 0
        self._lock = threading.Lock()

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        log.warning(message, *args)


@dataclass
class AuditStats:
    """Counts since this AuditLog started (the Prometheus metrics add up all of them)."""

    queued: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # "<sink>/<reason>" -> count
    written: dict[str, int] = field(default_factory=dict)  # sink -> decision records written
    errors: dict[str, int] = field(default_factory=dict)  # sink -> failed operations
    backlog: dict[str, int] = field(default_factory=dict)  # sink -> records waiting


def file_path(configured: Path, worker: int) -> Path:
    """The file one worker writes: `{worker}` in the path is replaced by its index; without
    the placeholder, workers other than 0 get `.w<N>` before the suffix, so two processes
    never append to (and rotate) the same file."""
    text = str(configured)
    if "{worker}" in text:
        return Path(text.replace("{worker}", str(worker)))
    path = Path(text)
    if worker:
        return path.with_name(f"{path.stem}.w{worker}{path.suffix}")
    return path


def build_sinks(settings: AuditSettings, *, worker: int = 0) -> list[Sink]:
    """The sinks named in `settings.sinks`; a ConfigError names any bad setting."""
    names = [n.strip().lower() for n in settings.sinks.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SINK_NAMES))
    if unknown:
        raise ConfigError(
            f"setting audit.sinks: unknown sink(s) {', '.join(unknown)}; "
            f"choose from {', '.join(SINK_NAMES)}"
        )
    if not names:
        raise ConfigError("setting audit.sinks: name at least one of file, redis, stdout")
    sinks: list[Sink] = []
    for name in dict.fromkeys(names):
        if name == "file":
            path = file_path(settings.file_path, worker)
            sinks.append(
                FileSink(
                    path,
                    max_bytes=settings.file_max_bytes,
                    keep=settings.file_keep,
                    fsync=settings.file_fsync,
                )
            )
        elif name == "redis":
            if not settings.redis_url:
                raise ConfigError("setting audit.redis_url: required by the redis sink")
            from policy_engine.audit.sinks.redis import RedisStreamSink  # imports redis

            sinks.append(
                RedisStreamSink(
                    settings.redis_url,
                    settings.redis_stream,
                    maxlen=settings.redis_maxlen,
                    timeout_seconds=settings.redis_timeout_ms / 1000,
                )
            )
        else:
            sinks.append(StdoutSink())
    return sinks


def _load_signer(path: str) -> Signer:
    """The checkpoint signer from `audit.signing_key_file`; ConfigError naming the setting."""
    from policy_engine.audit.keys import KeyFileError, Signer, load_private_key

    try:
        return Signer(load_private_key(Path(path)))
    except KeyFileError as exc:
        raise ConfigError(f"setting audit.signing_key_file: {exc}") from exc


def _check(settings: AuditSettings) -> None:
    if settings.when_full not in WHEN_FULL:
        raise ConfigError(
            f"setting audit.when_full: choose block or drop, not {settings.when_full!r}"
        )
    for name in ("queue_size", "sink_buffer"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"setting audit.{name}: must be at least 1")


def _on_event_loop() -> bool:
    """Is the caller running on an asyncio event loop's thread?"""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class AuditLog:
    """The audit log of one server process. Thread-safe; create it after forking workers.

    A lifecycle `Component` ("audit"): the constructor checks the settings and builds the
    sinks without touching them (no file opened, no connection, no thread); `start()` reads
    the signing key and starts the writer threads; `stop(deadline)` drains (see `close`);
    `status()` is DEGRADED while a sink fails. `required`: decisions must not be made
    unaudited, so the log is not ready (health NOT_SERVING) while any sink cannot write.
    Records offered before `start()` wait in the queue (bounded as ever).

    With `settings.enabled` false, `record()` does nothing and returns False.
    """

    name = "audit"

    def __init__(
        self,
        settings: AuditSettings,
        *,
        worker: int = 0,
        instance: str | None = None,
        sinks: Sequence[Sink] | None = None,
        signer: Signer | None = None,
        required: bool = False,
    ) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self.instance = instance or default_instance()
        self._queue: deque[tuple[Any, ...]] = deque()
        self._max = settings.queue_size
        self._block = settings.block_timeout_ms / 1000 if settings.when_full == "block" else 0.0
        self._wake = threading.Event()
        self._space = threading.Condition(threading.Lock())
        self._waiters = 0
        self._closing = False
        self._drained = False  # set by the dispatcher before its final sweep
        self._busy = False
        self._closed_result: bool | None = None
        self._drop_lock = threading.Lock()
        self._unreported: dict[str, _Missing] = {}  # reason -> drops not yet in the chains
        self._dropped: dict[str, int] = {}
        self._warn_full = _RateLimitedWarning()
        self._workers: list[_SinkWorker] = []
        self._dispatcher: threading.Thread | None = None
        self._signer = signer
        self.required = required
        self._state = State.NEW
        self._start_lock = threading.Lock()
        self._sinks: list[Sink] = []
        if not self.enabled:
            return
        _check(settings)
        self._sinks = list(sinks) if sinks is not None else build_sinks(settings, worker=worker)

    # --- lifecycle: start ----------------------------------------------------------------------

    def start(self) -> None:
        """Read the signing key, then start the dispatcher and one worker per sink (each opens
        its sink, retrying with backoff while it cannot). Records queued before this are
        written now. Raises ConfigError when `audit.signing_key_file` cannot be used. A
        second call does nothing; a log that was closed is not started again."""
        if not self.enabled:
            return
        with self._start_lock:
            if self._state is not State.NEW:
                return
            self._state = State.STARTING
            signer = self._signer
            try:
                if signer is None and self.settings.signing_key_file:
                    signer = _load_signer(self.settings.signing_key_file)
            except BaseException:
                self._state = State.NEW
                raise
            if signer is None:
                log.warning("audit log: no signing_key_file; checkpoints are not signed")
            for sink in self._sinks:
                chain = Chain(signer=signer, instance=self.instance, sink=sink.name)
                self._workers.append(_SinkWorker(self, sink, chain, self.settings))
            for w in self._workers:
                w.thread.start()
            self._dispatcher = threading.Thread(
                target=self._dispatch, name="pdp-audit-dispatch", daemon=True
            )
            self._dispatcher.start()
            self._state = State.RUNNING

    # --- request path --------------------------------------------------------------------------

    def record(
        self,
        request: CheckRequest,
        decision: Decision,
        *,
        decision_id: str | bytes,
        cache_level: str = "none",
        latency_ms: float = 0.0,
        at: float | None = None,
        trace: tuple[str, str] | None = None,
    ) -> bool:
        """Queue the record of one decision; False when it was dropped (and counted).

        `at` is the decision's time (epoch seconds; now when omitted); `trace` the (trace ID,
        span ID) of the call's span, when traced. The record itself is built on the writer
        thread, so this costs about a microsecond.
        """
        if not self.enabled:
            return False
        return self._put(
            (
                _DECISION,
                request,
                decision,
                decision_id,
                cache_level,
                latency_ms,
                time.time() if at is None else at,
                trace,
            )
        )

    def record_lazy(
        self,
        build: Callable[[], tuple[CheckRequest, Decision] | PreparedHit],
        *,
        decision_id: str | bytes,
        cache_level: str = "none",
        latency_ms: float = 0.0,
        at: float | None = None,
        trace: tuple[str, str] | None = None,
    ) -> bool:
        """Like `record`, with the request and decision made by `build()` on the writer thread.

        For paths that never build domain values, such as a cache hit answered from stored
        response bytes: pass e.g. `functools.partial(to_domain, message, cached_entry)` and
        the conversion happens off the request path. `build` may also return a `PreparedHit`
        (a record serialized but for the per-call fields), which is cheaper still. `build`
        must not depend on anything the caller mutates afterwards. If it raises, the record is
        counted as dropped (`build_error`) and logged.
        """
        if not self.enabled:
            return False
        return self._put(
            (
                _LAZY,
                build,
                decision_id,
                cache_level,
                latency_ms,
                time.time() if at is None else at,
                trace,
            )
        )

    def record_invalid(
        self,
        decision: Decision,
        *,
        decision_id: str,
        latency_ms: float = 0.0,
        at: float | None = None,
        trace: tuple[str, str] | None = None,
        **raw_fields: Any,
    ) -> bool:
        """Queue the record of a request refused before a domain request existed.

        `raw_fields` are the keyword fields of `build_invalid_record` (organization,
        subject_id, subject_kind, access_token, application_id, integration_id, scope,
        request_id, client_ip, session_id, connection), as read from the message.
        """
        if not self.enabled:
            return False
        return self._put(
            (
                _INVALID,
                decision,
                decision_id,
                latency_ms,
                time.time() if at is None else at,
                raw_fields,
                trace,
            )
        )

    def _put(self, item: tuple[Any, ...]) -> bool:
        queue = self._queue
        if len(queue) >= self._max and not self._wait_for_room():
            return False
        queue.append(item)
        if self._drained and self._withdraw(item):
            return False
        if not self._wake.is_set():
            self._wake.set()
        return True

    def _withdraw(self, item: tuple[Any, ...]) -> bool:
        """After the final sweep, take back an item that no one will write (and count it)."""
        try:
            self._queue.remove(item)
        except ValueError:
            return False  # the final sweep took it: it will be written
        self._count_drop("queue", "closed")
        return True

    def admit(self, count: int, deadline: float | None) -> Awaitable[None] | None:
        """None when `count` records fit in the queue now, or when the log would not wait for
        them (`when_full: drop`, disabled, closing); else a coroutine, for the asyncio
        pipeline to await before it queues them, that waits until they fit, for at most
        `block_timeout_ms` and never past `deadline` (`time.monotonic()` s). Records that still
        do not fit afterwards are dropped (counted) when queued: the loop never blocks."""
        if (
            not self.enabled
            or self._block <= 0
            or self._closing
            or len(self._queue) + count <= self._max
        ):
            return None
        return self._room_for(count, deadline)

    async def _room_for(self, count: int, deadline: float | None) -> None:
        metrics.AUDIT_BLOCKED.inc()
        until = time.monotonic() + self._block
        if deadline is not None:
            until = min(until, deadline)
        pause = 0.0005
        # Polling: the writer threads free room without knowing about the loop, and this
        # only runs while the queue is full.
        while len(self._queue) + min(count, self._max) > self._max and not self._closing:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.005)

    def _wait_for_room(self) -> bool:
        if self._closing and self._drained:
            self._count_drop("queue", "closed")
            return False
        if self._block <= 0 or _on_event_loop():
            # On the event loop the wait was `admit`'s: blocking here would stall every call.
            self._count_drop("queue", "queue_full")
            return False
        metrics.AUDIT_BLOCKED.inc()
        deadline = time.monotonic() + self._block
        with self._space:
            self._waiters += 1
            try:
                while len(self._queue) >= self._max:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._count_drop("queue", "queue_full")
                        return False
                    self._space.wait(remaining)
            finally:
                self._waiters -= 1
        return True

    def _count_drop(self, sink: str, reason: str, count: int = 1) -> None:
        now = time.time()
        with self._drop_lock:
            key = f"{sink}/{reason}"
            self._dropped[key] = self._dropped.get(key, 0) + count
            if sink == "queue" and reason != "closed":  # "closed": the caller was told
                missing = self._unreported.get(reason)
                if missing is None:
                    self._unreported[reason] = _Missing(count, now, now)
                else:
                    missing.add(count, now, now)
        metrics.AUDIT_DROPPED.labels(sink, reason).inc(count)
        self._warn_full.warn("audit log: %d decision(s) not recorded (%s: %s)", count, sink, reason)

    # --- dispatcher thread ---------------------------------------------------------------------

    def _dispatch(self) -> None:
        queue = self._queue
        try:
            while True:
                if not queue:
                    if self._closing:
                        self._drained = True
                        self._busy = True
                        self._process(self._take(len(queue) + 1_000_000))
                        break
                    self._busy = False
                    self._wake.clear()
                    if not queue and not self._closing:
                        self._wake.wait(_IDLE_WAIT)
                    continue
                self._busy = True
                if len(queue) < _BATCH and not self._closing:
                    # Let a trickle gather: one round per record costs a thread hand-off
                    # and a write each, several times the record itself.
                    time.sleep(_LINGER)
                self._process(self._take(_BATCH))
        except Exception:  # a bug must not leave close() waiting forever
            log.exception("audit dispatcher failed")
        finally:
            self._busy = False
            for w in self._workers:
                w.finish()

    def _take(self, limit: int) -> list[tuple[Any, ...]]:
        queue = self._queue
        batch: list[tuple[Any, ...]] = []
        popleft = queue.popleft
        try:
            while len(batch) < limit:
                batch.append(popleft())
        except IndexError:
            pass
        if self._waiters:
            with self._space:
                self._space.notify_all()
        metrics.AUDIT_QUEUE_DEPTH.set(len(queue))
        return batch

    def _process(self, batch: list[tuple[Any, ...]]) -> None:
        records: list[Parts] = []
        instance = self.instance
        for item in batch:
            try:
                kind = item[0]
                if kind != _INVALID:
                    if kind == _DECISION:
                        _, request, decision, decision_id, cache_level, latency_ms, at, trace = item
                        built: Any = (request, decision)
                    else:
                        _, build, decision_id, cache_level, latency_ms, at, trace = item
                        built = build()
                    if isinstance(decision_id, bytes):
                        decision_id = decision_id.decode("utf-8", "replace")
                    if built.__class__ is PreparedHit:
                        records.append(
                            built.render(decision_id, cache_level, latency_ms, instance, at, trace)
                        )
                    else:
                        records.append(
                            encode_record(
                                *built,
                                decision_id=decision_id,
                                cache_level=cache_level,
                                latency_ms=latency_ms,
                                instance=instance,
                                time=at,
                                trace=trace,
                            )
                        )
                else:
                    _, decision, decision_id, latency_ms, at, raw, trace = item
                    records.append(
                        encode_invalid_record(
                            decision,
                            decision_id=decision_id,
                            latency_ms=latency_ms,
                            instance=instance,
                            time=at,
                            trace=trace,
                            **raw,
                        )
                    )
            except Exception:
                log.exception("audit record could not be built; counted as dropped")
                self._count_drop("queue", "build_error")
        if self._unreported:  # every sink's chain will say so, one record per reason
            with self._drop_lock:
                unreported, self._unreported = self._unreported, {}
            for reason, missing in unreported.items():
                for w in self._workers:
                    w.note_missing(reason, missing.count, missing.since, missing.until)
        if records:
            for w in self._workers:
                w.offer(records)

    # --- lifecycle -----------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.enabled or (
                not self._queue and not self._busy and all(w.idle() for w in self._workers)
            ):
                return True
            if not self._wake.is_set():
                self._wake.set()
            time.sleep(0.002)
        return False

    def stop(self, deadline: float) -> bool:
        """`close` by `deadline` (`time.monotonic()` seconds): True when every accepted record
        reached every sink, False when some were left unwritten (counted and logged)."""
        return self.close(max(deadline - time.monotonic(), 0.0))

    def close(self, timeout: float = 10.0) -> bool:
        """Stop accepting records, write everything queued plus a final checkpoint per sink.

        Returns True when every accepted record reached every sink. Records offered after
        close are refused and counted (`reason="closed"`); so are records still queued when
        the log was never started (False then). Safe to call more than once.
        """
        if not self.enabled:
            return True
        with self._start_lock:  # not beside a start: close after it, or instead of it
            if self._state is State.NEW:
                self._state = State.STOPPED
                self._closing = self._drained = True
                left = len(self._queue)
                self._queue.clear()
                if left:
                    self._count_drop("queue", "closed", left)
                    log.error("audit log: closed before it started; %d record(s) not written", left)
                self._closed_result = not left
            if self._state is State.RUNNING:
                self._state = State.STOPPING
        if self._closed_result is not None:
            return self._closed_result
        deadline = time.monotonic() + timeout
        for w in self._workers:
            w.deadline = deadline
        self._closing = True
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join(max(deadline - time.monotonic(), 0))
        ok = True
        # A little grace past the deadline, for a worker to count what it could not write.
        grace_end = deadline + _COUNT_GRACE
        for w in self._workers:
            w.thread.join(max(grace_end - time.monotonic(), 0))
            if w.thread.is_alive():  # stuck in its sink: it cannot count what it holds
                log.error(
                    "audit sink %s: still busy at the deadline (%s); %d record(s) it holds "
                    "are not written",
                    w.sink.name,
                    w.problem or "a write has not returned",
                    w.backlog(),
                )
            ok = w.complete() and ok
        if self._dispatcher is not None and self._dispatcher.is_alive():
            ok = False
        self._closed_result = ok
        self._state = State.STOPPED
        if not ok:
            log.error("audit log: closed before every record was written (see dropped metrics)")
        return ok

    def status(self) -> ComponentStatus:
        """RUNNING, or DEGRADED naming each failing sink (with the records it holds) and a
        dispatcher that died; ready unless `required` and a sink cannot write. Never blocks."""
        if not self.enabled:
            return ComponentStatus(self.name, State.STOPPED, True, "disabled")
        state = self._state
        if state is not State.RUNNING:
            return ComponentStatus(self.name, state, False)
        problems = [
            f"sink {w.sink.name}: {w.problem}; {w.backlog()} record(s) waiting"
            for w in self._workers
            if w.problem
        ]
        dispatcher = self._dispatcher
        if dispatcher is None or not dispatcher.is_alive():
            problems.append("the dispatcher has stopped: nothing more is written")
        if not problems:
            return ComponentStatus(self.name, State.RUNNING, True, self._summary())
        ready = not self.required
        return ComponentStatus(self.name, State.DEGRADED, ready, "; ".join(problems))

    def _summary(self) -> str:
        names = ", ".join(w.sink.name for w in self._workers)
        return f"writing to {names}" + (" (required)" if self.required else "")

    def __enter__(self) -> AuditLog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> AuditStats:
        with self._drop_lock:
            dropped = dict(self._dropped)
        for w in self._workers:
            for reason, count in w.dropped_by_reason.items():
                key = f"{w.sink.name}/{reason}"
                dropped[key] = dropped.get(key, 0) + count
        return AuditStats(
            queued=len(self._queue),
            dropped=dropped,
            written={w.sink.name: w.written for w in self._workers},
            errors={w.sink.name: w.errors for w in self._workers},
            backlog={w.sink.name: w.backlog() for w in self._workers},
        )


class _SinkWorker:
    """Owns one sink and its chain: seals records, checkpoints, rotates, retries, drains.

    It holds at most `sink_buffer` records (inbox and sealed outbox together, of every kind):
    a chain record (start, checkpoint, file start, `dropped`) is added only when there is room
    for it, and decisions are refused while the room is reserved for the chain's own records.
    """

    def __init__(self, log_: AuditLog, sink: Sink, chain: Chain, settings: AuditSettings) -> None:
        self.audit = log_
        self.sink = sink
        self.chain = chain
        self.inbox: deque[Parts] = deque()
        self.outbox: deque[Sealed | _Rotate] = deque()
        self.bound = settings.sink_buffer
        self.checkpoint_every = settings.checkpoint_every
        self.checkpoint_seconds = settings.checkpoint_seconds
        self.retry_max = max(settings.retry_max_ms / 1000, _RETRY_INITIAL)
        self.wake = threading.Event()
        self.finishing = False
        self.deadline = float("inf")
        self.opened = False
        self.done = False
        self.final_sealed = False
        self.busy = False
        self.projected = 0  # bytes the current file will have once the outbox is written
        self.next_retry = 0.0
        self.backoff = _RETRY_INITIAL
        self.problem = ""  # why the last open, write or rotation failed; "" once one succeeds
        self.last_checkpoint = time.monotonic()
        self.written = 0
        self.errors = 0
        self.peak = 0  # the most records held at once (never above `bound`)
        self.dropped_by_reason: dict[str, int] = {}
        self._held = 0  # records in the inbox plus sealed records in the outbox
        self._room_lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._owed: dict[str, _Missing] = {}  # reason -> missing records not yet in the chain
        self._warn = _RateLimitedWarning()
        self._backlog_gauge = metrics.AUDIT_SINK_BACKLOG.labels(sink.name)
        self.thread = threading.Thread(target=self.run, name=f"pdp-audit-{sink.name}", daemon=True)

    # --- called from the dispatcher ------------------------------------------------------------

    def backlog(self) -> int:
        """Records held: waiting to be sealed or written (at most `sink_buffer`)."""
        return self._held

    def idle(self) -> bool:
        return not self.busy and not self.inbox and not self.outbox and not self._owed

    def _reserved(self) -> int:
        """Room kept for chain records the worker owes: its start, `dropped` records, a due
        checkpoint or rotation. Read without the worker's cooperation, so only a reservation;
        the bound itself is kept by `_take_room`."""
        owed = len(self._owed) + (0 if self.chain.started else 1)
        if self.checkpoint_every > 0 and self.chain.since_checkpoint >= self.checkpoint_every:
            owed += 1
        if self.sink.rotate_at and self.projected >= self.sink.rotate_at:
            owed += 2
        return owed

    def offer(self, records: list[Parts]) -> None:
        with self._room_lock:
            room = self.bound - self._held - self._reserved()
            accepted = records if room >= len(records) else records[: max(room, 0)]
            self.inbox.extend(accepted)
            self._held += len(accepted)
            self.peak = max(self.peak, self._held)
        missed = len(records) - len(accepted)
        if missed:
            self._note_drop(missed, "sink_backlog_full")
        if not self.wake.is_set():
            self.wake.set()

    def note_missing(self, reason: str, count: int, since: float, until: float) -> None:
        """Decisions that never reached this sink (dropped before it); its chain will say so."""
        self._owe(reason, count, since, until)
        if not self.wake.is_set():
            self.wake.set()

    def finish(self) -> None:
        self.finishing = True
        self.wake.set()

    def complete(self) -> bool:
        return self.done and not self.outbox and not self.inbox

    def _owe(
        self, reason: str, count: int, since: float, until: float, through: int | None = None
    ) -> None:
        with self._drop_lock:
            missing = self._owed.get(reason)
            if missing is None:
                self._owed[reason] = _Missing(count, since, until, through)
            elif through is not None:  # a later gap includes the earlier one: seq 1..through
                self._owed[reason] = _Missing(count, min(missing.since, since), until, through)
            else:
                missing.add(count, since, until)

    def _note_drop(self, count: int, reason: str) -> None:
        now = time.time()
        with self._drop_lock:
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + count
        if reason == "sink_backlog_full":
            self._owe(reason, count, now, now)
        metrics.AUDIT_DROPPED.labels(self.sink.name, reason).inc(count)
        self._warn.warn("audit sink %s: %d record(s) dropped (%s)", self.sink.name, count, reason)

    def _stream_gap(self, gap: StreamGap) -> None:
        """The sink found records removed under it: log, count, and say so in the chain."""
        log.warning(
            "audit sink %s: %s; %d record(s) no longer in the sink%s",
            self.sink.name,
            gap.detail,
            gap.count,
            f" (this stream's seq 1-{gap.through_seq})" if gap.through_seq else "",
        )
        metrics.AUDIT_STREAM_REMOVED.labels(self.sink.name, gap.reason).inc(gap.count)
        if gap.through_seq:
            now = time.time()
            self._owe(f"stream_{gap.reason}", gap.through_seq, gap.since, now, gap.through_seq)

    # --- room ----------------------------------------------------------------------------------

    def _take_room(self, count: int) -> bool:
        with self._room_lock:
            if self._held + count > self.bound:
                return False
            self._held += count
            self.peak = max(self.peak, self._held)
            return True

    def _free_room(self, count: int) -> None:
        with self._room_lock:
            self._held -= count

    # --- the worker thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("audit sink %s: worker failed", self.sink.name)
        finally:
            self.busy = False
            self.done = True
            try:
                self.sink.close()
            except Exception:
                log.exception("audit sink %s: close failed", self.sink.name)

    def _loop(self) -> None:
        while True:
            self.busy = bool(self.inbox or self.outbox)
            now = time.monotonic()
            if not self.opened and now >= self.next_retry:
                self._open()
            if self.opened:
                self._seal_inbox()
                self._maybe_checkpoint(now)
                if self.outbox and time.monotonic() >= self.next_retry:
                    self._flush()
            if (
                self.finishing
                and (not self.inbox or time.monotonic() >= self.deadline)
                and self._finish()
            ):
                return
            self._backlog_gauge.set(self.backlog())
            if not self.inbox and not self.outbox:
                self.busy = False
            self.wake.clear()
            if self.inbox and self.opened and time.monotonic() >= self.next_retry:
                continue
            self.wake.wait(self._wait_time())

    def _wait_time(self) -> float:
        now = time.monotonic()
        if self.finishing:
            return 0.01
        if self.next_retry > now:
            return min(self.next_retry - now, 1.0)
        if self.outbox or self._owed:
            return 0.001
        if self.checkpoint_seconds > 0 and self.chain.since_checkpoint:
            due = self.last_checkpoint + self.checkpoint_seconds - now
            return min(max(due, 0.001), 1.0)
        return 1.0

    def _open(self) -> None:
        try:
            state = self.sink.open()
        except Exception as exc:
            self._failed("open", exc)
            return
        self._succeeded()
        if not self._take_room(1):
            # Never so while the start's room is reserved; if it were, make room rather than
            # hold a chain that cannot begin.
            with self._room_lock:
                self.inbox.pop()
            self._note_drop(1, "sink_backlog_full")
        self.opened = True
        self.projected = state.size
        self._push(self.chain.start(state.last_record, time.time()))

    def _push(self, sealed: Sealed) -> None:
        """Appends a sealed record whose room is already counted."""
        self.outbox.append(sealed)
        self.projected += len(sealed.line) + 1

    def _seal_owed(self) -> None:
        """One `dropped` record per reason owed, each once there is room for it."""
        for reason in list(self._owed):
            if not self._take_room(1):
                return
            with self._drop_lock:
                missing = self._owed.pop(reason)
            self._push(
                self.chain.dropped(
                    missing.count,
                    reason,
                    missing.since,
                    missing.until,
                    time.time(),
                    removed_through_seq=missing.through_seq,
                )
            )

    def _duties(self) -> None:
        """A checkpoint or rotation that is due, when there is room (else at the next chance)."""
        if self.checkpoint_every > 0 and self.chain.since_checkpoint >= self.checkpoint_every:
            self._checkpoint()
        if self.sink.rotate_at and self.projected >= self.sink.rotate_at:
            self._rotate()

    def _seal_inbox(self) -> None:
        inbox = self.inbox
        chain = self.chain
        if self._owed:
            self._seal_owed()
        self._duties()
        while inbox:
            self.busy = True
            record = inbox.popleft()  # its room moves with it to the outbox
            self._push(chain.seal(record))
            self._duties()

    def _checkpoint(self, *, final: bool = False) -> bool:
        if not self._take_room(1):
            return False
        self._push(self.chain.checkpoint(time.time(), final=final))
        self.last_checkpoint = time.monotonic()
        return True

    def _rotate(self) -> bool:
        # Every rotated file ends signed: a checkpoint, then the new file's first record.
        if not self._take_room(2 if self.chain.since_checkpoint else 1):
            return False
        if self.chain.since_checkpoint:
            self._push(self.chain.checkpoint(time.time()))
            self.last_checkpoint = time.monotonic()
        self.outbox.append(ROTATE)
        self.projected = 0
        self._push(self.chain.file_start(time.time()))
        return True

    def _maybe_checkpoint(self, now: float) -> None:
        if (
            self.checkpoint_seconds > 0
            and self.chain.since_checkpoint
            and now - self.last_checkpoint >= self.checkpoint_seconds
        ):
            self._checkpoint()

    def _flush(self) -> bool:
        outbox = self.outbox
        while outbox:
            head = outbox[0]
            if head is ROTATE:
                try:
                    self.sink.rotate()
                except Exception as exc:
                    self._failed("rotate", exc)
                    return False
                outbox.popleft()
                continue
            chunk: list[Sealed] = []
            for item in outbox:
                if item is ROTATE or len(chunk) >= _BATCH:
                    break
                chunk.append(item)  # type: ignore[arg-type]
            try:
                self.sink.write(chunk)
            except Exception as exc:
                self._failed("write", exc)
                return False
            for _ in chunk:
                outbox.popleft()
            self._free_room(len(chunk))
            self._count_written(chunk)
            for gap in self.sink.take_gaps():
                self._stream_gap(gap)
        self._succeeded()
        return True

    def _count_written(self, chunk: list[Sealed]) -> None:
        kinds: dict[str, int] = {}
        for sealed in chunk:
            kinds[sealed.kind] = kinds.get(sealed.kind, 0) + 1
        for kind, count in kinds.items():
            metrics.AUDIT_RECORDS.labels(self.sink.name, kind).inc(count)
        self.written += kinds.get("decision", 0)

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.errors += 1
        self.problem = f"{operation} failed ({exc})"
        metrics.AUDIT_SINK_ERRORS.labels(self.sink.name).inc()
        self._warn.warn(
            "audit sink %s: %s failed (%s); retrying in %.2fs, %d record(s) waiting",
            self.sink.name,
            operation,
            exc,
            self.backoff,
            self.backlog(),
        )
        self.next_retry = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.retry_max)

    def _succeeded(self) -> None:
        self.problem = ""
        self.backoff = _RETRY_INITIAL
        self.next_retry = 0.0

    def _finish(self) -> bool:
        """True when the worker may stop: final checkpoint written, or out of time."""
        if self.opened and not self.inbox and self._owed:
            self._seal_owed()
        if (
            self.opened
            and not self.inbox
            and not self._owed
            and not self.final_sealed
            and self._checkpoint(final=True)
        ):
            self.final_sealed = True
        if self.opened and self.final_sealed and not self.outbox:
            return True
        if time.monotonic() >= self.deadline:
            lost = sum(
                1 for item in self.outbox if isinstance(item, Sealed) and item.kind == "decision"
            ) + sum(1 for parts in self.inbox if parts.kind == "decision")
            if lost:
                self._note_drop(lost, "shutdown")
                log.error(
                    "audit sink %s: %d record(s) could not be written before shutdown",
                    self.sink.name,
                    lost,
                )
            return True
        return False
