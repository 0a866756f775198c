"""AuditLog: bounded queue (block and drop), drains on close under load, survives sink failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from policy_engine.audit import AuditLog
from policy_engine.audit.sinks import FileSink, StdoutSink
from policy_engine.audit.verify import verify_files
from policy_engine.config import AuditSettings, ConfigError
from tests.audit.support import (
    ALLOW,
    DENY,
    TOKEN,
    FlakySink,
    make_request,
    read_records,
    settings,
)


def decisions(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_records(path) if r["type"] == "decision"]


def count_decisions(path: Path) -> int:
    """Complete decision lines of a file that is being written (a last line may be partial)."""
    text = path.read_text() if path.exists() else ""
    complete = text[: text.rfind("\n") + 1]
    return complete.count('"type":"decision"')


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def fill_queue(audit: AuditLog, entered: threading.Event, size: int) -> None:
    assert audit.record(make_request(), ALLOW, decision_id="first")
    assert entered.wait(5)  # the dispatcher holds "first"; the queue is empty again
    for i in range(size):
        assert audit.record(make_request(), ALLOW, decision_id=f"q{i}")


def test_disabled_log_does_nothing(tmp_path: Path) -> None:
    audit = AuditLog(AuditSettings(enabled=False, file_path=tmp_path / "audit.jsonl"))
    audit.start()
    assert audit.record(make_request(), ALLOW, decision_id="d") is False
    assert audit.close()
    assert not (tmp_path / "audit.jsonl").exists()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"audit\.sinks"):
        AuditLog(settings(tmp_path, sinks="file,kafka"))
    with pytest.raises(ConfigError, match=r"audit\.when_full"):
        AuditLog(settings(tmp_path, when_full="sometimes"))
    with pytest.raises(ConfigError, match=r"audit\.redis_url"):
        AuditLog(settings(tmp_path, sinks="redis"))
    (tmp_path / "not-a-key.pem").write_text("hello")
    unusable_key = AuditLog(settings(tmp_path, signing_key_file=str(tmp_path / "not-a-key.pem")))
    with pytest.raises(ConfigError, match=r"audit\.signing_key_file.*not a PEM private key"):
        unusable_key.start()  # the key file is read by start, not by the constructor


def test_drop_mode_counts_and_records_the_drops(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> None:
    entered, release = gate
    before = metric("pdp_audit_dropped_total", sink="queue", reason="queue_full")
    audit = AuditLog(settings(tmp_path, queue_size=5, when_full="drop"))
    audit.start()
    fill_queue(audit, entered, 5)
    started = time.monotonic()
    results = [audit.record(make_request(), ALLOW, decision_id=f"x{i}") for i in range(3)]
    assert results == [False, False, False]
    assert time.monotonic() - started < 0.1  # drop mode never waits
    assert audit.stats().dropped == {"queue/queue_full": 3}
    assert metric("pdp_audit_dropped_total", sink="queue", reason="queue_full") == before + 3
    release.set()
    assert audit.close()
    path = tmp_path / "audit.jsonl"
    assert [r["decision_id"] for r in decisions(path)] == ["first"] + [f"q{i}" for i in range(5)]
    dropped = [r for r in read_records(path) if r["type"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["count"] == 3
    assert dropped[0]["reason"] == "queue_full"
    report = verify_files([path], None)
    assert report.ok  # intact, but not whole: the log says 3 decisions are missing
    assert report.verdict == "INCOMPLETE" and report.missing_decisions == 3
    assert [g.kind for g in report.gaps] == ["dropped"]
    assert "3 decision(s) were not recorded (queue_full)" in report.gaps[0].message


def test_block_mode_waits_then_drops(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> None:
    entered, release = gate
    blocked_before = metric("pdp_audit_blocked_total")
    audit = AuditLog(settings(tmp_path, queue_size=5, when_full="block", block_timeout_ms=150))
    audit.start()
    fill_queue(audit, entered, 5)
    started = time.monotonic()
    assert audit.record(make_request(), ALLOW, decision_id="late") is False
    assert 0.12 <= time.monotonic() - started < 2
    assert audit.stats().dropped == {"queue/queue_full": 1}
    assert metric("pdp_audit_blocked_total") == blocked_before + 1

    # A producer that finds the queue full gets in as soon as the writer makes room.
    result: list[bool] = []
    waiter = threading.Thread(
        target=lambda: result.append(audit.record(make_request(), ALLOW, decision_id="waited"))
    )
    audit._block = 5.0  # now wait long enough that only the release lets it in
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive()
    release.set()
    waiter.join(5)
    assert result == [True]
    assert audit.close()
    ids = [r["decision_id"] for r in decisions(tmp_path / "audit.jsonl")]
    assert ids == ["first", *[f"q{i}" for i in range(5)], "waited"]


def test_close_drains_everything_under_concurrent_producers(tmp_path: Path) -> None:
    audit = AuditLog(settings(tmp_path, queue_size=200, when_full="block", block_timeout_ms=1000))
    audit.start()
    accepted: list[list[str]] = [[] for _ in range(8)]
    refused = [0] * 8
    start = threading.Barrier(9)

    def produce(index: int) -> None:
        start.wait()
        request = make_request(request_id=f"t{index}")
        for i in range(100_000):
            decision_id = f"{index}-{i}"
            if audit.record(request, DENY, decision_id=decision_id):
                accepted[index].append(decision_id)
            else:
                refused[index] += 1
                if refused[index] > 3:
                    return
            time.sleep(0.0005)  # a steady load; every record of it is schema-checked after

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(0.3)
    assert audit.close(timeout=20)  # producers are still running
    for t in threads:
        t.join(10)
    written = [r["decision_id"] for r in decisions(tmp_path / "audit.jsonl")]
    expected = [d for ids in accepted for d in ids]
    assert len(written) == len(set(written))  # each once
    assert set(written) == set(expected)  # exactly the accepted ones
    assert len(expected) > 200
    for index in range(8):  # each producer's records in its own order
        mine = [d for d in written if d.startswith(f"{index}-")]
        assert mine == accepted[index]
    assert audit.stats().dropped.get("queue/closed", 0) == sum(refused)
    assert verify_files([tmp_path / "audit.jsonl"], None).ok


def test_failing_sink_is_retried_in_order_and_never_blocks_the_others(tmp_path: Path) -> None:
    flaky = FlakySink(tmp_path / "audit.jsonl")
    healthy = FileSink(tmp_path / "other.jsonl")
    audit = AuditLog(settings(tmp_path, retry_max_ms=100), sinks=[flaky, healthy])
    audit.start()
    for i in range(10):
        audit.record(make_request(), DENY, decision_id=f"a{i}")
    assert audit.flush()
    flaky.broken.set()
    for i in range(30):
        assert audit.record(make_request(), DENY, decision_id=f"b{i}")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and count_decisions(tmp_path / "other.jsonl") < 40:
        time.sleep(0.01)
    try:
        assert count_decisions(tmp_path / "other.jsonl") == 40  # the healthy sink went on
        assert count_decisions(tmp_path / "audit.jsonl") == 10
        while time.monotonic() < deadline and flaky.failures < 2:
            time.sleep(0.01)
        assert audit.stats().errors["flaky"] >= 2
    finally:
        flaky.broken.clear()
    assert audit.close()
    ids = [r["decision_id"] for r in decisions(tmp_path / "audit.jsonl")]
    assert ids == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(30)]
    assert verify_files([tmp_path / "audit.jsonl"], None).ok


def test_persistently_failing_sink_drops_past_its_buffer_and_says_so(tmp_path: Path) -> None:
    flaky = FlakySink(tmp_path / "audit.jsonl")
    audit = AuditLog(settings(tmp_path, sink_buffer=20, retry_max_ms=50), sinks=[flaky])
    audit.start()
    audit.record(make_request(), DENY, decision_id="before")
    assert audit.flush()
    flaky.broken.set()
    for i in range(100):
        audit.record(make_request(), DENY, decision_id=f"x{i}")
    time.sleep(0.3)
    stats = audit.stats()
    assert stats.dropped.get("flaky/sink_backlog_full", 0) > 0
    flaky.broken.clear()
    assert audit.close()
    records = read_records(tmp_path / "audit.jsonl")
    written = [r for r in records if r["type"] == "decision"]
    dropped = [r for r in records if r["type"] == "dropped"]
    assert dropped and dropped[0]["reason"] == "sink_backlog_full"
    assert len(written) - 1 + sum(d["count"] for d in dropped) == 100  # every decision accounted
    report = verify_files([tmp_path / "audit.jsonl"], None)
    assert report.ok, report.render()
    assert report.verdict == "INCOMPLETE"
    assert report.missing_decisions == sum(d["count"] for d in dropped)
    assert all("sink_backlog_full" in g.message for g in report.incomplete)


def test_close_gives_up_at_its_deadline_when_a_sink_stays_down(tmp_path: Path) -> None:
    flaky = FlakySink(tmp_path / "audit.jsonl")
    audit = AuditLog(settings(tmp_path, retry_max_ms=50), sinks=[flaky])
    audit.start()
    flaky.broken.set()
    for i in range(5):
        audit.record(make_request(), DENY, decision_id=f"x{i}")
    started = time.monotonic()
    assert audit.close(timeout=0.5) is False
    assert time.monotonic() - started < 3
    assert audit.stats().dropped.get("flaky/shutdown", 0) == 5


def test_stdout_sink_and_checkpoints_by_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = AuditLog(
        settings(tmp_path, sinks="stdout", checkpoint_every=0, checkpoint_seconds=0.1),
        sinks=[StdoutSink()],
    )
    audit.start()
    audit.record(make_request(), DENY, decision_id="d")
    time.sleep(0.4)
    assert audit.close()
    lines = capsys.readouterr().out.splitlines()
    (tmp_path / "stdout.jsonl").write_text("\n".join(lines) + "\n")  # schema-checked after
    kinds = [line.split('"type":"')[1].split('"')[0] for line in lines]
    assert kinds[:2] == ["stream_start", "decision"]
    assert kinds.count("checkpoint") >= 2  # one by time, then the final one
    assert TOKEN not in "".join(lines)
    assert verify_files([tmp_path / "stdout.jsonl"], None).ok


def test_record_after_close_is_refused_and_counted(tmp_path: Path) -> None:
    audit = AuditLog(settings(tmp_path))
    audit.start()
    assert audit.close()
    assert audit.record(make_request(), DENY, decision_id="late") is False
    assert audit.stats().dropped == {"queue/closed": 1}
    assert audit.close()  # idempotent


def test_record_lazy_builds_off_the_request_path(tmp_path: Path) -> None:
    audit = AuditLog(settings(tmp_path))
    audit.start()
    caller = threading.get_ident()
    built_on: list[int] = []

    def build() -> tuple[Any, Any]:
        built_on.append(threading.get_ident())
        return make_request(), DENY

    def broken() -> tuple[Any, Any]:
        raise ValueError("an entry that cannot be read")

    assert audit.record_lazy(build, decision_id=b"0123abcd", cache_level="redis", latency_ms=0.2)
    assert audit.record_lazy(broken, decision_id="x")  # accepted now, found broken later
    assert audit.close()
    (record,) = decisions(tmp_path / "audit.jsonl")
    assert record["decision_id"] == "0123abcd" and record["cache_level"] == "redis"
    assert built_on and built_on[0] != caller
    assert audit.stats().dropped == {"queue/build_error": 1}
