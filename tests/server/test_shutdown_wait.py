"""transport.shutdown_wait_ms: after a stop, health says NOT_SERVING at once while calls are
still answered for the wait, so balancers and health-watching clients leave before any call is
refused (a rolling restart drops none). A real server, a real client."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import ReloadSettings, Settings, TransportSettings
from policy_engine.server.app import start_server
from tests.cache.support import tuple_request
from tests.server.harness import DOCS, EXAMPLE_POLICIES

WAIT_MS = 1500


def test_calls_are_answered_while_the_shutdown_wait_runs_and_health_says_not_serving() -> None:
    settings = Settings(
        address="127.0.0.1:0",
        policy_dir=EXAMPLE_POLICIES,
        docs_base_url=DOCS,
        metrics_address="",
        reload=ReloadSettings(watch=False),
        transport=TransportSettings(shutdown_wait_ms=WAIT_MS),
    )
    running = start_server(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(tuple_request(), timeout=10).effect == pdp_pb2.EFFECT_ALLOW
    stopped = threading.Event()
    stopping = threading.Thread(target=lambda: (running.stop(grace=1), stopped.set()))
    began = time.monotonic()
    stopping.start()
    try:
        status = None
        while time.monotonic() - began < WAIT_MS / 1000 / 2:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Still answered, and answered in full, while the wait runs.
        answered = 0
        while time.monotonic() - began < WAIT_MS / 1000 * 0.8:
            assert stub.Check(tuple_request(), timeout=5).effect == pdp_pb2.EFFECT_ALLOW
            answered += 1
        assert answered > 0 and not stopped.is_set()
        stopping.join(30)
        assert stopped.is_set() and time.monotonic() - began >= WAIT_MS / 1000
    finally:
        stopping.join(30)
        channel.close()
    # Afterwards new calls are refused: the server is gone.
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as again:
        try:
            pdp_pb2_grpc.PolicyDecisionServiceStub(again).Check(tuple_request(), timeout=2)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        else:
            raise AssertionError("a stopped server answered")


def test_no_wait_by_default() -> None:
    assert TransportSettings().shutdown_wait_ms == 0
