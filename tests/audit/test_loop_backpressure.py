"""`audit.when_full: block` on the asyncio server: a full audit queue makes the calls that
need room wait (each for at most `block_timeout_ms` and its deadline), never the event loop.

The dispatcher is held inside its first record (the `gate` fixture), so the queue fills for
real; health and decisions of other callers must keep being answered meanwhile.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import AuditSettings, ReloadSettings, Settings
from policy_engine.lifecycle import deadline_in
from policy_engine.server.app import RunningServer, start_server
from tests.audit.support import read_records
from tests.cache.support import tuple_request
from tests.metrics import decisions_total as _decisions
from tests.metrics import sample as _sample
from tests.server.harness import DOCS, EXAMPLE_POLICIES

BLOCK_MS = 1500
QUEUE = 4


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        address="127.0.0.1:0",
        policy_dir=EXAMPLE_POLICIES,
        docs_base_url=DOCS,
        metrics_address="",
        reload=ReloadSettings(watch=False),
        audit=AuditSettings(
            enabled=True,
            sinks="file",
            file_path=tmp_path / "audit.jsonl",
            queue_size=QUEUE,
            when_full="block",
            block_timeout_ms=BLOCK_MS,
        ),
    )


@contextmanager
def _full_queue(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> Iterator[tuple[RunningServer, grpc.Channel]]:
    """A running server whose audit queue is full: the dispatcher is held inside the first
    record (`gate`) and QUEUE more are waiting. Released and stopped on the way out."""
    entered, release = gate
    running = start_server(_settings(tmp_path))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        stub.Check(tuple_request(request_id="first"), timeout=10)
        assert entered.wait(10)  # the dispatcher holds "first": nothing leaves the queue now
        for i in range(QUEUE):
            stub.Check(tuple_request(request_id=f"q{i}"), timeout=10)
        yield running, channel
    finally:
        release.set()
        channel.close()
        running.stop(grace=1)


def test_a_full_audit_queue_blocks_the_calls_that_need_room_not_the_loop(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> None:
    with _full_queue(tmp_path, gate) as (running, channel):
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        # A batch of 20 needs room for 20 records: it waits (up to BLOCK_MS), then its records
        # are dropped and counted. On the old code every record waited BLOCK_MS on the loop.
        batch = pdp_pb2.CheckBatchRequest(
            items=[tuple_request(request_id=f"b{i}") for i in range(20)]
        )
        with ThreadPoolExecutor(2) as pool:
            started = time.monotonic()
            waiting = pool.submit(stub.CheckBatch, batch, timeout=60)
            time.sleep(0.2)  # the batch is waiting for room now
            assert not waiting.done()
            # The loop answers health and a call with a short deadline meanwhile.
            probe = time.monotonic()
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=BLOCK_MS / 2000)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - probe < BLOCK_MS / 2000
            answers = waiting.result(timeout=30)
            took = time.monotonic() - started
        assert len(answers.results) == 20
        # One wait for the whole batch, not one per record (20 x 1.5 s on the old code).
        assert took < 3 * BLOCK_MS / 1000
        assert running.audit is not None
        assert running.audit.stats().dropped.get("queue/queue_full") == 20
    ids = [r.get("request_id") for r in read_records(tmp_path / "audit.jsonl")]
    assert ["first", *[f"q{i}" for i in range(QUEUE)]] == [
        i for i in ids if i and not i.startswith("b")
    ]


def test_room_made_while_a_call_waits_lets_its_records_in(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> None:
    _, release = gate
    with _full_queue(tmp_path, gate) as (running, channel):
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(stub.Check, tuple_request(request_id="waited"), timeout=30)
            time.sleep(0.2)
            assert not waiting.done()
            release.set()  # the writer drains: the waiting call's record gets in
            assert waiting.result(timeout=30).request_id == "waited"
        assert running.audit is not None
        assert "queue/queue_full" not in running.audit.stats().dropped
    ids = [r.get("request_id") for r in read_records(tmp_path / "audit.jsonl")]
    assert "waited" in ids


def test_a_required_audit_log_is_not_ready_while_a_sink_cannot_write(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the audit directory should be")
    settings = _settings(tmp_path)
    audit = AuditSettings(
        enabled=True, sinks="file", file_path=blocked / "audit.jsonl", required=True
    )
    running = start_server(dataclasses.replace(settings, audit=audit))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        channel.close()
        # The sink never writes: stop by a short deadline rather than the server's drain time.
        running.lifecycle.stop(deadline_in(1.0))


def test_a_call_whose_deadline_passes_waiting_for_audit_room_is_decided_for_nobody(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> None:
    expired_before = _sample("pdp_deadline_exceeded_total", stage="audit")
    with _full_queue(tmp_path, gate) as (running, channel):
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        decided_before = _decisions()
        # The caller gives up (0.3 s) long before the audit log would (BLOCK_MS).
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(tuple_request(request_id="late"), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5
        while _sample("pdp_deadline_exceeded_total", stage="audit") == expired_before:
            assert time.monotonic() < deadline, "the expired wait was not counted"
            time.sleep(0.02)
        # Not evaluated, not counted as a decision, not queued and then dropped as one.
        assert _decisions() == decided_before
        assert running.audit is not None
        assert "queue/queue_full" not in running.audit.stats().dropped
    ids = [r.get("request_id") for r in read_records(tmp_path / "audit.jsonl")]
    assert "late" not in ids
