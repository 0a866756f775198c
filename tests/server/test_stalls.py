"""No number of stalled, silent or late callers stops the server answering the others.

Real servers on ephemeral ports, real sockets: stalled callers are hand-written HTTP/2
(`rawh2.py`), the slow path is a real redis-server stopped with SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.client import check_request
from policy_engine.config import CacheSettings, Settings, TransportSettings
from policy_engine.policy import load_policy_set
from policy_engine.server.app import AsyncServer, build_server
from policy_engine.server.service import SERVICE_NAME, PolicyDecisionServicer
from tests.metrics import decisions_total as _decisions
from tests.metrics import sample as _sample
from tests.server.harness import DOCS, EXAMPLE_POLICIES
from tests.server.rawh2 import RawConnection, closed_by_server

POLICIES = load_policy_set(EXAMPLE_POLICIES)
ALICE = check_request(
    "acme", "alice", "pr-reviewer", "github", "repo", subject_attributes={"groups": ["engineering"]}
)
CHECK_METHOD = f"/{SERVICE_NAME}/Check"
SERVING = health_pb2.HealthCheckResponse.SERVING


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[int, PolicyDecisionServicer]]:
    """The real servicer over the example policies, on 127.0.0.1:0."""
    settings = settings.replace(address="127.0.0.1:0", docs_base_url=DOCS)
    servicer = PolicyDecisionServicer(lambda: POLICIES, settings)
    server, port = build_server(servicer, settings, policy_ready=True)
    assert isinstance(server, AsyncServer)
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=None)
        servicer.close()


def _late() -> float:
    """Calls not evaluated because their deadline passed (waiting for the cache or before)."""
    return sum(_sample("pdp_deadline_exceeded_total", stage=s) for s in ("queued", "cache"))


def test_a_thousand_stalled_streams_do_not_stop_checks_or_health() -> None:
    # The old threaded server had 16 handler threads: 16 such streams stopped it.
    with serving(Settings()) as (port, _):
        stalled = [RawConnection(port) for _ in range(8)]
        try:
            for connection in stalled:
                connection.handshake()
                connection.open_streams(125, CHECK_METHOD)  # 1,000 in all, held open
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                answered = 0
                for _ in range(40):
                    futures = [stub.Check.future(ALICE, timeout=10) for _ in range(50)]
                    for future in futures:
                        assert future.result().effect == pdp_pb2.EFFECT_ALLOW
                        answered += 1
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                    assert status == SERVING
                    for connection in stalled:
                        connection.drain()
                assert answered == 2000
            # The stalled streams were held open all along (their connections still up).
            for connection in stalled:
                connection.drain()
                connection.sock.sendall(b"")  # raises if the connection was closed
        finally:
            for connection in stalled:
                connection.close()


def test_silent_and_idle_connections_are_closed_after_the_configured_times() -> None:
    transport = TransportSettings(handshake_timeout_ms=300, max_connection_idle_ms=300)
    with serving(Settings(transport=transport)) as (port, _):
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        idle = [RawConnection(port) for _ in range(20)]
        for connection in idle:
            connection.handshake()  # HTTP/2 is up; then not a single call
        try:
            # Generous bounds (the old server kept both kinds open indefinitely).
            assert all(closed_by_server(sock, timeout=15) for sock in silent)
            assert all(closed_by_server(conn.sock, timeout=15) for conn in idle)
            # The server itself is fine: a new caller is answered.
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer = pdp_pb2_grpc.PolicyDecisionServiceStub(channel).Check(ALICE, timeout=10)
                assert answer.effect == pdp_pb2.EFFECT_ALLOW
        finally:
            for sock in silent:
                sock.close()
            for connection in idle:
                connection.close()


@pytest.fixture
def stopped_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The test's redis-server, frozen by SIGSTOP once the server has connected (see below)."""
    yield redis_server
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGCONT)


def test_callers_whose_deadline_passes_behind_a_stopped_redis_are_not_evaluated(
    stopped_redis: RedisServer,
) -> None:
    cache = replace(
        CacheSettings(),
        local_max_entries=0,  # every Check asks Redis
        redis_url=stopped_redis.url,
        redis_signing_key="5e1f" * 16,
        redis_timeout_ms=2000,  # a Redis call waits up to 2 s
        breaker_failure_threshold=1000,  # and the breaker stays closed throughout
    )
    with serving(Settings(cache=cache)) as (port, servicer):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(ALICE, timeout=10).effect == pdp_pb2.EFFECT_ALLOW  # connected
            assert stopped_redis.process is not None
            os.kill(stopped_redis.process.pid, signal.SIGSTOP)
            decided_before = _decisions()
            late_before = _late()
            futures = [stub.Check.future(ALICE, timeout=0.05) for _ in range(20)]
            for future in futures:
                with pytest.raises(grpc.RpcError) as raised:
                    future.result()
                assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # The loop is free meanwhile: health answers at once.
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            assert status == SERVING
            # Past Redis's own timeout, when a blocked server would have gone on to evaluate.
            time.sleep(2.5)
            assert _decisions() == decided_before  # not one of the 20 was evaluated
            # Each one the server received was counted; on a loaded machine a call can expire
            # in the client or in gRPC's core before it reaches the server at all.
            assert 0 < _late() - late_before <= 20
        assert servicer.cache is not None
