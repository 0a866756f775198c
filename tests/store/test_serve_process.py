"""`pdp serve` as deployed, in a subprocess: SIGHUP reloads, workers' metrics are aggregated."""

from __future__ import annotations

import re
import signal
import urllib.request
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.policy import load_policy_set
from tests.server.harness import serve_process
from tests.store.support import (
    check_request,
    org_policy,
    wait_for,
    write_policy_dir,
    write_text_atomically,
)

ALLOW_REPO = org_policy(["repo"])
DENY_REPO = org_policy(["read"], deny=["repo"])


def _check(port: int) -> pdp_pb2.CheckResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pdp_pb2_grpc.PolicyDecisionServiceStub(channel).Check(
            check_request("repo"), timeout=10
        )


def _status(port: int) -> pdp_pb2.GetStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pdp_pb2_grpc.PolicyStatusServiceStub(channel).GetStatus(
            pdp_pb2.GetStatusRequest(), timeout=10
        )


def test_sighup_reloads_when_watching_is_off(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", ALLOW_REPO)
    env = {"PDP_RELOAD__WATCH": "false", "PDP_METRICS_ADDRESS": ""}
    with serve_process(tmp_path, root, workers=1, env=env) as (proc, port, _):
        status = _status(port)
        assert not status.watching
        old = _check(port)
        assert old.effect == pdp_pb2.EFFECT_ALLOW

        write_text_atomically(root / "acme" / "org.yaml", DENY_REPO)
        new_revision = load_policy_set(root).revision
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _status(port).revision == new_revision, what="the SIGHUP reload")
        response = _check(port)
        assert response.effect == pdp_pb2.EFFECT_DENY
        assert response.policy_revision == new_revision != old.policy_revision
        assert _status(port).instance.endswith(f":{proc.pid}")


def test_redis_url_flag_shares_decisions_through_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    root = write_policy_dir(tmp_path / "policies", ALLOW_REPO)
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    key_file = tmp_path / "cache.key"
    key_file.write_text("5e1f" * 16 + "\n")  # the Redis level runs only with a signing key
    env = {"PDP_METRICS_ADDRESS": "", "PDP_CACHE__REDIS_SIGNING_KEY_FILE": str(key_file)}
    args = ("--redis-url", url)
    with serve_process(tmp_path, root, workers=1, env=env, args=args) as (_, port, _):
        assert _check(port).effect == pdp_pb2.EFFECT_ALLOW
        client = redis.Redis(port=redis_server.port)
        wait_for(lambda: client.dbsize() == 1, what="the decision to reach Redis")
        (key,) = client.keys()
        assert key.startswith(f"pdp:v1:{load_policy_set(root).revision}:".encode())


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        return page.read().decode()


def _sample(text: str, name_and_labels: str) -> float | None:
    match = re.search(rf"^{re.escape(name_and_labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_workers_share_one_metrics_endpoint_and_all_reload_on_sighup(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", ALLOW_REPO)
    first = load_policy_set(root).revision
    env = {"PDP_RELOAD__WATCH": "false", "PDP_METRICS_ADDRESS": "127.0.0.1:0"}
    with serve_process(tmp_path, root, workers=2, env=env) as (proc, port, log_file):
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log_file.read_text())
        assert found, log_file.read_text()
        metrics_port = int(found.group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.SERVING
                ),
                what="health",
            )

        text = _metrics(metrics_port)
        # Two live workers serve the first revision; each made one successful attempt.
        assert _sample(text, f'pdp_policy_revision_info{{revision="{first}"}}') == 2.0, text
        assert _sample(text, 'pdp_policy_reloads_total{result="success"}') == 2.0, text
        assert _sample(text, "pdp_policy_last_reload_success") == 1.0, text

        write_text_atomically(root / "acme" / "org.yaml", DENY_REPO)
        second = load_policy_set(root).revision
        proc.send_signal(signal.SIGHUP)  # to the supervisor, which forwards it to each worker

        def both_workers_moved() -> bool:
            text = _metrics(metrics_port)
            return (
                _sample(text, f'pdp_policy_revision_info{{revision="{second}"}}') == 2.0
                and _sample(text, f'pdp_policy_revision_info{{revision="{first}"}}') == 0.0
            )

        wait_for(both_workers_moved, timeout=10, what="both workers to serve the new revision")
        assert _sample(_metrics(metrics_port), 'pdp_policy_reloads_total{result="success"}') == 4
        for _ in range(6):  # fresh connections land on either worker: all answer the new set
            assert _check(port).policy_revision == second
    output = log_file.read_text()
    assert output.count("shutting down") == 2, output
