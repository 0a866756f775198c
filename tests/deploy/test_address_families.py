"""The pod answers on every address it has, IPv4 and IPv6: the kubelet probes the pod's IP,
clients dial it and Prometheus scrapes it, and on an IPv6 (or IPv6-first dual-stack) cluster
that IP is IPv6. (gRPC binds every family for 0.0.0.0 as for [::]; the metrics listener bound
0.0.0.0 as IPv4 only, so an IPv6 cluster could not scrape the pod.)

`pdp serve` runs with the container's listen addresses as the Deployment writes them, hosts
kept, only the ports moved to free ones; the probe, a `Check` and the metrics scrape then go
to 127.0.0.1 and to ::1. Skipped, saying so, where this machine has no IPv6 loopback.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.client import check_request
from tests.deploy.manifests import (
    SAMPLE_SECRET,
    build,
    container,
    container_environment,
    mount_volumes,
    only,
)
from tests.packaging.artifacts import serving
from tests.store.support import free_port, wait_for


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")


def _health(target: str) -> int | None:
    """The overall status a gRPC health probe gets from `target`, None when it cannot."""
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError:
            return None
    return answer.status


def test_the_pod_answers_on_its_ipv4_and_ipv6_addresses(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    objects = build()
    deployment = only(objects, "Deployment")
    secret = {**SAMPLE_SECRET, "redis-url": redis_server.url}
    mounts = mount_volumes(deployment, objects, tmp_path, secret)
    env = container_environment(deployment, mounts, secret)
    spec = container(deployment)
    ports: dict[str, int] = {}
    for port in spec["ports"]:
        (name,) = [k for k, v in env.items() if v.endswith(f":{port['containerPort']}")]
        host = env[name].rpartition(":")[0]
        ports[port["name"]] = free_port()
        env[name] = f"{host}:{ports[port['name']]}"
    env["PDP_TRANSPORT__SHUTDOWN_WAIT_MS"] = "0"
    outer = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    log_file = tmp_path / "pod.log"
    command = [sys.executable, "-m", "policy_engine.cli.main", *spec["args"]]
    request = check_request(
        "globex", "erin", "release-bot", "github", "repo",
        subject_attributes={"groups": ["engineering"]},
    )  # fmt: skip
    with serving(command, cwd=mounts["/tmp"], env={**outer, **env}, log_file=log_file) as proc:

        def probe() -> bool:
            assert proc.poll() is None, log_file.read_text()
            return _health(f"127.0.0.1:{ports['health']}") == health_pb2.HealthCheckResponse.SERVING

        wait_for(probe, timeout=60, interval=0.2, what="the startup probe over IPv4")
        for host in ("127.0.0.1", "[::1]"):
            serving_status = _health(f"{host}:{ports['health']}")
            assert serving_status == health_pb2.HealthCheckResponse.SERVING, (host, env)
            with grpc.insecure_channel(f"{host}:{ports['grpc']}") as channel:
                stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
                assert stub.Check(request, timeout=10).effect == pdp_pb2.EFFECT_ALLOW, host
            url = f"http://{host}:{ports['metrics']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                assert reply.status == 200, host
