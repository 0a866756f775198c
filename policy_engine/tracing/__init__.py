"""OpenTelemetry traces of the decision calls, off by default (setting `tracing.enabled`).

Off, nothing here imports OpenTelemetry and no call pays for it: `tracing_from_settings`
answers None, the server builds the plain servicer and pipeline, and the audit records and log
lines carry no trace fields. On (the `tracing` extra: `pip install 'policy-engine[tracing]'`),
`policy_engine.tracing.otel` gives the server a `Tracing` component ("tracing") that

- opens a SERVER span per `Check` / `CheckBatch` (OpenTelemetry's RPC conventions:
  `rpc.system` grpc, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`; the decision under
  `pdp.*`), a child of the broker's W3C trace context (`traceparent` / `tracestate` call
  metadata) when it sent a valid one; a malformed one is ignored (a new trace), silently;
- opens child spans for the cache lookup (and its Redis GET / MGET), the evaluation and the
  quota count, and a trace of its own (linked to the call that started it) per JWKS or
  issuer metadata fetch;
- stamps the call's trace and span IDs on its audit records (`trace_id`, `span_id`) and puts
  the current span's IDs into every log record made inside a span (JSON log fields);
- exports through a batch processor on its own thread (OTLP/gRPC or the console), so an
  exporter that fails or hangs never fails or slows a call, nor holds the stop past its
  deadline (the exporter is then shut down, ending its export in flight); spans it cannot
  send are dropped. OpenTelemetry's own `OTEL_*` variables that the processor and exporter
  read are checked when the component is built (`otel.otel_environment_problems`).

Tracing never changes an answer: it reads the pipeline's outcomes, it decides nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from policy_engine.config import Settings
    from policy_engine.tracing.otel import Tracing

_provider: Any = None


def use_tracer_provider(provider: Any) -> None:
    """Make every `Tracing` built afterwards in this process record into `provider` (an
    `opentelemetry.sdk.trace.TracerProvider` an embedding program or a test set up, e.g. with
    an in-memory exporter) instead of building one from the settings; None undoes it. The
    server then adds no exporter to it and does not shut it down."""
    global _provider
    _provider = provider


def injected_provider() -> Any:
    """The provider `use_tracer_provider` set, None when none was."""
    return _provider


def tracing_from_settings(settings: Settings) -> Tracing | None:
    """The "tracing" component for `settings.tracing`, not started; None when tracing is off
    (and then nothing of OpenTelemetry is imported). Raises ConfigError naming
    `tracing.enabled` when it is on but the `tracing` extra is not installed."""
    if not settings.tracing.enabled:
        return None
    from policy_engine.config import ConfigError

    try:
        from policy_engine.tracing.otel import Tracing
    except ImportError as exc:
        raise ConfigError(
            "setting tracing.enabled: OpenTelemetry is not installed "
            f"({exc.name or exc}); install the tracing extra: "
            "pip install 'policy-engine[tracing]'"
        ) from None
    return Tracing(settings, provider=injected_provider())


__all__ = ["injected_provider", "tracing_from_settings", "use_tracer_provider"]
