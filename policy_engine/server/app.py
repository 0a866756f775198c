"""Building and running the gRPC server, in one process or several sharing a port.

One Python process decides on one core at a time (the GIL), so `--workers N` runs N
independent server processes bound to the same port with SO_REUSEPORT and lets the kernel
spread connections across them. Only its own workers share a port: a lone process never sets
SO_REUSEPORT, and a supervisor reserves its ports before spawning (`ports.py`), so a second
server on a port in use fails at startup with an error naming the address. Each worker runs
its own policy store and watcher, exactly as separate replicas would; the supervisor forwards
SIGTERM/SIGINT/SIGHUP and serves the workers' aggregated metrics.

Each process serves with grpc's asyncio server (`grpc.aio`): a call is a task on one event
loop, not a handler thread, so no number of stalled or slow callers can keep the server from
answering others and health. Decisions run on the loop (a thread hand-off costs as much as a
decision); what waits (a Redis lookup through redis.asyncio, a JWKS refresh a token needs, room
in a full audit queue) is awaited for at most the caller's remaining deadline
(`policy_engine.decision`). The loop runs in a dedicated thread (`policy_engine.lifecycle`),
so the synchronous API (`start_server` returning a `RunningServer` with `stop()` and
`reload()`) stays, the main thread keeps the signal handlers, and the policy store's reloads
run beside it on their own thread. Idle, silent and half-open connections are closed after the
`transport` settings' times.

Every background part is a lifecycle `Component` built by `build_components` (no thread, no
I/O) and started in order by `RunningServer.start`, stopped in reverse by `stop`; health on
every port is derived from their statuses.

Bad policies never stop the server: it starts NOT_SERVING and denies every Check with
kontext_server_error until a valid set loads (`pdp validate` is the deploy-time gate).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit import AuditLog
from policy_engine.auth.keys import RemoteKeySets
from policy_engine.cache import DecisionCache, load_signing_keys, redis_level_on
from policy_engine.cli.early import EXIT_INTERRUPTED
from policy_engine.config import (
    ZONED_TIME_FORM,
    ConfigError,
    Settings,
    parse_zoned_time,
    shared_port_problems,
)
from policy_engine.decision import cache_from_settings
from policy_engine.domain.codes import ErrorCode, docs_url
from policy_engine.errors import PolicyEngineError
from policy_engine.lifecycle import (
    ComponentStatus,
    EventLoop,
    Lifecycle,
    StartFailed,
    State,
    deadline_in,
    event_loop,
    process_event_loop,
)
from policy_engine.logs import setup_logging
from policy_engine.quota import quota_store_from_settings
from policy_engine.server.balance import connection_age_ms
from policy_engine.server.errors import Status, invalid_argument
from policy_engine.server.health import Health
from policy_engine.server.metrics_http import MetricsEndpoint
from policy_engine.server.ports import Reservation, check_free, reserve, reuse_port
from policy_engine.server.security import interceptors, server_credentials
from policy_engine.server.service import SERVICE_NAME, PolicyDecisionServicer
from policy_engine.server.status import STATUS_SERVICE_NAME, PolicyStatusServicer
from policy_engine.store import DirectoryBackend, PolicyReloader, PolicyStore
from policy_engine.tracing import tracing_from_settings

log = logging.getLogger(__name__)

Mode = Literal["policy", "empty"]

STOP_GRACE_SECONDS = 5.0
AUDIT_CLOSE_SECONDS = 10.0  # after the grace period: the audit queue and sinks drain
EXIT_WORKER_FAILED = 1
LOOP_START_SECONDS = 10.0


def _never() -> bool:
    return False


class AsyncServer:
    """A `grpc.aio.Server` driven from synchronous code (as `grpc.Server` was): `start()` and
    `stop(grace)` run on the process's event loop and return once done."""

    def __init__(self, runner: EventLoop, server: grpc.aio.Server) -> None:
        self._runner = runner
        self.aio = server

    def start(self) -> None:
        self._runner.call(self.aio.start(), LOOP_START_SECONDS)

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, let those in flight finish for up to `grace` seconds (None: cancel
        them), close every connection; returns a set event (`stop(grace).wait()` as before)."""
        self._runner.call(self.aio.stop(grace))
        done = threading.Event()
        done.set()
        return done


def transport_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for `settings.transport` (see TransportSettings): what
    closes silent, idle and half-open connections."""
    transport = settings.transport
    options = [
        ("grpc.server_handshake_timeout_ms", transport.handshake_timeout_ms),
        ("grpc.keepalive_time_ms", transport.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", transport.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(transport.permit_keepalive_without_calls)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", transport.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    # 0 means "never"; gRPC's own default (no limit) is what leaving them out gives.
    if transport.max_connection_idle_ms:
        options.append(("grpc.max_connection_idle_ms", transport.max_connection_idle_ms))
    age = connection_age_ms(settings.workers, transport.max_connection_age_ms)
    if age:
        options.append(("grpc.max_connection_age_ms", age))
        options.append(("grpc.max_connection_age_grace_ms", transport.max_connection_age_grace_ms))
    return options


def bundle_public_key(settings: Settings) -> bytes | None:
    """Read once at startup: a missing key file must stop the server, not every reload."""
    path = settings.bundle.public_key_file
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"bundle.public_key_file {path}: {exc.strerror or exc}") from exc


def bundle_not_before(settings: Settings) -> datetime | None:
    """`bundle.not_before` as an instant; raises ConfigError when it is not one."""
    try:
        return parse_zoned_time(settings.bundle.not_before)
    except ValueError:
        raise ConfigError(
            f"setting bundle.not_before: {settings.bundle.not_before.strip()!r} is not "
            + ZONED_TIME_FORM
        ) from None


def build_server(
    servicer: pdp_pb2_grpc.PolicyDecisionServiceServicer,
    settings: Settings,
    *,
    policy_ready: bool = True,
    health_servicer: Health | None = None,
    status_servicer: PolicyStatusServicer | None = None,
) -> tuple[AsyncServer, int]:
    """A bound, not yet started asyncio server for `servicer`, plus the port it bound.

    Health ("" and the PDP service) reads SERVING only when `policy_ready`, unless you pass
    your own `health_servicer` (a server's is derived from its lifecycle; see health.py).
    `status_servicer` adds PolicyStatusService (listed by reflection too). An address ending
    in ":0" binds an ephemeral port. Raises ConfigError when the address cannot be bound.
    """
    runner = event_loop()
    if health_servicer is None:
        health_servicer = Health(runner)
        health_servicer.set_serving(policy_ready)
    server, port = runner.call(
        _build_server(servicer, settings, health_servicer, status_servicer), LOOP_START_SECONDS
    )
    return AsyncServer(runner, server), port


async def _build_server(
    servicer: pdp_pb2_grpc.PolicyDecisionServiceServicer,
    settings: Settings,
    health_servicer: Health,
    status_servicer: PolicyStatusServicer | None,
) -> tuple[grpc.aio.Server, int]:
    """`build_server` on the loop (a grpc.aio server belongs to the loop it is made on)."""
    max_bytes = settings.limits.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # Only `--workers N` processes share a port (the kernel balances between them);
            # their supervisor has reserved it against any other server (see ports.py).
            ("grpc.so_reuseport", reuse_port(settings.workers)),
            *transport_options(settings),
        ],
        interceptors=interceptors(settings.caller_auth),
    )
    _add_pdp_servicer(
        servicer, server, docs_url(settings.docs_base_url, ErrorCode.VALIDATION_ERROR)
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer.servicer, server)
    services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if status_servicer is not None:
        pdp_pb2_grpc.add_PolicyStatusServiceServicer_to_server(status_servicer, server)
        services.insert(1, STATUS_SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    credentials = server_credentials(settings.tls)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.address)
        else:
            port = server.add_secure_port(settings.address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"address {settings.address}: cannot bind ({exc})") from exc
    if port == 0:  # older grpcio reports a failed bind as port 0
        raise ConfigError(f"address {settings.address}: cannot bind")
    return server, port


class _Unparseable:
    """Stands in for a request protobuf could not parse (too deeply nested, invalid UTF-8)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Unparseable(str(exc))

    return deserialize


class Aborted(PolicyEngineError):
    """Raised by `_SyncContext.abort*`: the asyncio adapter then awaits the real abort."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


class _SyncContext:
    """An asyncio call's context as a synchronous servicer sees it (its `abort` raises, as
    the sync server's does; everything else is the real context's)."""

    __slots__ = ("_context",)

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise Aborted(Status(code, details))

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise Aborted(status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _add_pdp_servicer(
    servicer: pdp_pb2_grpc.PolicyDecisionServiceServicer, server: grpc.aio.Server, docs: str
) -> None:
    """Like the generated `add_..._to_server`, but an unparseable request is INVALID_ARGUMENT,
    and every handler is a coroutine on the loop.

    gRPC would answer INTERNAL ("Exception deserializing request!"), which tells the broker
    nothing; the request is the client's fault and should say so, with the usual details.
    Handlers that are coroutines (PolicyDecisionServicer's, EmptyServicer's) are awaited; a
    synchronous servicer's are called on the loop.
    """

    def guard(behavior: Callable[[Any, Any], Any]) -> Handler:
        native: Handler | None = behavior if inspect.iscoroutinefunction(behavior) else None

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request.__class__ is _Unparseable:
                await context.abort_with_status(
                    invalid_argument(
                        [("request", f"could not be parsed: {request.error}")], docs_url=docs
                    )
                )
            if native is not None:
                return await native(request, context)
            try:
                return behavior(request, _SyncContext(context))
            except Aborted as exc:
                await context.abort_with_status(exc.status)

        return handle

    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            guard(servicer.Check),
            request_deserializer=_lenient(pdp_pb2.CheckRequest.FromString),
            response_serializer=pdp_pb2.CheckResponse.SerializeToString,
        ),
        "CheckBatch": grpc.unary_unary_rpc_method_handler(
            guard(servicer.CheckBatch),
            request_deserializer=_lenient(pdp_pb2.CheckBatchRequest.FromString),
            response_serializer=pdp_pb2.CheckBatchResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def serve(settings: Settings, *, early_sighup: Callable[[], bool] = _never) -> None:
    """Serve the policy decision service until SIGTERM/SIGINT; SIGHUP reloads the policies.

    Invalid policies at startup do not stop it: it serves NOT_SERVING (every Check denied
    with kontext_server_error) until the watcher or a SIGHUP loads a valid set.
    `early_sighup()`: whether a SIGHUP came before the server could take it (the `pdp`
    entry point holds SIGHUP from its first line; see cli/early.py); it is replayed as a
    reload once the store runs. Raises ConfigError for settings that cannot be served,
    StartFailed when a component could not start, SystemExit(1) when a worker failed or a
    stop left work undone.
    """
    serve_mode(settings, "policy", early_sighup=early_sighup)


def serve_mode(
    settings: Settings, mode: Mode, *, early_sighup: Callable[[], bool] = _never
) -> None:
    """Run `mode` ("policy" or the benchmark's "empty") in this process or in N workers.

    Settings come validated (`load_settings`: `workers` in range, well-formed addresses);
    what needs files or the combination of settings is refused here, before anything starts:
    the Redis signing keys, `bundle.not_before`, the port `workers` > 1 share
    (`config.shared_port_problems`, the one place that rule lives), then a port in use."""
    if mode == "policy" and redis_level_on(settings.cache):
        load_signing_keys(settings.cache)  # refused here, before any worker starts
    bundle_not_before(settings)  # likewise
    problems = shared_port_problems(settings)
    if problems:
        raise ConfigError("\n".join(problems))
    if settings.workers == 1:
        check_free(settings.address, "address")
        if settings.health_address:
            check_free(settings.health_address, "health_address")
        code = _run_worker(settings, mode, parent_pid=None, early_sighup=early_sighup)
    else:
        reservation = Reservation()
        try:
            reserve(settings.address, "address", reservation)
            if settings.health_address:
                reserve(settings.health_address, "health_address", reservation)
            code = _supervise(settings, mode, early_sighup=early_sighup)
        finally:
            reservation.close()
    if code:
        raise SystemExit(code)


# --- one server process --------------------------------------------------------------------


class ServerComponent:
    """A gRPC server (the decision port, or the plaintext health port) as a lifecycle
    `Component`: `bind()` (called by `start`, on the process's loop) builds and binds it,
    `start` starts it; `stop(deadline)` refuses new calls and lets those in flight finish for
    up to `grace` seconds (None: cancels them), bounded by the deadline, then runs
    `after_stop` (the servicer's own close)."""

    def __init__(
        self,
        name: str,
        address: str,
        bind: Callable[[], tuple[AsyncServer, int]],
        *,
        grace: float | None = STOP_GRACE_SECONDS,
        after_stop: Callable[[], object] | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.grace = grace
        self.port = 0
        self.server: AsyncServer | None = None
        self._bind = bind
        self._after_stop = after_stop
        self._state = State.NEW

    def start(self) -> None:
        """Raises ConfigError when the address cannot be bound."""
        if self._state is not State.NEW:
            return
        self._state = State.STARTING
        self.server, self.port = self._bind()
        self.server.start()
        self._state = State.RUNNING

    def stop(self, deadline: float) -> bool:
        if self._state in (State.STOPPING, State.STOPPED):
            return True
        self._state = State.STOPPING
        if self.server is not None:
            left = max(deadline - time.monotonic(), 0.0)
            self.server.stop(None if self.grace is None else min(self.grace, left))
        clean = True
        if self._after_stop is not None:
            clean = self._after_stop() is not False
        self._state = State.STOPPED
        return clean

    def status(self) -> ComponentStatus:
        state = self._state
        if state is State.RUNNING:
            listening = f"listening on {_display_address(self.address, self.port)}"
            return ComponentStatus(self.name, state, True, listening)
        return ComponentStatus(self.name, state, False)


@dataclass
class RunningServer:
    """One server process's components (see `build_components`): `start()` starts them in
    order, `stop()` stops them in reverse; health is derived from their statuses. The
    decision server, the store, its reloader, the servicer, the audit log, the cache and the
    metrics endpoint are kept for callers (tests, tools) that look at them."""

    lifecycle: Lifecycle
    health: Health
    grpc: ServerComponent
    health_grpc: ServerComponent | None = None
    store: PolicyStore | None = None
    reloader: PolicyReloader | None = None
    servicer: PolicyDecisionServicer | None = None
    audit: AuditLog | None = None
    cache: DecisionCache | None = None
    metrics: MetricsEndpoint | None = None
    shutdown_wait: float = 0.0  # seconds of NOT_SERVING before new calls are refused

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def health_port(self) -> int | None:
        """The plaintext health port (`health_address`), None without one."""
        return self.health_grpc.port if self.health_grpc is not None else None

    @property
    def health_server(self) -> ServerComponent | None:
        return self.health_grpc

    def start(self) -> None:
        """Start every component in order; on a failure, stop those started and raise (see
        `Lifecycle.start`)."""
        self.lifecycle.start()

    def reload(self, reason: str = "SIGHUP") -> None:
        """Ask for a full reload, every file read anew (done off this thread); safe to call
        from a signal handler."""
        if self.reloader is not None:
            self.reloader.request(reason, full=True)

    def stop(self, grace: float | None = STOP_GRACE_SECONDS) -> bool:
        """Health NOT_SERVING at once; calls still taken for `shutdown_wait` seconds
        (`transport.shutdown_wait_ms`); then every component stopped in reverse: metrics, the
        servers (new calls refused, those in flight answered for up to `grace` seconds), the
        store, the JWKS fetcher, the cache, the audit log (drained: every decision answered
        before this returns is in the log, within AUDIT_CLOSE_SECONDS more). False when a
        component left work undone (logged)."""
        self.health.enter_graceful_shutdown()
        if self.shutdown_wait > 0:
            log.info("NOT_SERVING; still answering for %.1fs before stopping", self.shutdown_wait)
            time.sleep(self.shutdown_wait)
        self.grpc.grace = grace
        return self.lifecycle.stop(deadline_in((grace or 0.0) + AUDIT_CLOSE_SECONDS))


def build_components(
    settings: Settings, mode: Mode = "policy", *, worker: int = 0, serve_metrics: bool = False
) -> RunningServer:
    """Every component of one server process, built from `settings` and not started, in the
    order they start: the event loop, tracing (`tracing.enabled`), the audit log
    (`audit.enabled`), the decision cache
    (when caching is on), the quota counter store (Redis, or in-process), the JWKS fetcher,
    the policy store with its reloader and watcher, the decision server, the health server
    (`health_address`), the metrics endpoint (with `serve_metrics` and a `metrics_address`:
    a lone process serves its own, a supervisor its workers'). Mode "empty" (the
    benchmark's servicer) has the loop and the servers.

    Nothing here starts a thread or opens anything; what is read is what must stop a start
    before anything runs (the bundle key file, the Redis signing keys): ConfigError naming
    the setting. `worker` numbers this process's audit file when several share a port.
    """
    loop = process_event_loop()
    lifecycle = Lifecycle([loop])
    health = Health(loop, readiness=lifecycle.ready)
    if mode == "empty":
        from policy_engine.server.empty import EmptyServicer

        empty = EmptyServicer()
        server = ServerComponent(
            "grpc_server",
            settings.address,
            lambda: build_server(empty, settings, health_servicer=health),
        )
        lifecycle.add(server)
        running = RunningServer(lifecycle, health, server)
        _add_health_server(running, settings)
        return running

    audit = (
        AuditLog(settings.audit, worker=worker, required=settings.audit.required)
        if settings.audit.enabled
        else None
    )
    tracing = tracing_from_settings(settings)  # None when off: nothing of it imported
    cache = cache_from_settings(settings)
    quotas = quota_store_from_settings(settings)
    jwks = RemoteKeySets(wrap_fetch=None if tracing is None else tracing.traced_fetch)
    store = PolicyStore(
        DirectoryBackend(
            settings.policy_dir,
            bundle_public_key=bundle_public_key(settings),
            bundle_not_before=bundle_not_before(settings),
            limits=settings.policy_limits,
            remote_keys=jwks,
        )
    )
    reloader = PolicyReloader(
        store,
        watch=settings.reload.watch,
        debounce_ms=settings.reload.debounce_ms,
        resync_seconds=settings.reload.resync_seconds,
    )
    make_servicer = PolicyDecisionServicer if tracing is None else tracing.servicer
    servicer = make_servicer(store.current, settings, cache=cache, audit=audit, quotas=quotas)
    status = PolicyStatusServicer(store, lambda: reloader.watching, lifecycle.statuses)
    server = ServerComponent(
        "grpc_server",
        settings.address,
        lambda: build_server(servicer, settings, health_servicer=health, status_servicer=status),
        after_stop=servicer.close,
    )
    # Tracing first: it is stopped last, exporting the spans of the last calls.
    for component in (tracing, audit, cache, quotas, jwks, reloader, server):
        if component is not None:
            lifecycle.add(component)
    running = RunningServer(
        lifecycle, health, server, None, store, reloader, servicer, audit, cache
    )
    running.shutdown_wait = settings.transport.shutdown_wait_ms / 1000
    _add_health_server(running, settings)
    if serve_metrics and settings.metrics_address:
        running.metrics = MetricsEndpoint(settings.metrics_address, optional=True)
        lifecycle.add(running.metrics)
    return running


def start_server(
    settings: Settings, mode: Mode = "policy", *, worker: int = 0, serve_metrics: bool = False
) -> RunningServer:
    """`build_components`, then started: a running server (whose policies may still be
    invalid: it is then NOT_SERVING and denies). Raises what `RunningServer.start` raises,
    with every component it had started stopped again."""
    running = build_components(settings, mode, worker=worker, serve_metrics=serve_metrics)
    running.start()
    return running


def _add_health_server(running: RunningServer, settings: Settings) -> None:
    """Serve the process's health service on `settings.health_address` too."""
    if not settings.health_address:
        return
    runner = process_event_loop()

    def bind() -> tuple[AsyncServer, int]:
        aio, port = runner.call(_build_health_server(running.health, settings), LOOP_START_SECONDS)
        return AsyncServer(runner, aio), port

    running.health_grpc = ServerComponent(
        "health_server", settings.health_address, bind, grace=None
    )
    running.lifecycle.add(running.health_grpc)


async def _build_health_server(
    health_servicer: Health, settings: Settings
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", reuse_port(settings.workers)), *transport_options(settings)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer.servicer, server)
    try:
        port = server.add_insecure_port(settings.health_address)
    except RuntimeError as exc:
        port = 0
        error: Exception | None = exc
    else:
        error = None
    if port == 0:
        raise ConfigError(f"health_address {settings.health_address}: cannot bind ({error})")
    return server, port


def _run_worker(
    settings: Settings,
    mode: Mode,
    *,
    parent_pid: int | None,
    worker: int = 0,
    early_sighup: Callable[[], bool] = _never,
) -> int:
    """Serve until signalled (or orphaned); returns the process exit code: 0, or
    EXIT_WORKER_FAILED when the stop left work undone (audit records, cache writes)."""
    # Handlers first, so a signal during the initial load is not lost (or fatal): a SIGHUP
    # that arrives before the reloader exists is replayed to it once the server is up.
    stop = threading.Event()
    early_reload = threading.Event()
    reload_target: list[Callable[[], None]] = [early_reload.set]
    _install_handlers(stop.set, on_reload=lambda: reload_target[0]())
    if early_sighup():  # held by the entry point before this process could reload
        early_reload.set()
    # A lone process serves its own metrics; workers' metrics are served by the supervisor.
    running = start_server(
        settings, mode, worker=worker, serve_metrics=mode == "policy" and parent_pid is None
    )
    try:
        reload_target[0] = running.reload
        if early_reload.is_set():
            log.info("a SIGHUP received while starting: reloading")
            running.reload("SIGHUP during startup")
        _log_serving(running, settings, mode)
        # A timed wait keeps signal handlers responsive and lets an orphaned worker notice.
        while not stop.wait(1.0):
            if parent_pid is not None and os.getppid() != parent_pid:
                log.error("supervisor %d is gone; shutting down", parent_pid)
                break
        log.info("shutting down (pid %d), grace %.0fs", os.getpid(), STOP_GRACE_SECONDS)
    finally:
        clean = running.stop(STOP_GRACE_SECONDS)
        _ignore_stop_signals()
    if not clean:
        log.error("stopped with work left undone (see the errors above)")
        return EXIT_WORKER_FAILED
    return 0


def _log_serving(running: RunningServer, settings: Settings, mode: Mode) -> None:
    if running.store is None:
        revision, organizations = "empty", "-"
    else:
        status = running.store.status()
        revision = status.revision or "none (NOT_SERVING: every Check is denied)"
        organizations = ",".join(status.organizations) or "-"
    log.info(
        "serving %s on %s (pid %d) revision=%s organizations=%s watching=%s",
        "kontext.pdp.v1 (EMPTY benchmark servicer)" if mode == "empty" else "kontext.pdp.v1",
        _display_address(settings.address, running.port),
        os.getpid(),
        revision,
        organizations,
        "yes" if running.reloader is not None and running.reloader.watch else "no",
    )
    if running.health_port is not None:
        log.info(
            "health (plaintext, grpc.health.v1 only) on %s",
            _display_address(settings.health_address, running.health_port),
        )


def _display_address(address: str, port: int) -> str:
    host, sep, _ = address.rpartition(":")
    return f"{host}:{port}" if sep else address


def _ignore_stop_signals() -> None:
    """Once the stop is done: SIGTERM, SIGINT and SIGHUP are ignored until the process ends.

    Python's exit restores the default action for every signal with a Python handler, and
    the default ends the process: a second SIGTERM from a process manager (or a repeated
    Ctrl-C, or a SIGHUP) during the exit's last milliseconds turned a clean stop into a
    death by signal (a worker's made its supervisor exit 1). An ignored signal stays
    ignored. Main thread only, as `_install_handlers`."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def _exit_description(code: int | None) -> str:
    """A worker's exit code as words: `code N`, or the signal that ended it."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _install_handlers(
    on_signal: Callable[[], None], on_reload: Callable[[], None] | None = None
) -> None:
    """SIGTERM/SIGINT call `on_signal`, SIGHUP `on_reload` (which must only set an event);
    skipped off the main thread (e.g. serving in tests)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        on_signal()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if on_reload is not None:
        # No logging here: a signal handler must not take locks the main thread may hold.
        signal.signal(signal.SIGHUP, lambda signum, frame: on_reload())


# --- several server processes --------------------------------------------------------------


def _worker_main(settings: Settings, mode: Mode, parent_pid: int, worker: int) -> None:
    """Entry point of a spawned worker: a fresh interpreter, so logging is configured anew."""
    setup_logging(settings.log_level, settings.log_format, process=True)
    try:
        code = _run_worker(settings, mode, parent_pid=parent_pid, worker=worker)
    except (ConfigError, StartFailed) as exc:  # e.g. a port: one clear line, no traceback
        log.error("%s", exc)
        code = EXIT_WORKER_FAILED
    except KeyboardInterrupt:  # Ctrl-C reached the worker before its handlers: quietly
        code = EXIT_INTERRUPTED
    raise SystemExit(code)


def _supervise(settings: Settings, mode: Mode, *, early_sighup: Callable[[], bool] = _never) -> int:
    """Start `settings.workers` processes on one port, serve their metrics, wait for them all.

    Forwards SIGTERM/SIGINT (stop) and SIGHUP (reload) to every worker.

    Workers are started with 'spawn', not 'fork': gRPC's core keeps threads and polling
    state that do not survive a fork, so a forked child is only safe if the parent never
    initialised gRPC, which a parent cannot promise once it has been imported by tests, the
    CLI or a benchmark harness. A spawned worker is a fresh interpreter, which is always safe;
    the cost is a second or so of start-up, once.

    If a worker dies on its own, the others are stopped and the supervisor exits non-zero, so
    the process manager (systemd, Kubernetes) restarts the whole unit rather than it serving
    on fewer cores unnoticed. The supervisor's own components (the aggregated metrics
    endpoint) start before the workers and stop after them.
    """
    # Before spawning: the workers inherit PROMETHEUS_MULTIPROC_DIR from os.environ.
    metrics = (
        MetricsEndpoint(settings.metrics_address, multiprocess=True, optional=True)
        if mode == "policy" and settings.metrics_address
        else None
    )
    lifecycle = Lifecycle([metrics] if metrics is not None else [])
    lifecycle.start()
    try:
        return _supervise_workers(settings, mode, metrics, early_sighup)
    finally:
        lifecycle.stop(deadline_in(STOP_GRACE_SECONDS))
        _ignore_stop_signals()


def _supervise_workers(
    settings: Settings,
    mode: Mode,
    metrics_endpoint: MetricsEndpoint | None,
    early_sighup: Callable[[], bool],
) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    stopping = threading.Event()

    def stop_all() -> None:
        stopping.set()
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    def reload_all() -> None:
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGHUP)

    _install_handlers(stop_all)
    # Spawned workers inherit an ignored SIGHUP (a Python handler would not survive exec), so a
    # reload forwarded while a worker is still starting cannot kill it.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for index in range(settings.workers):
        if stopping.is_set():
            break
        worker = ctx.Process(
            target=_worker_main,
            args=(settings, mode, os.getpid(), index),
            name=f"pdp-worker-{index}",
        )
        worker.start()
        procs.append(worker)
    _install_handlers(stop_all, on_reload=reload_all)
    if stopping.is_set():
        stop_all()
    elif early_sighup():  # held by the entry point: the workers reload what they loaded
        reload_all()
    log.info("supervising %d workers on %s", len(procs), settings.address)

    failed = False
    kill_at: float | None = None
    while True:
        running = [p for p in procs if p.exitcode is None]
        if not running:
            break
        if stopping.is_set():
            # A worker gets its grace period plus some slack, then is killed.
            if kill_at is None:
                kill_at = (
                    time.monotonic()
                    + settings.transport.shutdown_wait_ms / 1000
                    + STOP_GRACE_SECONDS
                    + AUDIT_CLOSE_SECONDS
                    + 10.0
                )
            elif time.monotonic() > kill_at:
                for proc in running:
                    log.error("worker %s did not stop in time; killing it", proc.name)
                    proc.kill()
                failed = True
        else:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                for proc in dead:
                    log.error(
                        "worker %s exited with %s", proc.name, _exit_description(proc.exitcode)
                    )
                failed = True
                stop_all()
        multiprocessing.connection.wait([p.sentinel for p in running], timeout=1.0)
    for proc in procs:
        proc.join()
        if metrics_endpoint is not None and proc.pid is not None:
            metrics_endpoint.mark_worker_dead(proc.pid)
        if stopping.is_set() and proc.exitcode != 0:  # an unclean stop says which and how
            log.error("worker %s stopped with %s", proc.name, _exit_description(proc.exitcode))
    if failed or any(p.exitcode != 0 for p in procs):
        return EXIT_WORKER_FAILED
    return 0
