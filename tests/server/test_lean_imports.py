"""A server imports only what its settings use: redis, PyJWT and cryptography cost ~18 MB of
RSS and pydantic ~9 MB (issue 10, "Memory"), so a default `pdp serve` must not hold them.

Each case runs the real `pdp serve` entry point (`cli.main.main`) in a fresh interpreter; once
it is SERVING and has decided one Check, it is stopped with SIGTERM and reports which of
those packages it had loaded. The features that do need them (Redis cache and audit sink,
token keys, bundle keys, TLS, audit signing) are covered by their own tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.client import check_request
from tests.server.harness import EXAMPLE_POLICIES, REPO
from tests.store.support import free_port, wait_for

HEAVY = ("redis", "jwt", "cryptography", "pydantic", "pydantic_core", "pydantic_settings")

# Runs in the child: argv[1] lists the packages to look for (comma-separated), the rest are
# `pdp serve` flags. No thread of its own: `pdp serve` reads its settings in a forked child
# only while the process is single-threaded (config.load_settings_apart).
_CHILD = """
import sys
from policy_engine.cli.main import main

code = main(["serve", *sys.argv[2:]])
loaded = {name.split(".")[0] for name in sys.modules}
print("LOADED " + ",".join(sorted(loaded & set(sys.argv[1].split(",")))), flush=True)
sys.exit(code)
"""


def _serve_and_report(tmp_path: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Serve the example policies in the child above, decide one Check, stop it with SIGTERM;
    the Check's effect and the heavy packages the server had loaded."""
    port = free_port()
    command = [sys.executable, "-c", _CHILD, ",".join(HEAVY), "--address", f"127.0.0.1:{port}"]
    command += ["--policies", str(EXAMPLE_POLICIES), "--threads", "2"]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PDP_METRICS_ADDRESS": "", **env}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    return proc.poll() is not None  # stop waiting for a server that died
                return status == health_pb2.HealthCheckResponse.SERVING

            wait_for(serving, timeout=60, what="the server to serve")
            assert proc.poll() is None, proc.communicate()
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            request = check_request("acme", "alice", "pr-reviewer", "github", "repo")
            effect = stub.Check(request, timeout=10).effect
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = [line for line in out.splitlines() if line.startswith("LOADED ")]
    assert lines, out + err
    return effect, [name for name in lines[0].removeprefix("LOADED ").split(",") if name]


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"PDP_AUDIT__ENABLED": "true"}, id="audit-to-file-unsigned"),
    ],
)
def test_a_server_loads_no_package_its_settings_do_not_use(
    tmp_path: Path, env: dict[str, str]
) -> None:
    if "PDP_AUDIT__ENABLED" in env:
        env = {**env, "PDP_AUDIT__FILE_PATH": str(tmp_path / "audit.jsonl")}
    effect, loaded = _serve_and_report(tmp_path, env)
    assert effect != pdp_pb2.EFFECT_UNSPECIFIED  # the Check was decided
    assert loaded == [], f"loaded without being configured: {loaded}"


def test_bad_settings_read_apart_are_still_reported_by_serve(tmp_path: Path) -> None:
    """The child that validates the settings hands back every problem, named as before."""
    command = [sys.executable, "-m", "policy_engine.cli.main", "serve", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PDP_THREADS": "many"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--workers" in done.stderr and "threads" in done.stderr, done.stderr
