"""OpenTelemetry's own variables (`OTEL_BSP_*`, the OTLP exporter's timeouts) that the SDK parses
when tracing starts: a bad one is refused at startup naming the variable, as a bad `PDP_*`
setting is, never logged as a traceback with the SDK's default silently used instead, nor
refused with a message that does not say which variable is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policy_engine.config import ConfigError, TracingSettings
from policy_engine.tracing import tracing_from_settings
from tests.server.harness import EXAMPLE_POLICIES, REPO
from tests.tracing.support import traced_settings


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "abc", "variable OTEL_BSP_MAX_QUEUE_SIZE: expected a whole"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0", "variable OTEL_BSP_MAX_QUEUE_SIZE: expected a whole"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-5", "variable OTEL_BSP_MAX_QUEUE_SIZE: expected a whole"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "1e9", "variable OTEL_BSP_MAX_QUEUE_SIZE: expected a whole"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "100", "a batch must fit in the queue"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100000", "a batch must fit in the queue"),
        ("OTEL_BSP_SCHEDULE_DELAY", "", "variable OTEL_BSP_SCHEDULE_DELAY: expected a whole"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0", "variable OTEL_BSP_SCHEDULE_DELAY: expected a whole"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "2.5", "variable OTEL_BSP_EXPORT_TIMEOUT: expected a whole"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc", "variable OTEL_EXPORTER_OTLP_TIMEOUT: expected sec"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1", "variable OTEL_EXPORTER_OTLP_TIMEOUT: expected sec"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "nan", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: expected"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "inf", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: expected"),
    ],
)
def test_a_bad_opentelemetry_variable_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        tracing_from_settings(traced_settings())
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key: s3cr3t", "entry 1 of 1 not name=value"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "a=1,x-s3cr3t,b=2,=s3cr3t", "entries 2, 4 of 4 not"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "token=s3cr3t\u00e9", "entry 1 of 1 not"),
    ],
)
def test_a_malformed_exporter_header_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    """The SDK logged a malformed entry whole (a colon for `=` is an easy slip), credential
    and all, and went on without it."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        tracing_from_settings(traced_settings())
    assert f"variable {variable}: {message}" in str(refused.value)
    assert "s3cr3t" not in str(refused.value)


def test_well_formed_exporter_headers_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer abc, x-tenant=a%2Cb,,")
    assert tracing_from_settings(traced_settings()) is not None


@pytest.mark.parametrize(
    "variable",
    ["OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY"],
)
def test_an_exporter_tls_file_that_cannot_be_read_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    """The SDK logged a traceback and went on with the system's CA roots instead of the one
    it was given; a FIFO blocked the start."""
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    for path, problem in (
        (tmp_path / "missing.pem", "cannot read it (No such file or directory)"),
        (tmp_path, "not a regular file"),
        (fifo, "not a regular file"),
    ):
        monkeypatch.setenv(variable, str(path))
        with pytest.raises(ConfigError) as refused:
            tracing_from_settings(traced_settings())
        assert f"variable {variable}: '{path}': {problem}" in str(refused.value)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv(variable, str(tmp_path / "ca.pem"))
    assert tracing_from_settings(traced_settings()) is not None


def test_good_opentelemetry_variables_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in {
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100",
        "OTEL_BSP_SCHEDULE_DELAY": "250",
        "OTEL_BSP_EXPORT_TIMEOUT": "5000",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "3",
    }.items():
        monkeypatch.setenv(variable, value)
    assert tracing_from_settings(traced_settings()) is not None


def test_the_exporters_timeout_is_not_the_console_exporters_business(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "abc")
    console = traced_settings(tracing=TracingSettings(enabled=True, exporter="console"))
    assert tracing_from_settings(console) is not None


def test_pdp_serve_refuses_an_unparsable_queue_size_at_startup(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PDP_", "OTEL_"))},
        "PYTHONPATH": str(REPO),
        "PDP_ADDRESS": "127.0.0.1:0",
        "PDP_POLICY_DIR": str(EXAMPLE_POLICIES),
        "PDP_METRICS_ADDRESS": "",
        "PDP_RELOAD__WATCH": "false",
        "PDP_TRACING__ENABLED": "true",
        "OTEL_BSP_MAX_QUEUE_SIZE": "lots",
    }
    done = subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", "serve"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "variable OTEL_BSP_MAX_QUEUE_SIZE: expected a whole number" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("variables", "shown"),
    [
        ({}, "localhost:4317 (the exporter's default)"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4317"},
            "'http://collector.example:4317' (OTEL_EXPORTER_OTLP_ENDPOINT)",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4317",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://u:s3cr3t@traces.example:4317",
            },
            "'***@traces.example:4317' (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "u:s3cr3t@c:1"}, "'***@c:1'"),
    ],
)
def test_the_status_says_which_endpoint_the_exporter_sends_to(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], shown: str
) -> None:
    """With `tracing.otlp_endpoint` empty the exporter reads OpenTelemetry's variables: the
    status named none ("the exporter's default endpoint") while spans went elsewhere."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    tracing = tracing_from_settings(traced_settings())
    assert tracing is not None
    tracing.start()
    try:
        detail = tracing.status().detail
    finally:
        tracing.stop(time.monotonic() + 5)
    assert f"spans over OTLP/gRPC to {shown}" in detail
    assert "s3cr3t" not in detail


def test_the_status_says_when_otel_sdk_disabled_turns_the_spans_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenTelemetry's own off switch makes every tracer a no-op: the status said spans went
    to the collector while none was ever recorded."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing = tracing_from_settings(traced_settings())
    assert tracing is not None
    tracing.start()
    try:
        with tracing.tracer.start_as_current_span("probe") as span:
            assert not span.is_recording()
        detail = tracing.status().detail
    finally:
        tracing.stop(time.monotonic() + 5)
    assert detail.startswith("no spans: OTEL_SDK_DISABLED=true"), detail
