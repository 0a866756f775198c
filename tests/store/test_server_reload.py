"""The real server (start_server: store, watcher, health, status) with a real gRPC client."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import ReloadSettings, Settings
from policy_engine.policy import load_policy_set
from policy_engine.server.app import RunningServer, start_server
from policy_engine.server.metrics_http import start_metrics
from policy_engine.server.service import SERVICE_NAME
from policy_engine.server.status import STATUS_SERVICE_NAME
from tests.store.support import (
    BAD_CEL,
    BAD_CEL_LINE,
    BAD_YAML,
    check_request,
    org_policy,
    wait_for,
    write_policy_dir,
    write_text_atomically,
)

ALLOW_REPO = org_policy(["repo"])
DENY_REPO = org_policy(["read"], deny=["repo"])


def _settings(root: Path, **changes: object) -> Settings:
    return Settings(
        address="127.0.0.1:0",
        policy_dir=root,
        threads=4,
        metrics_address="",
        reload=ReloadSettings(watch=True, debounce_ms=50),
    ).replace(**changes)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_policy_dir(tmp_path / "policies", ALLOW_REPO)


@pytest.fixture
def server(root: Path) -> Iterator[RunningServer]:
    running = start_server(_settings(root))
    try:
        yield running
    finally:
        running.stop(grace=None)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


def _check(channel: grpc.Channel, scope: str = "repo") -> pdp_pb2.CheckResponse:
    stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
    return stub.Check(check_request(scope), timeout=10)


def _status(channel: grpc.Channel) -> pdp_pb2.GetStatusResponse:
    stub = pdp_pb2_grpc.PolicyStatusServiceStub(channel)
    return stub.GetStatus(pdp_pb2.GetStatusRequest(), timeout=10)


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_a_saved_edit_flips_the_answer_and_the_revision(root: Path, channel: grpc.Channel) -> None:
    first = _check(channel)
    assert first.effect == pdp_pb2.EFFECT_ALLOW
    assert first.policy_revision == load_policy_set(root).revision

    write_text_atomically(root / "acme" / "org.yaml", DENY_REPO)
    flipped = wait_for(
        lambda: (r := _check(channel)).effect == pdp_pb2.EFFECT_DENY and r,
        what="Check to answer DENY",
    )
    assert flipped.policy_revision == load_policy_set(root).revision != first.policy_revision
    assert [r.rule for r in flipped.reasons] == ["forbidden-scopes"]
    assert _status(channel).revision == flipped.policy_revision


def test_status_describes_the_serving_set(
    root: Path, server: RunningServer, channel: grpc.Channel
) -> None:
    status = _status(channel)
    assert status.revision == load_policy_set(root).revision
    assert list(status.organizations) == ["acme"]
    assert status.last_reload_ok and status.last_error == ""
    assert status.watching
    assert status.loaded_at.seconds > 0 and status.last_reload_at.seconds > 0
    assert status.instance.endswith(f":{os.getpid()}")
    assert status.source == str(root)


def test_a_broken_change_keeps_the_old_revision_and_status_shows_why(
    root: Path, channel: grpc.Channel
) -> None:
    good = _check(channel).policy_revision
    write_text_atomically(root / "acme" / "org.yaml", BAD_CEL)
    status = wait_for(lambda: (s := _status(channel)).last_error and s, what="the error")
    assert not status.last_reload_ok
    assert status.revision == good
    assert f"{root / 'acme' / 'org.yaml'}:{BAD_CEL_LINE}:" in status.last_error
    response = _check(channel)
    assert response.effect == pdp_pb2.EFFECT_ALLOW and response.policy_revision == good
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING

    write_text_atomically(root / "acme" / "org.yaml", DENY_REPO)
    wait_for(lambda: _check(channel).effect == pdp_pb2.EFFECT_DENY, what="the fix to apply")
    status = _status(channel)
    assert status.last_reload_ok and status.last_error == ""
    assert status.revision == load_policy_set(root).revision


def test_invalid_policies_at_startup_serve_denies_until_fixed(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", BAD_YAML)
    running = start_server(_settings(root))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for service in ("", SERVICE_NAME):
                assert _health(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            response = _check(channel)
            assert response.effect == pdp_pb2.EFFECT_DENY
            assert [r.code for r in response.reasons] == ["kontext_server_error"]
            assert response.policy_revision == ""
            batch = pdp_pb2_grpc.PolicyDecisionServiceStub(channel).CheckBatch(
                pdp_pb2.CheckBatchRequest(items=[check_request("repo")] * 3), timeout=10
            )
            assert {r.reasons[0].code for r in batch.results} == {"kontext_server_error"}
            status = _status(channel)
            assert status.revision == "" and not status.last_reload_ok
            assert "org.yaml:6: invalid YAML" in status.last_error

            write_text_atomically(root / "acme" / "org.yaml", ALLOW_REPO)
            wait_for(
                lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING,
                what="health to flip to SERVING",
            )
            assert _health(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
            assert _check(channel).effect == pdp_pb2.EFFECT_ALLOW
    finally:
        running.stop(grace=None)


def test_reflection_lists_the_status_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {SERVICE_NAME, STATUS_SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert STATUS_SERVICE_NAME == "kontext.pdp.v1.PolicyStatusService"


def test_the_metrics_endpoint_shows_the_revision_and_reloads(
    root: Path, channel: grpc.Channel
) -> None:
    endpoint = start_metrics("127.0.0.1:0")
    assert endpoint is not None and endpoint.port > 0
    try:
        revision = _check(channel).policy_revision
        write_text_atomically(root / "acme" / "org.yaml", BAD_YAML)
        wait_for(lambda: not _status(channel).last_reload_ok, what="the failed reload")
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics") as page:
            text = page.read().decode()
        assert f'pdp_policy_revision_info{{revision="{revision}"}} 1.0' in text
        assert 'pdp_policy_reloads_total{result="error"}' in text
        assert 'pdp_policy_reloads_total{result="success"}' in text
        assert "pdp_policy_last_reload_success 0.0" in text
        assert "pdp_policy_last_reload_timestamp_seconds" in text
        assert "pdp_policy_reload_seconds_count" in text
    finally:
        endpoint.close()
