"""A collector that accepts connections and never answers (a hung collector, a black-holing
proxy) costs spans, never a call's answer nor the stop's deadline.

`pdp serve` runs as the container runs it, configured through `PDP_*` and `OTEL_*` variables,
its OTLP exporter pointed at a real socket that accepts and then says nothing; the exporter's
timeout (OTEL_EXPORTER_OTLP_TRACES_TIMEOUT) is ten minutes, so an export stays in flight.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.server.app import AUDIT_CLOSE_SECONDS, STOP_GRACE_SECONDS
from tests.packaging.artifacts import health_status
from tests.server.harness import EXAMPLE_POLICIES, REPO
from tests.store.support import free_port, wait_for
from tests.tracing.support import erin_on_github, metadata

# The supervisor kills a worker this long after its stop deadline (app.py); the pod's grace
# period is sized on it (tests/deploy/test_manifests.py).
SUPERVISOR_SLACK_SECONDS = 10.0


class StalledCollector:
    """A TCP listener on 127.0.0.1 that accepts every connection, reads nothing and never
    writes: an OTLP/gRPC client never gets the server's HTTP/2 SETTINGS."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._listener.close()
        for conn in self.accepted:
            conn.close()


@contextmanager
def stalled_collector() -> Iterator[StalledCollector]:
    collector = StalledCollector()
    try:
        yield collector
    finally:
        collector.close()


def test_sigterm_with_an_export_held_by_a_stalled_collector_ends_within_the_stop_deadline(
    tmp_path: Path,
) -> None:
    """The stop waits for the queued spans until its deadline, then gives them up: the
    process ends before the supervisor would kill it (before, the SDK's exit hook waited
    30 s more for the export in flight, 45 s after SIGTERM in all: past a pod's grace)."""
    port, health = free_port(), free_port()
    with stalled_collector() as collector:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PDP_", "OTEL_"))},
            "PYTHONPATH": str(REPO),
            "PDP_ADDRESS": f"127.0.0.1:{port}",
            "PDP_HEALTH_ADDRESS": f"127.0.0.1:{health}",
            "PDP_POLICY_DIR": str(EXAMPLE_POLICIES),
            "PDP_METRICS_ADDRESS": "",
            "PDP_RELOAD__WATCH": "false",
            "PDP_TRACING__ENABLED": "true",
            "PDP_TRACING__OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: the first export starts at once
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "600",  # s: and is held that long
        }
        log_file = tmp_path / "serve.log"
        with log_file.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "policy_engine.cli.main", "serve"],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=log,
            )
        try:
            wait_for(
                lambda: health_status(health) == health_pb2.HealthCheckResponse.SERVING,
                timeout=60,
                interval=0.2,
                what="the server",
            )
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
                for i in range(20):
                    answer = stub.Check(erin_on_github(f"r-{i}"), metadata=metadata(), timeout=10)
                    assert answer.effect == pdp_pb2.EFFECT_ALLOW
            wait_for(lambda: collector.accepted, timeout=30, what="the exporter's connection")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(
                    timeout=STOP_GRACE_SECONDS + AUDIT_CLOSE_SECONDS + SUPERVISOR_SLACK_SECONDS
                )
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    "still running past the stop deadline and the supervisor's slack:\n"
                    + log_file.read_text()
                ) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log_file.read_text()
    assert "spans still queued at shutdown were not all exported" in output
    assert "Traceback" not in output, output
