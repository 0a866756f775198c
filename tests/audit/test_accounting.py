"""Exact audit accounting: every way records go missing is bounded, noticed and reported.

A failing sink's backlog (dropped records included) never exceeds `sink_buffer`; a Redis Stream
deleted, replaced or trimmed under the writer is noticed at once (log, metric, a `dropped`
record in the chain); `pdp audit verify` gives each kind of loss its own verdict and exit code,
and `pdp audit tail` reports gaps. Real files, real processes, a real redis-server.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from policy_engine.audit import AuditLog
from policy_engine.audit.sinks import redis as redis_sink_module
from policy_engine.audit.sinks import rotated_files
from policy_engine.audit.verify import verify_files, verify_redis
from policy_engine.cli.main import main
from tests.audit.support import (
    DENY,
    FlakySink,
    RedisServer,
    make_request,
    read_records,
    redis_log,
    settings,
    text_client,
    wait_for,
)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- a failing sink's backlog ------------------------------------------------------------------


def test_failing_sink_backlog_stays_within_sink_buffer_including_dropped_records(
    tmp_path: Path,
) -> None:
    """Round after round of overflow while the sink is down: the backlog never passes the
    bound (before, each round added a `dropped` record beyond it), and once the sink is back,
    decisions written plus decisions said missing equal decisions offered."""
    bound = 10
    flaky = FlakySink(tmp_path / "audit.jsonl")
    audit = AuditLog(
        settings(tmp_path, sink_buffer=bound, checkpoint_every=3, retry_max_ms=20),
        sinks=[flaky],
    )
    audit.start()
    worker = audit._workers[0]
    audit.record(make_request(), DENY, decision_id="before")
    assert audit.flush()
    flaky.broken.set()
    backlogs = []
    for i in range(60):  # one decision per dispatcher round
        assert audit.record(make_request(), DENY, decision_id=f"x{i}")
        wait_for(lambda: not audit._queue and not audit._busy)
        wait_for(lambda: not worker.inbox or worker.backlog() >= bound - 1)
        backlogs.append(audit.stats().backlog["flaky"])
    assert max(backlogs) <= bound, backlogs
    assert worker.peak <= bound
    assert audit.stats().dropped.get("flaky/sink_backlog_full", 0) > 40
    flaky.broken.clear()
    assert audit.close()
    records = read_records(tmp_path / "audit.jsonl")
    written = [r["decision_id"] for r in records if r["type"] == "decision"]
    dropped = [r for r in records if r["type"] == "dropped"]
    assert written[0] == "before" and written[1:] == sorted(written[1:], key=lambda d: int(d[1:]))
    assert {d["reason"] for d in dropped} == {"sink_backlog_full"}
    assert len(written) - 1 + sum(d["count"] for d in dropped) == 60  # exact
    assert len(dropped) <= 3  # drops while down are told in few records, not one per round
    report = verify_files([tmp_path / "audit.jsonl"], None)
    assert report.ok and report.verdict == "INCOMPLETE", report.render()
    assert report.missing_decisions == 60 - (len(written) - 1)


def test_build_errors_are_reported_as_build_errors(tmp_path: Path) -> None:
    """Decisions lost because their record could not be built are said as such in the chain
    (before, they were reported as queue_full)."""
    audit = AuditLog(settings(tmp_path))
    audit.start()

    def broken() -> tuple[Any, Any]:
        raise ValueError("an entry that cannot be read")

    audit.record(make_request(), DENY, decision_id="ok")
    audit.record_lazy(broken, decision_id="bad")
    assert audit.close()
    dropped = [r for r in read_records(tmp_path / "audit.jsonl") if r["type"] == "dropped"]
    assert [(d["reason"], d["count"]) for d in dropped] == [("build_error", 1)]


# --- verify: verdicts and exit codes, on real files ----------------------------------------------


def test_verify_exits_3_when_decisions_were_dropped(
    tmp_path: Path,
    gate: tuple[threading.Event, threading.Event],
    capsys: pytest.CaptureFixture[str],
) -> None:
    entered, release = gate
    audit = AuditLog(settings(tmp_path, queue_size=2, when_full="drop"))
    audit.start()
    assert audit.record(make_request(), DENY, decision_id="first")
    assert entered.wait(5)
    for i in range(2):
        assert audit.record(make_request(), DENY, decision_id=f"q{i}")
    assert not audit.record(make_request(), DENY, decision_id="lost")
    release.set()
    assert audit.close()
    path = str(tmp_path / "audit.jsonl")
    assert main(["audit", "verify", path, "--chain-only"]) == 3
    out = capsys.readouterr().out
    assert out.startswith("INCOMPLETE: 1 gap(s), 1 decision(s) known not recorded; 3 records")
    assert "dropped: 1 decision(s) were not recorded (queue_full)" in out
    assert main(["audit", "verify", path, "--chain-only", "--live"]) == 3  # live or not


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from policy_engine.audit import AuditLog
from tests.audit.support import DENY, make_request, settings
audit = AuditLog(settings(Path({directory!r})))
audit.start()
for i in range(5):
    audit.record(make_request(), DENY, decision_id=f"k{{i}}")
assert audit.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_verify_reports_a_killed_writer_even_for_a_live_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server killed (SIGKILL) and started again: the first segment has no final checkpoint
    and the next one links to its end. Not OK, even with --live."""
    script = KILLED_WRITER.format(root=str(Path.cwd()), directory=str(tmp_path))
    killed = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert killed.returncode == -9, killed.stderr
    path = tmp_path / "audit.jsonl"
    first_segment_end = json.loads(path.read_text().splitlines()[-1])["seq"]
    audit = AuditLog(settings(tmp_path))
    audit.start()
    audit.record(make_request(), DENY, decision_id="after-restart")
    assert audit.close()
    for live in (False, True):
        report = verify_files([path], None, live=live)
        assert report.ok and report.verdict == "INCOMPLETE", report.render()
        assert [(g.kind, g.seq) for g in report.gaps] == [("unclosed", first_segment_end)]
        assert "stopped without closing" in report.gaps[0].message
    assert main(["audit", "verify", str(path), "--chain-only", "--live"]) == 3
    assert "MISSING" in capsys.readouterr().out


def test_verify_exits_4_when_rotation_deleted_the_oldest_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`file_keep` deletes old files by design: what is left verifies as PARTIAL, not OK."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(settings(tmp_path, file_max_bytes=4000, file_keep=2, checkpoint_every=5))
    audit.start()
    for i in range(40):
        audit.record(make_request(), DENY, decision_id=f"r{i}")
    assert audit.close()
    files = [*rotated_files(path), path]
    assert len(files) == 3
    report = verify_files(files, None)
    assert report.ok and report.verdict == "PARTIAL", report.render()
    assert [g.kind for g in report.gaps] == ["head_missing"]
    assert main(["audit", "verify", *map(str, files), "--chain-only"]) == 4
    assert capsys.readouterr().out.startswith("PARTIAL: 1 stream(s) begin after the start")


def test_verify_exit_codes_are_distinct(tmp_path: Path) -> None:
    from policy_engine.audit import cli

    codes = [cli.EXIT_OK, cli.EXIT_TAMPERED, cli.EXIT_USAGE, cli.EXIT_INCOMPLETE, cli.EXIT_PARTIAL]
    assert len(set(codes)) == len(codes)
    assert main(["audit", "verify", str(tmp_path / "none.jsonl"), "--chain-only"]) == 2


# --- tail reports gaps -------------------------------------------------------------------------


def test_tail_reports_missing_records_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(settings(tmp_path))
    audit.start()
    for i in range(6):
        audit.record(make_request(), DENY, decision_id=f"d{i}")
    assert audit.close()
    lines = path.read_text().splitlines()
    cut = tmp_path / "cut.jsonl.tampered"
    cut.write_text("\n".join(lines[:3] + lines[5:]) + "\n")  # seq 4-5 deleted
    assert main(["audit", "tail", str(cut), "--once", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4
    assert "gap: stream " in captured.err and ": seq 4-5 missing" in captured.err

    head = tmp_path / "head.jsonl.tampered"
    head.write_text("\n".join(lines[2:]) + "\n")
    assert main(["audit", "tail", str(head), "--once"]) == 0
    assert "begins at seq 3: seq 1-2 are not in the source" in capsys.readouterr().err


# --- a Redis Stream changed under the writer ----------------------------------------------------


def stream_records(server: RedisServer, key: str) -> list[dict[str, Any]]:
    return [json.loads(f["record"]) for _, f in text_client(server).xrange(key)]


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_writer_notices_a_redis_stream_reset_under_it(
    tmp_path: Path,
    audit_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    how: str,
) -> None:
    key = f"audit-{uuid.uuid4().hex}"
    client = text_client(audit_redis)
    before = metric("pdp_audit_stream_removed_total", sink="redis", reason="reset")
    audit = redis_log(tmp_path, audit_redis, key)
    for i in range(5):
        audit.record(make_request(), DENY, decision_id=f"old{i}")
    assert audit.flush()
    gone = stream_records(audit_redis, key)[-1]["seq"]  # stream_start + 5 decisions
    if how == "deleted":
        client.delete(key)
    else:  # a stream with a history of its own put in its place
        client.xadd(f"{key}-other", {"record": "{}"})
        client.rename(f"{key}-other", key)
    with caplog.at_level(logging.WARNING, logger="policy_engine.audit.writer"):
        for i in range(3):
            audit.record(make_request(), DENY, decision_id=f"new{i}")
        assert audit.close()
    assert any(f"Redis Stream {key} was {how}" in r.getMessage() for r in caplog.records), (
        caplog.text
    )
    assert metric("pdp_audit_stream_removed_total", sink="redis", reason="reset") == before + gone
    records = [r for r in stream_records(audit_redis, key) if r.get("type")]
    markers = [r for r in records if r["type"] == "dropped"]
    assert [(m["reason"], m["removed_through_seq"], m["count"]) for m in markers] == [
        ("stream_reset", gone, gone)
    ]
    assert [r["decision_id"] for r in records if r["type"] == "decision"] == [
        f"new{i}" for i in range(3)
    ]
    if how == "deleted":
        report = verify_redis(audit_redis.url, key, None)
        assert report.ok and report.verdict == "INCOMPLETE", report.render()
        assert [g.kind for g in report.gaps] == ["reset"]
        assert f"seq 1-{gone} ({gone} record(s)) are no longer in the sink" in (
            report.gaps[0].message
        )
        assert main(["audit", "verify", audit_redis.url, "--stream", key, "--chain-only"]) == 3
        assert "MISSING" in capsys.readouterr().out


def test_writer_notices_a_stream_trimmed_past_its_last_entry(
    tmp_path: Path, audit_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"audit-{uuid.uuid4().hex}"
    audit = redis_log(tmp_path, audit_redis, key)
    for i in range(4):
        audit.record(make_request(), DENY, decision_id=f"old{i}")
    assert audit.flush()
    text_client(audit_redis).xtrim(key, maxlen=0, approximate=False)
    with caplog.at_level(logging.WARNING, logger="policy_engine.audit.writer"):
        audit.record(make_request(), DENY, decision_id="new")
        assert audit.close()
    assert "was trimmed past the writer's last entry" in caplog.text
    markers = [r for r in stream_records(audit_redis, key) if r["type"] == "dropped"]
    assert [(m["reason"], m["removed_through_seq"]) for m in markers] == [("stream_trimmed", 5)]
    report = verify_redis(audit_redis.url, key, None)
    assert report.ok and report.verdict == "PARTIAL", report.render()
    assert any("lost 5 entries" in n for n in report.notes)


def test_writer_notices_records_trimmed_before_a_consumer_group_read_them(
    tmp_path: Path,
    audit_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_sink_module, "_GROUP_CHECK_SECONDS", 0.0)
    key = f"audit-{uuid.uuid4().hex}"
    client = text_client(audit_redis)
    client.xgroup_create(key, "siem", id="0", mkstream=True)
    before = metric("pdp_audit_stream_removed_total", sink="redis", reason="unread")
    audit = redis_log(tmp_path, audit_redis, key, redis_maxlen=50)
    with caplog.at_level(logging.WARNING, logger="policy_engine.audit.writer"):
        for i in range(600):
            audit.record(make_request(), DENY, decision_id=f"d{i}")
            if i % 100 == 99:
                assert audit.flush()
        assert audit.close()
    info = client.xinfo_stream(key)
    trimmed = info["entries-added"] - info["length"]
    assert trimmed > 0
    # Every trimmed entry was unread by the group: each is counted, once.
    assert metric("pdp_audit_stream_removed_total", sink="redis", reason="unread") == (
        before + trimmed
    )
    assert "before consumer group siem read" in caplog.text


def test_a_trimmed_stream_is_partial_not_ok(tmp_path: Path, audit_redis: RedisServer) -> None:
    """MAXLEN trims by design, yet verify cannot tell it from an XTRIM: with --partial the
    stream is PARTIAL (exit 4), never OK; without, its mid-chain start is a cut (exit 1)."""
    key = f"audit-{uuid.uuid4().hex}"
    audit = redis_log(tmp_path, audit_redis, key, redis_maxlen=100)
    for i in range(1000):
        audit.record(make_request(), DENY, decision_id=f"d{i}")
    assert audit.close()
    assert verify_redis(audit_redis.url, key, None, allow_partial=True).verdict == "PARTIAL"
    url = audit_redis.url
    assert main(["audit", "verify", url, "--stream", key, "--chain-only", "--partial"]) == 4
    assert main(["audit", "verify", url, "--stream", key, "--chain-only"]) == 1
