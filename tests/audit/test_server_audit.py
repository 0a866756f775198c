"""The audit log wired into the running server: real gRPC, real files, a real Redis Stream.

Every decision the clients received (each Check, each CheckBatch item; cached, evaluated,
invalid) must be in every sink exactly once, with what the client was told, and the chain
must verify. The subject token the clients send must appear in no sink.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit.keys import generate_keypair, load_public_key
from policy_engine.audit.sinks import rotated_files
from policy_engine.audit.verify import verify_files
from policy_engine.bench.redis_server import RedisServer
from policy_engine.config import AuditSettings, CacheSettings, ReloadSettings, Settings
from policy_engine.server.app import RunningServer, start_server
from policy_engine.server.recording import CACHE_LEVEL_LABELS as LEVELS
from tests.audit.support import TOKEN, jsonl, read_records, text_client
from tests.cache.support import KEY as CACHE_KEY
from tests.cache.support import tuple_request
from tests.server.harness import DOCS, EXAMPLE_POLICIES

EFFECTS = {pdp_pb2.EFFECT_ALLOW: "ALLOW", pdp_pb2.EFFECT_DENY: "DENY"}


@dataclass
class Answered:
    """What the clients were told, by request ID."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    by_request: dict[str, tuple[str, str, str, tuple[str, ...]]] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)

    def add(self, resp: pdp_pb2.CheckResponse) -> None:
        codes = tuple(r.code for r in resp.reasons)
        entry = (resp.decision_id, EFFECTS[resp.effect], LEVELS[resp.cache_level], codes)
        with self.lock:
            assert resp.request_id not in self.by_request, "request IDs are unique"
            self.by_request[resp.request_id] = entry


def _settings(tmp_path: Path, redis_server: RedisServer, stream: str, **audit: Any) -> Settings:
    private, public = tmp_path / "audit.key", tmp_path / "audit.pub"
    generate_keypair(private, public)
    return Settings(
        address="127.0.0.1:0",
        policy_dir=EXAMPLE_POLICIES,
        threads=8,
        docs_base_url=DOCS,
        metrics_address="",
        reload=ReloadSettings(watch=False),
        cache=CacheSettings(
            redis_url=redis_server.url, redis_signing_key=CACHE_KEY, redis_timeout_ms=500
        ),
        audit=AuditSettings(
            enabled=True,
            sinks="file,redis",
            file_path=tmp_path / "audit" / "audit.jsonl",
            redis_url=redis_server.url,
            redis_stream=stream,
            signing_key_file=str(private),
            checkpoint_every=50,
            **audit,
        ),
    )


@contextmanager
def _serving(settings: Settings) -> Iterator[tuple[RunningServer, grpc.Channel]]:
    running = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            yield running, channel
    finally:
        running.stop(grace=5)


def _request(kind: int, request_id: str) -> pdp_pb2.CheckRequest:
    """Five kinds of tuple: allowed (cached after the first), denied by the org default,
    denied for a bad token, an explain request (never cached), and an invalid scope."""
    if kind == 0:
        return tuple_request(request_id=request_id)
    if kind == 1:
        return tuple_request("bob", ("sales",), request_id=request_id)
    if kind == 2:
        msg = tuple_request(request_id=request_id)
        msg.subject.access_token = TOKEN
        return msg
    if kind == 3:
        return tuple_request(request_id=request_id, explain=True)
    return tuple_request(scope="repo\x07", request_id=request_id)


def _drive(channel: grpc.Channel, answered: Answered, rounds: int, worker: int) -> None:
    stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
    for n in range(rounds):
        kind = n % 6
        if kind < 5:
            request_id = f"w{worker}-{n}"
            try:
                answered.add(stub.Check(_request(kind, request_id), timeout=30))
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, exc
                assert kind == 4
                with answered.lock:
                    answered.invalid.add(request_id)
        else:
            items = [_request(k % 5, f"w{worker}-{n}-{k}") for k in range(12)]
            for result in stub.CheckBatch(
                pdp_pb2.CheckBatchRequest(items=items), timeout=30
            ).results:
                answered.add(result)


def _decisions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == "decision"]


def _assert_logged_once(records: list[dict[str, Any]], answered: Answered, where: str) -> None:
    decisions = _decisions(records)
    counts = Counter(r["request_id"] for r in decisions)
    duplicated = {rid: n for rid, n in counts.items() if n != 1}
    assert not duplicated, f"{where}: logged more than once: {duplicated}"
    expected = set(answered.by_request) | answered.invalid
    assert set(counts) == expected, (
        f"{where}: missing {sorted(expected - set(counts))[:5]}, "
        f"unexpected {sorted(set(counts) - expected)[:5]}"
    )
    for record in decisions:
        rid = record["request_id"]
        if rid in answered.invalid:
            assert record["decision"] == "DENY"
            assert [r["code"] for r in record["reasons"]] == ["kontext_validation_error"]
            assert record["reasons"][0]["field"] == "scope"
            continue
        decision_id, effect, level, codes = answered.by_request[rid]
        assert record["decision_id"] == decision_id, rid
        assert record["decision"] == effect, rid
        assert record["cache_level"] == level, rid
        assert tuple(r["code"] for r in record["reasons"]) == codes, rid
        assert record["organization"] == "acme"
        assert record["policy_revision"]


def test_every_decision_is_logged_once_in_every_sink_under_concurrent_load(
    tmp_path: Path, shared_redis: RedisServer
) -> None:
    stream = f"audit-{uuid.uuid4().hex}"
    settings = _settings(tmp_path, shared_redis, stream)
    answered = Answered()
    client = text_client(shared_redis)
    client.xgroup_create(stream, "auditors", id="0", mkstream=True)
    with _serving(settings) as (_, channel), ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(_drive, channel, answered, 60, w) for w in range(6)]:
            future.result()
    # Stopped: the log is drained and sealed.
    levels = Counter(level for _, _, level, _ in answered.by_request.values())
    assert levels["local"] and levels["none"], levels  # both paths were exercised

    files = [*rotated_files(settings.audit.file_path), settings.audit.file_path]
    text = "".join(path.read_text() for path in files)
    assert TOKEN not in text
    file_records = [json.loads(line) for line in jsonl(text)]
    _assert_logged_once(file_records, answered, "file")
    with_token = [r for r in _decisions(file_records) if r["subject"]["token_sha256"]]
    assert with_token and all(len(r["subject"]["token_sha256"]) == 64 for r in with_token)
    allowed = [r for r in _decisions(file_records) if r["decision"] == "ALLOW"]
    assert all(r["matched_rules"] for r in allowed), "a cached allow still names its rules"

    report = verify_files(files, load_public_key(tmp_path / "audit.pub"))
    assert report.ok, report.render()
    assert report.checkpoints >= 2

    # A consumer group sees every record once.
    seen: list[dict[str, Any]] = []
    while True:
        batch = client.xreadgroup("auditors", "c1", {stream: ">"}, count=500)
        if not batch:
            break
        for entry_id, fields in batch[0][1]:
            assert TOKEN not in fields["record"]
            seen.append(json.loads(fields["record"]))
            client.xack(stream, "auditors", entry_id)
    _assert_logged_once(seen, answered, "redis stream")
    assert client.xpending(stream, "auditors")["pending"] == 0


def test_policy_source_failure_is_logged_as_a_server_error(
    tmp_path: Path, shared_redis: RedisServer
) -> None:
    settings = _settings(tmp_path, shared_redis, f"audit-{uuid.uuid4().hex}")
    with _serving(settings.replace(policy_dir=tmp_path / "missing")) as (_, channel):
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        resp = stub.Check(tuple_request(request_id="no-policies"), timeout=10)
        batch = stub.CheckBatch(
            pdp_pb2.CheckBatchRequest(items=[tuple_request(request_id="no-policies-item")]),
            timeout=10,
        )
    assert [r.code for r in resp.reasons] == ["kontext_server_error"]
    records = _decisions(read_records(settings.audit.file_path))
    by_request = {r["request_id"]: r for r in records}
    assert set(by_request) == {"no-policies", "no-policies-item"}
    assert by_request["no-policies"]["decision_id"] == resp.decision_id
    assert by_request["no-policies-item"]["decision_id"] == batch.results[0].decision_id
    for record in records:
        assert record["subject"]["id"] == "alice"
        assert [r["code"] for r in record["reasons"]] == ["kontext_server_error"]


@pytest.mark.parametrize("level", ["local", "redis"])
def test_a_cache_hit_is_recorded_with_its_level_and_the_original_rules(
    tmp_path: Path, shared_redis: RedisServer, level: str
) -> None:
    settings = _settings(tmp_path, shared_redis, f"audit-{uuid.uuid4().hex}")
    if level == "redis":
        cache = CacheSettings(
            redis_url=shared_redis.url, redis_signing_key=CACHE_KEY, local_max_entries=0
        )
        settings = settings.replace(cache=cache)
    with _serving(settings) as (running, channel):
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        first = stub.Check(tuple_request(request_id="first"), timeout=10)
        assert running.servicer is not None and running.servicer.cache is not None
        running.servicer.cache.flush()
        second = stub.Check(tuple_request(request_id="second"), timeout=10)
    assert LEVELS[first.cache_level] == "none" and LEVELS[second.cache_level] == level
    records = {r["request_id"]: r for r in _decisions(read_records(settings.audit.file_path))}
    assert records["second"]["cache_level"] == level
    assert records["second"]["matched_rules"] == records["first"]["matched_rules"] != []
    for name in ("subject", "application", "integration", "scope", "reasons", "decision"):
        assert records["second"][name] == records["first"][name], name


def test_a_recorded_token_is_only_a_hash(tmp_path: Path, shared_redis: RedisServer) -> None:
    """Also in the record of an invalid request, where the raw fields are written."""
    stream = f"audit-{uuid.uuid4().hex}"
    settings = _settings(tmp_path, shared_redis, stream)
    with _serving(settings) as (_, channel):
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        msg = _request(4, "invalid-with-token")
        msg.subject.access_token = TOKEN
        with pytest.raises(grpc.RpcError):
            stub.Check(msg, timeout=10)
    text = settings.audit.file_path.read_text()
    assert "invalid-with-token" in text and TOKEN not in text
    entries = redis.Redis.from_url(shared_redis.url).xrange(stream)
    assert entries and all(TOKEN.encode() not in fields[b"record"] for _, fields in entries)
