"""Helpers for the tracing tests: an in-memory span exporter the server records into, a real
server on an ephemeral port started with tracing on, and the broker's trace context.

The exporter is the SDK's `InMemorySpanExporter` behind a `SimpleSpanProcessor` (each span is
exported as it ends, on the thread that ends it); the server records into it through
`policy_engine.tracing.use_tracer_provider`, as an embedding program would hand its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.client import check_request
from policy_engine.config import ReloadSettings, Settings, TracingSettings
from policy_engine.server.app import RunningServer, start_server
from policy_engine.tracing import use_tracer_provider
from tests.server.harness import DOCS, EXAMPLE_POLICIES
from tests.store.support import wait_for

# The broker's trace context (W3C Trace Context's own example IDs).
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CHECK_SPAN = "kontext.pdp.v1.PolicyDecisionService/Check"
BATCH_SPAN = "kontext.pdp.v1.PolicyDecisionService/CheckBatch"


def erin_on_github(request_id: str = "r-1") -> pdp_pb2.CheckRequest:
    """globex: an ALLOW that globex's quotas (github-per-person-hourly, release-bot-daily)
    count."""
    return check_request(
        "globex",
        "erin",
        "release-bot",
        "github",
        "repo",
        subject_attributes={"groups": ["engineering"]},
        request_id=request_id,
    )


class Recorder:
    """A tracer provider exporting every span into memory, as each ends."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans() if span.name == name]

    def wait_for_calls(self, name: str, count: int) -> list[ReadableSpan]:
        """The first `count` server spans named `name` (the server ends a call's span as its
        handler returns, just before gRPC sends the answer: polled, never timed)."""
        return wait_for(
            lambda: (found := self.named(name)) and len(found) >= count and found[:count],
            timeout=10,
            what=f"{count} {name} span(s)",
        )

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        own = parent.context.span_id
        return [s for s in self.spans() if s.parent is not None and s.parent.span_id == own]

    def clear(self) -> None:
        self.exporter.clear()


@contextmanager
def recording() -> Iterator[Recorder]:
    """Servers started inside record into a fresh `Recorder`."""
    recorder = Recorder()
    use_tracer_provider(recorder.provider)
    try:
        yield recorder
    finally:
        use_tracer_provider(None)
        recorder.provider.shutdown()


def traced_settings(**changes: Any) -> Settings:
    """The example policies on an ephemeral port, tracing on, nothing else listening."""
    base = Settings(
        address="127.0.0.1:0",
        policy_dir=EXAMPLE_POLICIES,
        docs_base_url=DOCS,
        metrics_address="",
        reload=ReloadSettings(watch=False),
        tracing=TracingSettings(enabled=True),
    )
    return base.replace(**changes)


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[RunningServer, Any]]:
    """A started server and a stub on a channel to it; both closed afterwards."""
    running = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
    finally:
        assert running.stop(grace=2)


def ids(span: ReadableSpan) -> tuple[str, str]:
    """(trace ID, span ID) of `span` in hex, as audit records and log lines carry them."""
    return format_trace_id(span.context.trace_id), format_span_id(span.context.span_id)


def metadata(traceparent: str = TRACEPARENT, *extra: tuple[str, str]) -> Sequence[tuple[str, str]]:
    return (("traceparent", traceparent), *extra)
