"""A server imports only what its settings use: redis, PyJWT and cryptography cost ~18 MB of
RSS (issue 10, "Memory"), so a default `pdp serve` must not load them.

Each case runs the real `pdp serve` entry point (`cli.main.main`) in a fresh interpreter; once
it is SERVING and has decided one Check, the process reports which of those packages it has
loaded and stops itself with SIGTERM. The features that do need them (Redis cache and audit
sink, token keys, bundle keys, TLS, audit signing) are covered by their own tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.harness import EXAMPLE_POLICIES, REPO
from tests.store.support import free_port

HEAVY = ("redis", "jwt", "cryptography")

# Runs in the child: argv[1] is the port, argv[2] the packages to look for (comma-separated),
# the rest are `pdp serve` flags.
_CHILD = """
import json, os, signal, sys, threading
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from policy_engine.api import pdp_pb2_grpc
from policy_engine.cli.main import main
from policy_engine.client import check_request

port, HEAVY = sys.argv[1], sys.argv[2].split(",")

def report():
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            threading.Event().wait(0.05)
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        answer = stub.Check(check_request("acme", "alice", "pr-reviewer", "github", "repo"))
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
    print("REPORT " + json.dumps({"effect": answer.effect, "loaded": loaded}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report, daemon=True).start()
sys.exit(main(["serve", "--address", f"127.0.0.1:{port}", *sys.argv[3:]]))
"""


def _serve_and_report(tmp_path: Path, env: dict[str, str]) -> dict[str, object]:
    """Run the child above on the example policies; its report (effect, heavy packages)."""
    port = free_port()
    command = [sys.executable, "-c", _CHILD, str(port), ",".join(HEAVY)]
    command += ["--policies", str(EXAMPLE_POLICIES)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PDP_METRICS_ADDRESS": "", **env}
    done = subprocess.run(
        command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, done.stdout + done.stderr
    report: dict[str, object] = json.loads(lines[0].removeprefix("REPORT "))
    return report


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"PDP_AUDIT__ENABLED": "true"}, id="audit-to-file-unsigned"),
    ],
)
def test_a_server_without_redis_tokens_or_keys_does_not_import_them(
    tmp_path: Path, env: dict[str, str]
) -> None:
    if "PDP_AUDIT__ENABLED" in env:
        env = {**env, "PDP_AUDIT__FILE_PATH": str(tmp_path / "audit.jsonl")}
    report = _serve_and_report(tmp_path, env)
    assert report["effect"] != 0, report  # the Check was decided (allow or deny, not unset)
    assert report["loaded"] == [], f"loaded without being configured: {report['loaded']}"
