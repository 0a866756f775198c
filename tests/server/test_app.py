"""build_server, serve and serve_empty: binding, options, workers, signals, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import ConfigError, Settings
from policy_engine.server.app import build_server
from policy_engine.server.empty import EmptyServicer
from policy_engine.server.service import SERVICE_NAME
from tests.server.harness import EXAMPLE_POLICIES, REPO, running


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ephemeral_port_is_reported() -> None:
    server, port = build_server(EmptyServicer(), Settings(address="127.0.0.1:0"), policy_ready=True)
    try:
        assert port > 0
        server.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            assert stub.Check(pdp_pb2.CheckRequest(), timeout=10).effect == pdp_pb2.EFFECT_ALLOW
    finally:
        server.stop(grace=None)


def test_unbindable_address_is_a_config_error() -> None:
    # A plain listener (no SO_REUSEPORT) holds the port, so the server cannot share it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot bind"):
            build_server(EmptyServicer(), Settings(address=f"127.0.0.1:{port}"), policy_ready=True)


def test_empty_servicer_answers_allow_without_reading_the_request() -> None:
    with running(EmptyServicer()) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        garbage = pdp_pb2.CheckRequest(scope="not a valid scope")
        assert stub.Check(garbage, timeout=10).effect == pdp_pb2.EFFECT_ALLOW
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[garbage] * 7), timeout=10)
        assert [r.effect for r in batch.results] == [pdp_pb2.EFFECT_ALLOW] * 7
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("flags", "env", "error"),
    [
        (["--workers", "0"], {}, "setting workers: Input should be greater than or equal to 1"),
        (
            ["--workers", "2", "--address", "127.0.0.1:0"],
            {},
            "setting address: workers > 1 need an explicit port to share, got '127.0.0.1:0'",
        ),
        (
            ["--workers", "2", "--address", "127.0.0.1:1"],
            {"PDP_HEALTH_ADDRESS": "127.0.0.1:0"},
            "setting health_address: workers > 1 need an explicit port to share",
        ),
    ],
)
def test_pdp_serve_refuses_workers_it_cannot_run(
    tmp_path: Path, flags: list[str], env: dict[str, str], error: str
) -> None:
    """Settings validation (the Workers range) and `config.shared_port_problems` are the one
    place these rules live; `pdp serve` reports them before anything starts."""
    command = [sys.executable, "-m", "policy_engine.cli.main", "serve", *flags]
    command += ["--policies", str(EXAMPLE_POLICIES)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PDP_METRICS_ADDRESS": "", **env}
    done = subprocess.run(
        command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert error in done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stderr


def test_invalid_policies_start_not_serving_with_every_issue_logged(tmp_path: Path) -> None:
    """Bad policies no longer stop serve(): it starts NOT_SERVING, denies every Check with
    kontext_server_error, and logs each issue; `pdp validate` is the deploy-time gate."""
    org = tmp_path / "policies" / "acme"
    org.mkdir(parents=True)
    (org / "organization.yaml").write_text(
        "kind: Organization\ncatalog: {integrations: [github], applications: [app]}\n"
    )
    (org / "broken.yaml").write_text(
        textwrap.dedent(
            """\
            kind: Policy
            name: broken
            layer: org
            rules:
              - name: bad-syntax
                effect: allow
                condition: 'subject.attributes.groups ++ ('
            """
        )
    )
    port = _free_port()
    code = textwrap.dedent(
        f"""
        import logging
        from pathlib import Path
        from policy_engine.config import Settings
        from policy_engine.server.app import serve
        logging.basicConfig(level="INFO")
        serve(Settings(address="127.0.0.1:{port}", threads=2, metrics_address="",
                       policy_dir=Path({str(org.parent)!r})))
        """
    )
    log_file = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 60
        while _health_status(port) is None:
            assert proc.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "never started: " + log_file.read_text()
            time.sleep(0.2)
        assert _health_status(port) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            response = stub.Check(
                pdp_pb2.CheckRequest(
                    organization="acme",
                    subject=pdp_pb2.Subject(id="alice"),
                    application=pdp_pb2.Application(id="app"),
                    integration=pdp_pb2.Integration(id="github"),
                    scope="repo",
                ),
                timeout=10,
            )
        assert response.effect == pdp_pb2.EFFECT_DENY
        assert [r.code for r in response.reasons] == ["kontext_server_error"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_file.read_text()
    assert proc.returncode == 0, output
    assert "broken.yaml:7:" in output, output


def _health_status(port: int) -> int | None:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
    except grpc.RpcError:
        return None


@pytest.mark.parametrize(
    ("entry", "workers"),
    [("policy_engine.server.app.serve", 2), ("policy_engine.server.empty.serve_empty", 1)],
)
def test_serve_answers_and_stops_on_sigterm(tmp_path: Path, entry: str, workers: int) -> None:
    port = _free_port()
    module, function = entry.rsplit(".", 1)
    code = textwrap.dedent(
        f"""
        import logging
        from pathlib import Path
        from policy_engine.config import Settings
        from {module} import {function}
        logging.basicConfig(level="INFO")
        {function}(Settings(address="127.0.0.1:{port}", workers={workers}, threads=2,
                       policy_dir=Path({str(EXAMPLE_POLICIES)!r})))
        """
    )
    log_file = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 60
        # All workers up (each logs one line), so shutdown exercises forwarding to each.
        while log_file.read_text().count("serving kontext.pdp.v1") < workers:
            assert proc.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "workers never started: " + log_file.read_text()
            time.sleep(0.2)
        while _health_status(port) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "never healthy: " + log_file.read_text()
            time.sleep(0.2)
        request = pdp_pb2.CheckRequest(
            organization="acme",
            subject=pdp_pb2.Subject(id="alice"),
            application=pdp_pb2.Application(id="pr-reviewer"),
            integration=pdp_pb2.Integration(id="github"),
            scope="repo",
        )
        request.subject.attributes.update({"groups": ["engineering"]})
        # Fresh connections are spread over the workers by the kernel; each must answer.
        for _ in range(6):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
                assert stub.Check(request, timeout=10).effect == pdp_pb2.EFFECT_ALLOW
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_file.read_text()
    assert proc.returncode == 0, output
    assert output.count("shutting down") == workers, output
    assert _health_status(port) is None  # nothing left listening


def test_workers_that_cannot_bind_make_serve_exit_non_zero(tmp_path: Path) -> None:
    # A plain listener holds the port: the supervisor refuses before spawning any worker.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PDP_METRICS_ADDRESS": ""}
    serve_command = [sys.executable, "-m", "policy_engine.cli.main", "serve", "--workers", "2"]
    serve_command += ["--policies", str(EXAMPLE_POLICIES)]

    def serve(port: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*serve_command, "--address", f"127.0.0.1:{port}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = serve(port)
    assert done.returncode == 2
    assert f"address 127.0.0.1:{port}: cannot bind" in done.stderr
    assert "Traceback" not in done.stderr
    assert "pdp-worker" not in done.stderr  # none was started

    # A worker that fails on its own (here: its TLS files) stops the rest; non-zero exit.
    env["PDP_TLS__CERT_FILE"] = env["PDP_TLS__KEY_FILE"] = str(tmp_path / "missing.pem")
    done = serve(_free_port())
    assert done.returncode == 1
    assert "tls.key_file" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
