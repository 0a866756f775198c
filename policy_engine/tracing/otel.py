"""OpenTelemetry for the server: imported only when `tracing.enabled` (see the package doc).

Spans (README, Tracing, lists their attributes; `pdp.*` are this project's):

- `kontext.pdp.v1.PolicyDecisionService/Check` and `.../CheckBatch` (SERVER): `rpc.system`,
  `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, and the decision (`CallObserver`);
- `pdp.cache.lookup`, with the Redis level's `GET` / `MGET` (CLIENT) below it;
- `pdp.evaluate`, when an item was not a cache hit;
- `pdp.quota.consume`, when a quota matches an ALLOW;
- `GET` (CLIENT) for a JWKS or issuer metadata fetch: a trace of its own, linked to the call
  that started it, if any.

Identifiers from the request (organization, request ID) are cut to `limits.max_id_length`
characters: a request refused as invalid may hold anything.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from policy_engine import __version__
from policy_engine.api import pdp_pb2
from policy_engine.cache import DecisionCache, Hit
from policy_engine.config import ConfigError, Settings, mask_url
from policy_engine.decision.outcome import CacheHit, Decisions
from policy_engine.decision.pipeline import Decider, DecisionStore, Observer
from policy_engine.lifecycle import ComponentStatus, State
from policy_engine.server.service import SERVICE_NAME, AsyncContext, PolicyDecisionServicer

if TYPE_CHECKING:
    from policy_engine.auth.discovery import Fetch
    from policy_engine.cache.redis_backend import RedisBackend
    from policy_engine.policy import CompiledPolicySet
    from policy_engine.quota import Charge, Verdict

log = logging.getLogger(__name__)

TRACER_NAME = "policy_engine"
MAX_ORGANIZATIONS = 16  # distinct organizations named on a CheckBatch span
# W3C Trace Context: what a traceparent may be at most (its own limit), what of tracestate is
# kept (the 512 characters every vendor must propagate, at most 32 members).
MAX_TRACEPARENT = 512
MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBERS = 32
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z0-9][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
# gRPC codes a server span reports as an error (OpenTelemetry's RPC conventions for gRPC).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_EFFECTS = {pdp_pb2.EFFECT_ALLOW: "ALLOW", pdp_pb2.EFFECT_DENY: "DENY"}
# OpenTelemetry's own variables that the batch processor and the OTLP exporter parse when they
# are built. The SDK logs a traceback and falls back to its default for one it cannot parse,
# or refuses to start with a message that does not name it: they are checked first.
_OTEL_WHOLE = (  # counts, and milliseconds
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
)
_OTEL_SECONDS = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
# The exporter's headers (OTLP Exporter specification, "Specifying headers via environment
# variables": W3C Baggage's `name=value` list; values URL-encoded, unencoded ones taken too as
# the SDK takes them). The SDK logs a malformed entry whole, and it may hold a credential.
_OTEL_HEADERS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
_HEADER_ENTRY = re.compile(
    r"[ \t]*[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+[ \t]*="
    r"[ \t]*[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*[ \t]*"
)
_HEADER_DELIMITER = re.compile(r"[ \t]*,[ \t]*")
# PEM files of the exporter's TLS: one it cannot read is logged with a traceback and TLS goes
# on with the system's roots instead of the CA it was given (and a FIFO would block the start).
_OTEL_FILES = tuple(
    f"OTEL_EXPORTER_OTLP_{signal}{name}"
    for signal in ("", "TRACES_")
    for name in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE")
)
_MAX_WHOLE = 2**31 - 1


def otel_environment_problems(environ: Mapping[str, str], *, otlp: bool) -> list[str]:
    """What is wrong with the OpenTelemetry variables in `environ` that the batch processor
    (`OTEL_BSP_*`: whole numbers from 1) and, when `otlp`, the OTLP exporter
    (`OTEL_EXPORTER_OTLP_TIMEOUT`, `..._TRACES_TIMEOUT`: seconds, finite and above 0; its
    `..._HEADERS`: `name=value` entries separated by commas, never quoted back; its TLS
    files `..._CERTIFICATE`, `..._CLIENT_KEY`, `..._CLIENT_CERTIFICATE`: readable regular
    files) read; one line per variable, empty when nothing is. An unset variable is the SDK's
    default."""
    problems: list[str] = []
    whole: dict[str, int] = {}
    for name in _OTEL_WHOLE:
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if not 1 <= value <= _MAX_WHOLE:
            problems.append(
                f"variable {name}: expected a whole number from 1 to {_MAX_WHOLE}, got {raw[:40]!r}"
            )
        else:
            whole[name] = value
    queue = whole.get("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    batch = whole.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)  # the SDK's defaults, unclamped
    if batch > queue:
        problems.append(
            f"variables OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}) and OTEL_BSP_MAX_QUEUE_SIZE "
            f"({queue}): a batch must fit in the queue (unset, they are 512 and 2048)"
        )
    for name in _OTEL_SECONDS if otlp else ():
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            problems.append(
                f"variable {name}: expected seconds, a finite number above 0, got {raw[:40]!r}"
            )
    for name in _OTEL_HEADERS if otlp else ():
        entries = [e for e in _HEADER_DELIMITER.split(environ.get(name, "")) if e]
        bad = [i for i, e in enumerate(entries, 1) if not _HEADER_ENTRY.fullmatch(e.strip())]
        if bad:
            which = f"entry {bad[0]}" if len(bad) == 1 else f"entries {', '.join(map(str, bad))}"
            problems.append(
                f"variable {name}: {which} of {len(entries)} not name=value (values URL-encoded);"
                " not shown: a header may hold a credential"
            )
    for name in _OTEL_FILES if otlp else ():
        path = environ.get(name)
        if path is not None and (problem := _file_problem(path)) is not None:
            problems.append(f"variable {name}: {path[:200]!r}: {problem}")
    return problems


def _file_problem(path: str) -> str | None:
    """Why `path` is not a regular file this process can read, None if it is (opened without
    blocking: a FIFO or a device is refused unread)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        return f"cannot read it ({exc.strerror if isinstance(exc, OSError) else exc})"
    try:
        return None if stat.S_ISREG(os.fstat(fd).st_mode) else "not a regular file"
    finally:
        os.close(fd)


_PROPAGATOR = TraceContextTextMapPropagator()


def _tracestate_ok(values: Sequence[str]) -> bool:
    """Whether the tracestate members (RFC 9110 list syntax) are W3C members, at most
    `MAX_TRACESTATE_MEMBERS` in `MAX_TRACESTATE` characters: the propagator then parses them
    without logging (it logs every malformed value, which a caller could use to flood logs)."""
    if sum(len(v) for v in values) + len(values) - 1 > MAX_TRACESTATE:
        return False
    members = [m.strip(" \t") for v in values for m in v.split(",")]
    members = [m for m in members if m]
    return len(members) <= MAX_TRACESTATE_MEMBERS and all(
        _TRACESTATE_MEMBER.fullmatch(m) for m in members
    )


class MetadataGetter(Getter[Sequence[tuple[str, Any]]]):
    """W3C trace context from gRPC call metadata (lower-case keys; `-bin` values are bytes
    and never read). More than one `traceparent`, or one longer than W3C allows, is no
    parent; a tracestate that is not a valid W3C list is dropped (the parent is kept)."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        if not values:
            return None
        if key == "traceparent":
            return values if len(values) == 1 and len(values[0]) <= MAX_TRACEPARENT else None
        if key == "tracestate":
            return values if _tracestate_ok(values) else None
        return values

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = MetadataGetter()


def parent_context(metadata: Sequence[tuple[str, Any]] | None) -> Context:
    """The broker's trace context from call metadata; an empty context (a new trace) when it
    sent none or a malformed one. Never raises."""
    try:
        return _PROPAGATOR.extract(metadata or (), getter=_GETTER)
    except Exception:  # a propagator bug must not fail a call: no parent then
        return Context()


def current_ids() -> tuple[str, str] | None:
    """(trace ID, span ID) in lower-case hex (32 and 16 digits) of the current span, None
    when no span is active."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format_trace_id(ctx.trace_id), format_span_id(ctx.span_id)


def display_url(url: str) -> tuple[str, str, int | None]:
    """(url.full without credentials, query or fragment; host; port) of a fetched URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "", "", None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}{parts.path}", host, port


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def child_span(
    tracer: trace.Tracer, name: str, attributes: dict[str, Any], kind: SpanKind = SpanKind.INTERNAL
) -> AbstractContextManager[trace.Span]:
    """A span below the current one, current while it is open; when the current span records
    nothing (its trace is not sampled) a no-op stand-in, so an unsampled call pays for no
    child span (the sampler would drop each anyway: ParentBased)."""
    if not trace.get_current_span().is_recording():
        return nullcontext(trace.INVALID_SPAN)
    return tracer.start_as_current_span(name, kind=kind, attributes=attributes)


class CallObserver:
    """The first observer of a traced pipeline: stamps the call's trace and span IDs on its
    `Decisions` (the audit recorder copies them into each record) and sets the decision's
    attributes on the call's span. Never raises, never waits."""

    def __init__(self, max_id_length: int) -> None:
        self._max_id = max_id_length

    def admit(self, count: int, deadline: float | None) -> None:
        return None

    def observe(self, decisions: Decisions) -> None:
        try:
            span = trace.get_current_span()
            ctx = span.get_span_context()
            if not ctx.is_valid:
                return
            decisions.trace = (format_trace_id(ctx.trace_id), format_span_id(ctx.span_id))
            if span.is_recording():
                span.set_attributes(self.attributes(decisions))
        except Exception:  # tracing never fails a call
            log.exception("tracing: describing a call on its span failed")

    def attributes(self, decisions: Decisions) -> dict[str, Any]:
        """The `pdp.*` attributes of a call's span (see the module docstring)."""
        limit = self._max_id
        outcomes = decisions.outcomes
        attributes: dict[str, Any] = {"pdp.cache_level": decisions.level}
        if len(outcomes) == 1:
            response = decisions.only()
            item = outcomes[0].item
            results: Sequence[pdp_pb2.CheckResponse] = (response,)
            attributes["pdp.organization"] = _cut(item.organization, limit)
            attributes["pdp.decision"] = _EFFECTS.get(response.effect, "DENY")
            attributes["pdp.decision_id"] = response.decision_id
            attributes["pdp.request_id"] = _cut(item.request_id, limit)
        else:
            results = decisions.batch().results
            organizations = list(dict.fromkeys(o.item.organization for o in outcomes))
            attributes["pdp.organizations"] = [
                _cut(o, limit) for o in organizations[:MAX_ORGANIZATIONS]
            ]
            allowed = sum(1 for r in results if r.effect == pdp_pb2.EFFECT_ALLOW)
            attributes["pdp.decision.allow_count"] = allowed
            attributes["pdp.decision.deny_count"] = len(results) - allowed
            attributes["pdp.batch.size"] = len(outcomes)
        codes = dict.fromkeys(reason.code for r in results for reason in r.reasons)
        attributes["pdp.reason_codes"] = list(codes)
        attributes["pdp.policy_revision"] = results[0].policy_revision if results else ""
        return attributes


class TracedRedis:
    """The cache's Redis backend with a CLIENT span around each lookup (GET, MGET); every
    other attribute is the backend's own."""

    def __init__(self, backend: RedisBackend, tracer: trace.Tracer) -> None:
        self._backend = backend
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def get(self, key: str) -> bytes | None:
        with child_span(
            self._tracer,
            "GET",
            {"db.system.name": "redis", "db.operation.name": "GET"},
            SpanKind.CLIENT,
        ):
            return await self._backend.get(key)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        with child_span(
            self._tracer,
            "MGET",
            {
                "db.system.name": "redis",
                "db.operation.name": "MGET",
                "db.operation.batch.size": len(keys),
            },
            SpanKind.CLIENT,
        ):
            return await self._backend.mget(keys)


class TracedDecider(Decider):
    """The pipeline with child spans for its cache lookup, evaluation and quota count (see
    the module docstring); it decides exactly as `Decider` does, calling its steps."""

    def __init__(self, *args: Any, tracer: trace.Tracer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tracer = tracer
        cache = self.cache
        # The Redis level's lookups get spans (once: a cache shared by two deciders).
        if (
            isinstance(cache, DecisionCache)
            and cache.redis is not None
            and not isinstance(cache.redis, TracedRedis)
        ):
            cache.redis = TracedRedis(cache.redis, tracer)  # type: ignore[assignment]

    async def _lookup(
        self,
        cache: DecisionStore,
        items: Sequence[pdp_pb2.CheckRequest],
        ids: list[bytes],
        policies: CompiledPolicySet,
        now_ts: float,
        deadline: float | None,
    ) -> tuple[list[str | None] | None, list[Hit | None] | None]:
        with child_span(self._tracer, "pdp.cache.lookup", {"pdp.item_count": len(items)}) as span:
            keys, hits = await super()._lookup(cache, items, ids, policies, now_ts, deadline)
            if hits is not None:
                span.set_attribute("pdp.cache.hits", sum(1 for h in hits if h is not None))
            else:
                span.set_attribute("pdp.cache.result", "fault" if keys is None else "bypass")
            return keys, hits

    def _decide(self, *args: Any) -> Decisions:
        """`Decider._decide` (same arguments: items, ids, keys, hits, ...) in an evaluation
        span, unless every item is a cache hit."""
        hits: list[Hit | None] | None = args[3]
        if hits is not None and None not in hits:
            return super()._decide(*args)  # every item a hit: nothing is evaluated
        with child_span(self._tracer, "pdp.evaluate", {"pdp.item_count": len(args[0])}) as span:
            decisions = super()._decide(*args)
            evaluated = sum(1 for o in decisions.outcomes if not isinstance(o, CacheHit))
            span.set_attribute("pdp.evaluated", evaluated)
            return decisions

    async def _consume(
        self, items: list[tuple[Charge, ...]], deadline: float | None
    ) -> list[Verdict]:
        with child_span(self._tracer, "pdp.quota.consume", {"pdp.quota.items": len(items)}) as span:
            verdicts = await super()._consume(items, deadline)
            span.set_attribute("pdp.quota.admitted", sum(1 for v in verdicts if v.admitted))
            span.set_attribute("pdp.quota.unavailable", sum(1 for v in verdicts if v.unavailable))
            return verdicts


class TracedServicer(PolicyDecisionServicer):
    """The servicer with a SERVER span around each call (see the module docstring); its
    pipeline is a `TracedDecider` (built by `PolicyDecisionServicer` through `tracing`)."""

    def __init__(self, *args: Any, tracing: Tracing, **kwargs: Any) -> None:
        super().__init__(*args, tracing=tracing, **kwargs)
        self._tracing = tracing

    async def Check(
        self, request: pdp_pb2.CheckRequest, context: AsyncContext
    ) -> pdp_pb2.CheckResponse:
        with self._tracing.rpc_span("Check", context):
            return await super().Check(request, context)

    async def CheckBatch(
        self, request: pdp_pb2.CheckBatchRequest, context: AsyncContext
    ) -> pdp_pb2.CheckBatchResponse:
        with self._tracing.rpc_span("CheckBatch", context):
            return await super().CheckBatch(request, context)


def _status_of(context: Any) -> grpc.StatusCode | None:
    """The code a handler aborted with (grpc.aio's context keeps it), None if unknown."""
    try:
        code = context.code()
    except Exception:
        return None
    return code if isinstance(code, grpc.StatusCode) else None


class Tracing:
    """The "tracing" component (see the package docstring). The constructor builds the tracer
    provider (resource, sampler) and checks that the exporter can be built, with no I/O and
    no thread; `start()` adds the batch exporter and puts span IDs into log records;
    `stop(deadline)` exports what is queued until `deadline`, then shuts the exporter down.
    With a `provider` given (`use_tracer_provider`) no exporter is added and the provider is
    left running: it is its owner's. Raises ConfigError when the exporter's package is
    missing or an OpenTelemetry variable the SDK would read is malformed (one line each, see
    `otel_environment_problems`)."""

    name = "tracing"

    def __init__(self, settings: Settings, *, provider: TracerProvider | None = None) -> None:
        self.settings = settings.tracing
        self._max_id = settings.limits.max_id_length
        self._owned = provider is None
        if provider is None:
            ratio = self.settings.sample_ratio
            provider = TracerProvider(
                resource=Resource.create(
                    {"service.name": self.settings.service_name, "service.version": __version__}
                ),
                sampler=ParentBased(TraceIdRatioBased(ratio)),
                # `stop` shuts it down within its deadline. The SDK's exit hook would shut it
                # down again at interpreter exit and wait, past any deadline, for an export a
                # collector that accepts and never answers holds (30 s, then the exporter's
                # timeout): a pod SIGKILLed at the end of its grace period.
                shutdown_on_exit=False,
            )
            self._exporter_class()  # a missing package is a setting problem: say so now
            problems = otel_environment_problems(os.environ, otlp=self.settings.exporter == "otlp")
            if problems:
                raise ConfigError("\n".join(problems))
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME, __version__)
        self._state = State.NEW
        self._lock = threading.Lock()
        self._detail = ""
        self._log_factory: Callable[..., logging.LogRecord] | None = None
        self._span_exporter: SpanExporter | None = None

    # --- what the server builds with it ----------------------------------------------------------

    def servicer(self, *args: Any, **kwargs: Any) -> TracedServicer:
        """A traced `PolicyDecisionServicer` (same arguments)."""
        return TracedServicer(*args, tracing=self, **kwargs)

    def decider(self, *args: Any, observers: Sequence[Observer] = (), **kwargs: Any) -> Decider:
        """A traced `Decider` (same arguments): its first observer stamps trace IDs."""
        stamped: list[Observer] = [CallObserver(self._max_id), *observers]
        return TracedDecider(*args, observers=stamped, tracer=self.tracer, **kwargs)

    def traced_fetch(self, fetch: Fetch) -> Fetch:
        """`fetch` (a JWKS or metadata GET) with a CLIENT span of its own trace, linked to the
        span that was current when it started (a call that needed fresh keys), if any."""
        tracer = self.tracer

        async def fetch_traced(url: str, timeout: float) -> bytes:
            started_by = trace.get_current_span().get_span_context()
            full, host, port = display_url(url)
            attributes: dict[str, Any] = {"http.request.method": "GET", "url.full": full}
            if host:
                attributes["server.address"] = host
            if port is not None:
                attributes["server.port"] = port
            with tracer.start_as_current_span(
                "GET",
                context=Context(),  # a background fetch: a trace of its own
                kind=SpanKind.CLIENT,
                links=[Link(started_by)] if started_by.is_valid else None,
                attributes=attributes,
            ) as span:
                body = await fetch(url, timeout)
                span.set_attribute("http.response.body.size", len(body))
                return body

        return fetch_traced

    @contextmanager
    def rpc_span(self, method: str, context: AsyncContext) -> Iterator[trace.Span]:
        """A SERVER span for one call of `method`, current while the handler runs, a child
        of the broker's trace context when it sent one; its gRPC status set on the way out."""
        try:
            metadata = context.invocation_metadata()  # type: ignore[attr-defined]
        except Exception:  # a context without metadata (in-process callers)
            metadata = None
        with self.tracer.start_as_current_span(
            f"{SERVICE_NAME}/{method}",
            context=parent_context(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": method},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                code = _status_of(context)
                if code is None:  # not an abort: a cancelled call, or a bug
                    cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
                    code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
                    if not cancelled:
                        span.record_exception(exc)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
                raise
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])

    # --- the component ------------------------------------------------------------------------

    def _exporter_class(self) -> Callable[..., SpanExporter]:
        if self.settings.exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigError(
                "setting tracing.exporter: otlp needs opentelemetry-exporter-otlp-proto-grpc "
                f"({exc.name or exc}); install the tracing extra: "
                "pip install 'policy-engine[tracing]'"
            ) from None
        return OTLPSpanExporter

    def _exporter(self) -> SpanExporter:
        make = self._exporter_class()
        endpoint = self.settings.otlp_endpoint.strip()
        if self.settings.exporter == "console" or not endpoint:
            return make()
        return make(endpoint=endpoint, insecure=endpoint.lower().startswith("http://"))

    def start(self) -> None:
        """Add the batch exporter (its thread starts) and the log records' span IDs."""
        with self._lock:
            if self._state is not State.NEW:
                return
            if self._owned:
                self._span_exporter = self._exporter()
                self.provider.add_span_processor(BatchSpanProcessor(self._span_exporter))
            self._install_log_ids()
            where = self._endpoint_shown()
            self._detail = (
                "spans to the console"
                if self.settings.exporter == "console"
                else f"spans over OTLP/gRPC to {where}"
            )
            if not self._owned:
                self._detail = "spans to the provider the embedding program set"
            elif os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
                # The SDK's provider then hands out no-op tracers: no span, no trace IDs in
                # audit records or logs, whatever the settings say.
                self._detail = "no spans: OTEL_SDK_DISABLED=true turns OpenTelemetry's SDK off"
            self._state = State.RUNNING

    def stop(self, deadline: float) -> bool:
        """Export the queued spans until `deadline` (`time.monotonic()` s), then shut the
        exporter down; False when that did not end in time. Log records stop carrying IDs."""
        with self._lock:
            if self._state in (State.STOPPED, State.STOPPING):
                return True
            started = self._state is State.RUNNING
            self._state = State.STOPPING
        self._remove_log_ids()
        clean = True
        if started and self._owned:
            # The processor's shutdown exports what is queued, then shuts the exporter down.
            # Its export blocks the thread that runs it for as long as a collector that does
            # not answer holds it (the exporter's timeout, OTEL_EXPORTER_OTLP_TIMEOUT, and its
            # retries; the processor's force_flush ignores its own timeout): it runs on a
            # thread of its own, waited for up to the deadline.
            worker = threading.Thread(
                target=self.provider.shutdown, name="pdp-tracing-stop", daemon=True
            )
            worker.start()
            worker.join(max(deadline - time.monotonic(), 0.0))
            clean = not worker.is_alive()
            if not clean:
                log.warning("tracing: spans still queued at shutdown were not all exported")
                # Shutting the exporter down closes its channel, which ends the export in
                # flight at once: nothing of tracing outlives the deadline.
                self._abandon_export()
        with self._lock:
            self._state = State.STOPPED
        return clean

    def _endpoint_shown(self) -> str:
        """Where the OTLP exporter sends, as the status says it: the setting, else the
        OpenTelemetry variable the exporter reads (password masked, cut to 200 characters),
        else its default."""
        if self.settings.otlp_endpoint.strip():
            return self.settings.otlp_endpoint.strip()
        for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            value = os.environ.get(name, "").strip()
            if value:
                shown = mask_url(value)
                if "@" in shown:  # a user part mask_url did not recognize (no scheme)
                    shown = "***@" + shown.rpartition("@")[2]
                shown = shown if len(shown) <= 200 else shown[:200] + "..."
                return f"{shown!r} ({name})"
        return "localhost:4317 (the exporter's default)"

    def _abandon_export(self) -> None:
        exporter = self._span_exporter
        if exporter is None:
            return
        try:
            exporter.shutdown()
        except Exception:  # tracing never fails a stop: its spans are lost either way
            log.exception("tracing: shutting the span exporter down failed")

    def status(self) -> ComponentStatus:
        """Never blocks; always ready (a missing collector costs spans, not answers)."""
        sampled = f"sampling {self.settings.sample_ratio:g} of new traces"
        detail = f"{self._detail}, {sampled}" if self._detail else sampled
        return ComponentStatus(self.name, self._state, True, detail)

    def _install_log_ids(self) -> None:
        """Every log record made inside a span gets `trace_id` and `span_id` (hex) as
        attributes: JSON log lines carry them as fields (text lines do not show them)."""
        previous = logging.getLogRecordFactory()
        tracing = self

        def record_with_ids(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if tracing._log_factory is not None:
                ctx = trace.get_current_span().get_span_context()
                if ctx.is_valid:
                    record.trace_id = format_trace_id(ctx.trace_id)
                    record.span_id = format_span_id(ctx.span_id)
            return record

        self._log_factory = record_with_ids
        self._previous_factory = previous
        logging.setLogRecordFactory(record_with_ids)

    def _remove_log_ids(self) -> None:
        factory, self._log_factory = self._log_factory, None  # inert from now on
        if factory is not None and logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(self._previous_factory)


__all__ = [
    "CallObserver",
    "MetadataGetter",
    "TracedDecider",
    "TracedRedis",
    "TracedServicer",
    "Tracing",
    "current_ids",
    "display_url",
    "otel_environment_problems",
    "parent_context",
]
