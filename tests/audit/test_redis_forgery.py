"""What others write into the audit Redis Stream cannot make the writer skip a record.

Anyone who can write to the Redis server can add entries that claim the writer's stream id and
any seq, copy real entries, add fields, create consumer groups. The tests plant such entries at
the moment the writer's batch has an unknown outcome (the server paused with SIGSTOP past the
sink's timeout, then resumed, or killed), as an attacker would, and check that every record
still reaches the stream and that `pdp audit verify` names the planted entry as a problem.
A real redis-server of the test's own throughout.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from policy_engine.audit.canonical import split
from policy_engine.audit.chain import Chain, Sealed, content_hash
from policy_engine.audit.record import build_record
from policy_engine.audit.sinks import RedisStreamSink
from policy_engine.audit.sinks import redis as redis_sink_module
from policy_engine.audit.tail import Filters, run_tail
from policy_engine.audit.verify import verify_redis
from policy_engine.cli.main import main
from tests.audit.support import DENY, RedisServer, make_request, text_client, wait_for

TIMEOUT = 0.3  # the sink's socket timeout (seconds): the pause outlasts it


def decisions(chain: Chain, prefix: str, count: int) -> list[Sealed]:
    sealed = []
    for i in range(count):
        record = build_record(
            make_request(request_id=f"{prefix}{i}"),
            DENY,
            decision_id=f"{prefix}{i}",
            instance="h:1",
            time=time.time(),
        )
        sealed.append(chain.seal(split(record)))
    return sealed


def entries(server: RedisServer, key: str) -> list[tuple[str, str]]:
    """(entry id, record line) of every entry, oldest first."""
    return [(i, f.get("record", "")) for i, f in text_client(server).xrange(key)]


def forged(real_line: str, seq: int) -> str:
    """A well-formed record of the writer's chain with another seq, hashed as verify checks
    (sha256 is no secret): what an attacker who read one real entry can write."""
    record = json.loads(real_line)
    record.pop("hash")
    record.update(seq=seq, prev_hash="ab" * 32, decision_id="forged")
    record["hash"] = content_hash(record)
    return json.dumps(record, separators=(",", ":"))


@contextmanager
def paused(server: RedisServer) -> Iterator[None]:
    """SIGSTOP the redis-server (a hung host); SIGCONT on the way out, whatever happened."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if server.process is not None and server.process.pid == pid:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize(
    ("outcome", "plant"),
    [
        ("landed", "high_seq"),  # the old readback skipped every later record
        ("landed", "copy"),  # the old readback wrote the landed batch twice
        ("lost", "high_seq"),  # the old readback skipped the batch that never landed
    ],
)
def test_an_entry_planted_during_an_uncertain_write_costs_no_record(
    audit_own_redis: RedisServer,
    capsys: pytest.CaptureFixture[str],
    outcome: str,
    plant: str,
) -> None:
    server = audit_own_redis
    key = f"audit-{uuid.uuid4().hex}"
    sink = RedisStreamSink(server.url, key, timeout_seconds=TIMEOUT)
    chain = Chain(signer=None, instance="h:1", sink="redis")
    first = [chain.start(sink.open().last_record, time.time()), *decisions(chain, "a", 3)]
    sink.write(first)
    second = decisions(chain, "b", 3)

    with paused(server):
        with pytest.raises(redis.RedisError):
            sink.write(second)  # EXEC sent, no reply before the timeout: outcome unknown
        if outcome == "lost":
            server.kill()  # it never ran the EXEC: the batch and the stream are gone
    if outcome == "lost":
        server.start()
    else:  # resumed, Redis runs the EXEC it was sent: the batch lands
        wait_for(lambda: len(entries(server, key)) == len(first) + len(second))

    # The attacker writes before the writer's retry reads the stream back.
    attacker = text_client(server)
    # A record of the writer's chain with a high seq, or an exact copy of a real entry.
    line = forged(first[-1].line, 1_000_000) if plant == "high_seq" else first[-1].line
    planted = attacker.xadd(key, {"record": line})

    third = [*decisions(chain, "c", 2), chain.checkpoint(time.time(), final=True)]
    sink.write([*second, *third])  # the writer retries the same records, and more after them
    gaps = sink.take_gaps()
    sink.close()

    lines = [text for _, text in entries(server, key)]
    expected = [*second, *third] if outcome == "lost" else [*first, *second, *third]
    for record in expected:  # every record reached the stream, once (the copy aside)
        times = lines.count(record.line) - (record.line == line)
        assert times == 1, f"seq {record.seq} is in the stream {times} time(s)"
    assert len(lines) == len(expected) + 1  # and nothing else but the planted entry
    if outcome == "lost":
        assert [g.reason for g in gaps] == ["reset"]  # the kill itself is reported
    else:
        assert gaps == []

    assert main(["audit", "verify", server.url, "--stream", key, "--chain-only"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("TAMPERED"), out
    assert f"FAIL {key}@{planted}:" in out, out  # the planted entry is named


def test_a_forged_entry_after_a_certain_write_changes_nothing(audit_redis: RedisServer) -> None:
    """No read-back at all when the write's outcome is known: planted entries are not read."""
    key = f"audit-{uuid.uuid4().hex}"
    sink = RedisStreamSink(audit_redis.url, key)
    chain = Chain(signer=None, instance="h:1", sink="redis")
    first = [chain.start(None, time.time()), *decisions(chain, "a", 2)]
    sink.write(first)
    text_client(audit_redis).xadd(key, {"record": forged(first[-1].line, 99)})
    later = decisions(chain, "b", 2)
    sink.write(later)
    sink.close()
    lines = [line for _, line in entries(audit_redis, key)]
    assert all(lines.count(r.line) == 1 for r in [*first, *later])


def test_a_batch_trimmed_by_maxlen_as_it_landed_is_not_written_again(
    audit_redis: RedisServer,
) -> None:
    """With MAXLEN, the batch's own XADDs may trim its first entries in the same EXEC: the
    rest of it, at the stream's start, still proves the batch landed."""
    key = f"audit-{uuid.uuid4().hex}"
    sink = RedisStreamSink(audit_redis.url, key, maxlen=1)
    chain = Chain(signer=None, instance="h:1", sink="redis")
    batch = [chain.start(None, time.time()), *decisions(chain, "a", 299)]
    sink.write(batch)
    kept = entries(audit_redis, key)
    assert 0 < len(kept) < len(batch)  # MAXLEN ~ 1 trimmed whole macro nodes
    sink._uncertain = tuple(batch)  # as after a reply lost on the way back
    later = decisions(chain, "b", 1)
    sink.write([*batch, *later])
    sink.close()
    lines = [line for _, line in entries(audit_redis, key)]
    assert lines.count(later[0].line) == 1
    assert lines[: len(kept)] == [line for _, line in kept]  # nothing of the batch again


@pytest.mark.parametrize(
    "fields",
    [
        {"junk": "x"},  # no record field
        {"record": ""},  # an empty record
        "extra",  # a real record with a field the writer never writes
    ],
)
def test_verify_names_a_redis_entry_the_writer_never_writes(
    audit_redis: RedisServer, capsys: pytest.CaptureFixture[str], fields: Any
) -> None:
    key = f"audit-{uuid.uuid4().hex}"
    sink = RedisStreamSink(audit_redis.url, key)
    chain = Chain(signer=None, instance="h:1", sink="redis")
    head = [chain.start(None, time.time()), *decisions(chain, "a", 2)]
    sink.write(head)
    client = text_client(audit_redis)
    if fields == "extra":
        last = head[-1].line
        client.xtrim(key, maxlen=len(head) - 1, approximate=False)  # take the real one away
        fields = {"record": last, "note": "x"}  # and put it back with a field of one's own
    planted = client.xadd(key, fields)
    sink.write([chain.checkpoint(time.time(), final=True)])
    sink.close()
    report = verify_redis(audit_redis.url, key, None)
    assert report.verdict == "TAMPERED", report.render()
    assert any(p.where == f"{key}@{planted}" for p in report.problems), report.render()
    assert main(["audit", "verify", audit_redis.url, "--stream", key, "--chain-only"]) == 1
    assert f"FAIL {key}@{planted}:" in capsys.readouterr().out


def test_tail_reports_entries_that_are_not_records(audit_redis: RedisServer) -> None:
    key = f"audit-{uuid.uuid4().hex}"
    sink = RedisStreamSink(audit_redis.url, key)
    chain = Chain(signer=None, instance="h:1", sink="redis")
    sink.write([chain.start(None, time.time()), *decisions(chain, "a", 2)])
    planted = text_client(audit_redis).xadd(key, {"junk": "\x1b[2Jx"})
    sink.close()

    class Out:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            return None

    out, err = Out(), Out()
    printed = run_tail(
        audit_redis.url, Filters(), stream=key, once=True, from_start=True, out=out, err=err
    )  # type: ignore[arg-type]
    assert printed == 2
    assert f"entry {planted} is not an audit record" in err.text, err.text
    assert "\x1b" not in err.text


def test_consumer_groups_anyone_adds_are_bounded_and_named_safely(
    audit_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(redis_sink_module, "_GROUP_CHECK_SECONDS", 0.0)
    monkeypatch.setattr(redis_sink_module, "_MAX_GROUPS", 3, raising=False)
    key = f"audit-{uuid.uuid4().hex}"
    client = text_client(audit_redis)
    sink = RedisStreamSink(audit_redis.url, key, maxlen=1)
    chain = Chain(signer=None, instance="h:1", sink="redis")
    sink.write([chain.start(None, time.time())])
    for i in range(6):
        client.xgroup_create(key, f"evil\n{i}\x1b", id="0")
    sink.write(decisions(chain, "a", 1))  # the groups are seen for the first time
    sink.write(decisions(chain, "b", 300))  # trims unread entries of every group
    gaps = sink.take_gaps()
    sink.close()
    assert 0 < len(gaps) <= 3  # at most _MAX_GROUPS groups followed
    for gap in gaps:
        assert gap.reason == "unread"
        assert "\n" not in gap.detail and "\x1b" not in gap.detail, gap.detail


@pytest.mark.parametrize(
    "last",
    [
        {"stream": "x" * 5000, "seq": 7, "hash": "Z" * 64},  # forms the writer never writes
        {"stream": "ab" * 16, "seq": True, "hash": "ab" * 32},
        {"stream": "ab" * 16, "seq": 0, "hash": "ab" * 32},
    ],
)
def test_a_planted_last_entry_cannot_make_the_next_writers_start_malformed(
    audit_redis: RedisServer, last: dict[str, Any]
) -> None:
    """The writer links its start to the stream's last entry; a planted one with the wrong
    forms is not linked to, so only the planted entry is reported, not the writer's chain."""
    key = f"audit-{uuid.uuid4().hex}"
    planted = text_client(audit_redis).xadd(key, {"record": json.dumps(last)})
    sink = RedisStreamSink(audit_redis.url, key)
    chain = Chain(signer=None, instance="h:1", sink="redis")
    start = chain.start(sink.open().last_record, time.time())
    sink.write([start, *decisions(chain, "a", 2), chain.checkpoint(time.time(), final=True)])
    sink.close()
    assert json.loads(start.line)["previous"] is None
    report = verify_redis(audit_redis.url, key, None)
    assert report.verdict == "TAMPERED"
    assert {p.where for p in report.problems} == {f"{key}@{planted}"}, report.render()
