"""The Deployment's container run as the kubelet would run it, on this machine.

`pdp serve` with the container's arguments and environment (its workers from the CPU limit,
the Secret's Redis URL pointing at a real redis-server, the signing key a file in the Secret's
volume), every volume laid out as the kubelet lays it out; only the fixed ports are moved to
free ones. The kubelet's gRPC probe (grpc.health.v1 Check, service "") on the health port
says SERVING; a ConfigMap update (a new version folder, `..data` renamed over, the old folder
removed) is served without a restart; SIGTERM stops it cleanly (exit 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.policy import load_policy_set
from tests.deploy.manifests import (
    loopback_pod,
    project_configmap,
    volume_of_mount,
)
from tests.packaging.artifacts import health_status, serving
from tests.store.support import wait_for


def _revision(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        status = pdp_pb2_grpc.PolicyStatusServiceStub(channel).GetStatus(
            pdp_pb2.GetStatusRequest(), timeout=5
        )
    return status.revision


def test_the_pod_serves_probes_and_hot_reloads_its_configmap(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    pod = loopback_pod(tmp_path, redis_server.url)
    objects, deployment, spec, mounts, env = (
        pod.objects, pod.deployment, pod.spec, pod.mounts, pod.env
    )  # fmt: skip
    probe_port, grpc_port = pod.probe_port, pod.grpc_port
    assert int(env["PDP_WORKERS"]) >= 2, "the deployed shape: several workers"

    outer = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    log_file = tmp_path / "pod.log"
    command = [sys.executable, "-m", "policy_engine.cli.main", *spec["args"]]
    with serving(command, cwd=mounts["/tmp"], env={**outer, **env}, log_file=log_file) as proc:

        def probe() -> bool:
            assert proc.poll() is None, log_file.read_text()
            return health_status(probe_port) == health_pb2.HealthCheckResponse.SERVING

        wait_for(probe, timeout=60, interval=0.2, what="the startup probe")
        policies = mounts["/etc/pdp/policies"]
        assert _revision(grpc_port) == load_policy_set(policies).revision

        configmap = next(o for o in objects if o["kind"] == "ConfigMap")
        changed = dict(configmap["data"])
        key = sorted(changed)[0]
        changed[key] += "\n# edited through the ConfigMap\n"
        items = volume_of_mount(deployment, "/etc/pdp/policies")["configMap"]["items"]
        expected = load_policy_set(
            project_configmap(tmp_path / "expected", changed, items, "..v0")
        ).revision
        project_configmap(policies, changed, items, "..v2")
        wait_for(lambda: _revision(grpc_port) == expected, timeout=30, what="the update")
        assert health_status(probe_port) == health_pb2.HealthCheckResponse.SERVING
