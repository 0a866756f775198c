"""While no valid policy set is loaded: every request is denied saying so, and the log says it
once per state change (no set, then a set), never once per request (issue 9, item 7)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import Settings
from policy_engine.policy import CompiledPolicySet
from policy_engine.server.service import PolicyDecisionServicer
from policy_engine.store import DirectoryBackend, PolicyStore, ReloadResult
from tests.policy_builder import allow_all, write_organization
from tests.server.harness import DOCS, running

SETTINGS = Settings(docs_base_url=DOCS)
REQUESTS = 25
SERVICE_LOGGER = "policy_engine.server.service"
REQUEST = pdp_pb2.CheckRequest(
    organization="acme",
    subject=pdp_pb2.Subject(id="alice"),
    application=pdp_pb2.Application(id="app"),
    integration=pdp_pb2.Integration(id="github"),
    scope="repo",
)


def service_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SERVICE_LOGGER]


def assert_no_policy_deny(response: pdp_pb2.CheckResponse) -> None:
    assert response.effect == pdp_pb2.EFFECT_DENY
    (reason,) = response.reasons
    assert reason.code == "kontext_server_error"
    assert "no valid policy set is loaded" in reason.message
    assert reason.layer == pdp_pb2.LAYER_SYSTEM


def test_requests_without_a_policy_set_log_once_and_say_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "policies"
    folder = write_organization(
        root, "acme", applications=["app"], policies=[allow_all(layer) for layer in
                                                      ("org", "user", "application")]
    )  # fmt: skip
    good = (folder / "policy-000.yaml").read_text()
    (folder / "policy-000.yaml").write_text("kind: Policy\nname: [broken\n")
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.FAILED  # the server starts without a set
    servicer = PolicyDecisionServicer(store.current, SETTINGS)
    caplog.set_level(logging.INFO, logger=SERVICE_LOGGER)
    with running(servicer, SETTINGS, policy_ready=False) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        for _ in range(REQUESTS):
            assert_no_policy_deny(stub.Check(REQUEST, timeout=10))
        batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[REQUEST] * 5), timeout=10)
        for result in batch.results:
            assert_no_policy_deny(result)
        (line,) = service_lines(caplog)
        assert "until a valid policy set loads" in line and "no valid policy set" in line
        assert all(not r.exc_info for r in caplog.records if r.name == SERVICE_LOGGER)

        (folder / "policy-000.yaml").write_text(good)
        assert store.reload("fixed") is ReloadResult.LOADED
        for _ in range(REQUESTS):
            assert stub.Check(REQUEST, timeout=10).effect == pdp_pb2.EFFECT_ALLOW
        lines = service_lines(caplog)
        assert len(lines) == 2 and "is loaded; deciding requests again" in lines[1], lines


def test_a_failing_policy_source_logs_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    failures = iter(range(REQUESTS + 1))

    def broken_source() -> CompiledPolicySet:
        raise RuntimeError(f"boom {next(failures)}")  # a new message every time

    caplog.set_level(logging.INFO, logger=SERVICE_LOGGER)
    with running(PolicyDecisionServicer(broken_source, SETTINGS), SETTINGS) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        for _ in range(REQUESTS):
            response = stub.Check(REQUEST, timeout=10)
            assert response.effect == pdp_pb2.EFFECT_DENY
            assert [r.code for r in response.reasons] == ["kontext_server_error"]
            assert "boom" not in response.reasons[0].message
    records = [r for r in caplog.records if r.name == SERVICE_LOGGER]
    assert len(records) == 1 and records[0].exc_info is not None
    assert "boom 0" in caplog.text
