"""Tracing off costs nothing (no OpenTelemetry module is even imported), on it exports through
the settings' exporter, an exporter that cannot reach its collector never fails or changes an
answer, and bad tracing settings are refused naming the setting.

The import checks run a real server in a fresh interpreter (`sys.modules` of a process that
served a Check), configured only through `PDP_*` variables as `pdp serve` is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from policy_engine.api import pdp_pb2
from policy_engine.config import ConfigError, TracingSettings, load_settings
from tests.server.harness import EXAMPLE_POLICIES, REPO
from tests.store.support import free_port
from tests.tracing.support import (
    CHECK_SPAN,
    TRACE_ID,
    TRACEPARENT,
    erin_on_github,
    metadata,
    recording,
    serving,
    traced_settings,
)

# Runs in the child: a server from the environment's settings, one Check with the broker's
# traceparent, stopped; then which OpenTelemetry modules the process had loaded.
_CHILD = """
import os, sys
import grpc
from policy_engine.api import pdp_pb2_grpc
from policy_engine.client import check_request
from policy_engine.config import load_settings
from policy_engine.server.app import start_server

settings = load_settings(environ=os.environ)
running = start_server(settings)
with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
    stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
    msg = check_request("globex", "erin", "release-bot", "github", "repo",
                        subject_attributes={"groups": ["engineering"]})
    answer = stub.Check(msg, metadata=[("traceparent", sys.argv[1])], timeout=10)
running.stop(grace=2)
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
print("EFFECT", answer.effect, file=sys.stderr)
print("LOADED", len(loaded), ",".join(loaded[:3]), file=sys.stderr, flush=True)
"""


def _serve_once(env: dict[str, str]) -> tuple[int, int, str]:
    """(the Check's effect, OpenTelemetry modules loaded, the child's stdout)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PDP_ADDRESS": "127.0.0.1:0",
        "PDP_POLICY_DIR": str(EXAMPLE_POLICIES),
        "PDP_METRICS_ADDRESS": "",
        "PDP_RELOAD__WATCH": "false",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, TRACEPARENT],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split() for line in done.stderr.splitlines() if line}
    return int(lines["EFFECT"][1]), int(lines["LOADED"][1]), done.stdout


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    effect, loaded, stdout = _serve_once({})
    assert effect == pdp_pb2.EFFECT_ALLOW
    assert loaded == 0
    assert stdout == ""


def test_tracing_on_with_the_console_exporter_prints_the_calls_span() -> None:
    effect, loaded, stdout = _serve_once(
        {"PDP_TRACING__ENABLED": "true", "PDP_TRACING__EXPORTER": "console"}
    )
    assert effect == pdp_pb2.EFFECT_ALLOW
    assert loaded > 0
    # ConsoleSpanExporter prints each span as an indented JSON object.
    decoder, spans, text = json.JSONDecoder(), [], stdout.strip()
    while text:
        span, end = decoder.raw_decode(text)
        spans.append(span)
        text = text[end:].strip()
    [call] = [span for span in spans if span["name"] == CHECK_SPAN]
    assert call["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert call["attributes"]["pdp.decision"] == "ALLOW"
    assert call["resource"]["attributes"]["service.name"] == "policy-engine"


def _answer(resp: pdp_pb2.CheckResponse) -> tuple[Any, ...]:
    return (resp.effect, [(r.code, r.rule) for r in resp.reasons], resp.policy_revision)


def test_a_collector_that_is_not_there_never_fails_or_changes_a_check() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    plain = traced_settings(tracing=TracingSettings(enabled=False))
    with serving(plain) as (_running, stub):
        expected = [_answer(stub.Check(erin_on_github(f"r-{i}"), timeout=10)) for i in range(3)]
    # The server's own provider: a batch exporter over OTLP/gRPC to a port nothing listens on.
    unreachable = traced_settings(tracing=TracingSettings(enabled=True, otlp_endpoint=nowhere))
    with serving(unreachable) as (running, stub):
        got = [
            _answer(stub.Check(erin_on_github(f"r-{i}"), metadata=metadata(), timeout=10))
            for i in range(3)
        ]
        tracing = next(s for s in running.lifecycle.statuses() if s.name == "tracing")
        assert tracing.ready and nowhere in tracing.detail
    assert got == expected


def test_spans_are_not_recorded_when_tracing_is_off() -> None:
    with recording() as recorder:
        off = traced_settings(tracing=TracingSettings(enabled=False))
        with serving(off) as (_running, stub):
            stub.Check(erin_on_github(), metadata=metadata(), timeout=10)
    assert recorder.spans() == []


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PDP_TRACING__ENABLED", "maybe", "setting tracing.enabled: expected one of"),
        ("PDP_TRACING__EXPORTER", "zipkin", "setting tracing.exporter: Input should be 'otlp'"),
        ("PDP_TRACING__SAMPLE_RATIO", "1.5", "setting tracing.sample_ratio: expected a number"),
        ("PDP_TRACING__SAMPLE_RATIO", "nan", "setting tracing.sample_ratio: expected a finite"),
        ("PDP_TRACING__SERVICE_NAME", "", "setting tracing.service_name: expected 1 to 128"),
        ("PDP_TRACING__SERVICE_NAME", "a b", "setting tracing.service_name: expected 1 to 128"),
        ("PDP_TRACING__OTLP_ENDPOINT", "grpc://x:1", "setting tracing.otlp_endpoint: expected"),
        ("PDP_TRACING__OTLP_ENDPOINT", "http://u:secret@x:1", "got a text of 19 characters"),
        ("PDP_TRACING__OTLP_ENDPOINT", "http://x:99999", "setting tracing.otlp_endpoint"),
        ("PDP_TRACING__OTLP_ENDPOINT", "http://x:4317/v1/traces", "without a path"),
        ("PDP_TRACING__OTLP_ENDPOINT", f"http://{'a' * 254}:4317", "at most 253 characters"),
        ("PDP_TRACING__OTLP_ENDPOINT", f"http://{'a.' * 50_000}b:1", "at most 253 characters"),
        ("PDP_TRACING__SAMPLE_RATIO", "-1", "setting tracing.sample_ratio: expected a number"),
        ("PDP_TRACING__SAMPLE_RATIO", "1e309", "setting tracing.sample_ratio: expected a finite"),
        ("PDP_TRACING__SAMPLE_RATIO", "", "setting tracing.sample_ratio: Input should be"),
        ("PDP_TRACING__COLOR", "red", "setting tracing.color: unknown setting"),
    ],
)
def test_bad_tracing_settings_are_refused_naming_the_setting(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={variable: value})
    assert message in str(refused.value)
    assert "secret" not in str(refused.value)


def test_good_tracing_settings_load() -> None:
    settings = load_settings(
        environ={
            "PDP_TRACING__ENABLED": "on",
            "PDP_TRACING__EXPORTER": "CONSOLE",
            "PDP_TRACING__SAMPLE_RATIO": "0.25",
            "PDP_TRACING__OTLP_ENDPOINT": "https://otel-collector.monitoring:4317",
            "PDP_TRACING__SERVICE_NAME": "pdp-eu-1",
        }
    )
    longest = f"http://{'a' * 253}:4317"
    assert load_settings(environ={"PDP_TRACING__OTLP_ENDPOINT": longest}).tracing.otlp_endpoint
    assert settings.tracing == TracingSettings(
        enabled=True,
        exporter="console",
        otlp_endpoint="https://otel-collector.monitoring:4317",
        service_name="pdp-eu-1",
        sample_ratio=0.25,
    )


def test_pdp_config_check_shows_the_tracing_settings() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env = {
        **clean,
        "PYTHONPATH": str(REPO),
        "PDP_TRACING__ENABLED": "true",
        "PDP_TRACING__OTLP_ENDPOINT": "http://collector:4317",
        "PDP_TRACING__SAMPLE_RATIO": "0.1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", "config", "check", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tracing"] == {
        "enabled": True,
        "exporter": "otlp",
        "otlp_endpoint": "http://collector:4317",
        "service_name": "policy-engine",
        "sample_ratio": 0.1,
    }
