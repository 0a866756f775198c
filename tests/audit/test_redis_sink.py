"""The Redis Stream sink against a real redis-server: consumer groups, trimming, outages."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import redis

from policy_engine.audit.canonical import split
from policy_engine.audit.chain import Chain
from policy_engine.audit.record import build_record
from policy_engine.audit.sinks import RedisStreamSink
from policy_engine.audit.sinks.redis import stream_entries
from policy_engine.audit.tail import follow_redis
from policy_engine.audit.verify import verify_lines
from tests.audit.support import (
    DENY,
    TOKEN,
    RedisServer,
    assert_valid_lines,
    make_request,
    redis_log,
    text_client,
)


def stream_lines(server: RedisServer, key: str) -> list[str]:
    return [fields["record"] for _, fields in text_client(server).xrange(key)]


def test_consumer_group_reads_every_record_once(tmp_path: Path, audit_redis: RedisServer) -> None:
    key = f"audit-{uuid.uuid4().hex}"
    client = text_client(audit_redis)
    # The consumer's own group, made before the writer exists: the sink never needs one.
    client.xgroup_create(key, "siem", id="0", mkstream=True)
    audit = redis_log(tmp_path, audit_redis, key)
    for i in range(300):
        audit.record(make_request(request_id=f"r{i}"), DENY, decision_id=f"d{i}")
    assert audit.close()
    assert client.xinfo_groups(key)[0]["name"] == "siem"  # no group added or changed

    seen: list[str] = []
    for consumer in ("a", "b"):  # two consumers of one group share the work
        while True:
            response = client.xreadgroup("siem", consumer, {key: ">"}, count=70)
            if not response:
                break
            entries = response[0][1]
            if not entries:
                break
            for entry_id, fields in entries:
                record = json.loads(fields["record"])
                if record["type"] == "decision":
                    seen.append(record["decision_id"])
                client.xack(key, "siem", entry_id)
            if consumer == "a" and len(seen) > 100:
                break
    assert sorted(seen) == sorted(f"d{i}" for i in range(300))
    assert len(seen) == len(set(seen))
    lines = stream_lines(audit_redis, key)
    assert_valid_lines(lines)
    assert TOKEN not in "".join(lines)
    report = verify_lines([(line, f"{key}:{n}", n == 1) for n, line in enumerate(lines, 1)], None)
    assert report.ok, report.render()


def test_stream_is_trimmed_to_about_maxlen(tmp_path: Path, audit_redis: RedisServer) -> None:
    key = f"audit-{uuid.uuid4().hex}"
    audit = redis_log(tmp_path, audit_redis, key, redis_maxlen=100)
    for i in range(1000):
        audit.record(make_request(), DENY, decision_id=f"d{i}")
    assert audit.close()
    length = text_client(audit_redis).xlen(key)
    assert 100 <= length < 400  # MAXLEN ~ trims whole macro nodes
    # A trimmed stream begins mid-chain: verify accepts it as an excerpt with --partial.
    lines = stream_lines(audit_redis, key)
    numbered = [(line, f"{key}:{n}", n == 1) for n, line in enumerate(lines, 1)]
    assert not verify_lines(numbered, None).ok
    partial = verify_lines(numbered, None, allow_partial=True)
    assert partial.ok and partial.verdict == "PARTIAL"  # an excerpt is never reported as whole


def test_redis_outage_and_recovery(tmp_path: Path, audit_own_redis: RedisServer) -> None:
    """Kill the server mid-stream, keep recording, restart it: the records resume, in order."""
    key = "pdp:audit"
    audit = redis_log(tmp_path, audit_own_redis, key, redis_timeout_ms=200, retry_max_ms=100)
    for i in range(20):
        audit.record(make_request(), DENY, decision_id=f"before{i}")
    assert audit.flush(5)
    assert len(stream_lines(audit_own_redis, key)) >= 21

    audit_own_redis.stop()  # everything in the stream is gone with it: no persistence
    for i in range(30):
        assert audit.record(make_request(), DENY, decision_id=f"during{i}")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and audit.stats().errors.get("redis", 0) < 2:
        time.sleep(0.02)
    assert audit.stats().errors["redis"] >= 2
    assert audit.stats().backlog["redis"] >= 30

    audit_own_redis.start()
    for i in range(10):
        assert audit.record(make_request(), DENY, decision_id=f"after{i}")
    assert audit.close(timeout=10)
    lines = stream_lines(audit_own_redis, key)
    ids = [json.loads(line).get("decision_id") for line in lines]
    ids = [i for i in ids if i]
    assert ids == [f"during{i}" for i in range(30)] + [f"after{i}" for i in range(10)]
    seqs = [json.loads(line)["seq"] for line in lines]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no repeat
    assert_valid_lines(lines)


def test_retry_after_an_uncertain_write_adds_nothing_twice(audit_redis: RedisServer) -> None:
    """A batch whose EXEC landed but whose reply was lost is not written again on retry."""
    key = f"audit-{uuid.uuid4().hex}"
    ours, other = RedisStreamSink(audit_redis.url, key), RedisStreamSink(audit_redis.url, key)
    mine, theirs = (Chain(signer=None, instance="h:1", sink="redis") for _ in range(2))
    parts = split(build_record(make_request(), DENY, decision_id="d", instance="h:1", time=0.0))
    batch = [mine.start(ours.open().last_record, 0.0), mine.seal(parts), mine.seal(parts)]
    ours.write(batch)
    other.write([theirs.start(None, 0.0), theirs.seal(parts)])  # another writer, same stream
    ours._uncertain = tuple(batch)  # as after a connection lost between EXEC and its reply
    ours.write(batch)
    later = [mine.seal(parts)]
    ours._uncertain = tuple(batch)
    ours.write([*batch, *later])  # the retry holds more records: only the new one is added
    assert len(stream_lines(audit_redis, key)) == 6
    seqs = [json.loads(line)["seq"] for line in stream_lines(audit_redis, key)]
    assert seqs == [1, 2, 3, 1, 2, 4]


def test_stream_replies_read_with_text_ids_and_entries_without_an_id_refused() -> None:
    """redis-py types a range reply's IDs and field maps as optional (XCLAIM's shape for a
    deleted entry): an entry without fields reads as one with none, which readers report as
    not an audit record; one without an ID cannot be located or resumed from."""
    fields: dict[bytes | str, bytes | str] = {b"record": b"{}"}
    assert stream_entries([(b"1-2", fields), ("3-4", None)]) == [("1-2", fields), ("3-4", {})]
    assert stream_entries(None) == []
    with pytest.raises(redis.ResponseError, match="without an ID"):
        stream_entries([(b"1-2", fields), (None, fields)])


def test_tail_refuses_a_resp3_connection_with_a_clear_error(audit_redis: RedisServer) -> None:
    """XREAD over RESP3 answers a map, not RESP2's list of [stream, entries] pairs that
    following reads: a URL asking for protocol 3 is refused rather than misread."""
    key = f"audit-{uuid.uuid4().hex}"
    text_client(audit_redis).xadd(key, {"record": "{}"})  # XREAD answers at once
    follow = follow_redis(f"{audit_redis.url}?protocol=3", key, from_start=True, once=False)
    with pytest.raises(redis.ResponseError, match="RESP3"):
        next(follow)
