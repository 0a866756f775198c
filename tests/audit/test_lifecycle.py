"""The audit log as a lifecycle component: nothing runs before start, stop keeps its deadline
even when a sink hangs, and the status says which sink fails."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from policy_engine.audit import AuditLog
from policy_engine.lifecycle import Component, State, deadline_in
from tests.audit.support import (
    DENY,
    FlakySink,
    HangingSink,
    make_request,
    read_records,
    settings,
    wait_for,
)


def _audit_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pdp-audit")]


def test_the_constructor_starts_nothing_and_start_writes_what_waited(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    before = _audit_threads()
    audit = AuditLog(settings(tmp_path, file_path=path))
    assert isinstance(audit, Component)
    assert _audit_threads() == before  # no thread started
    assert not path.parent.exists()  # no file opened
    assert audit.status().state is State.NEW and not audit.status().ready
    assert audit.record(make_request(), DENY, decision_id="early")  # waits in the queue
    audit.start()
    audit.start()  # a second start does nothing
    assert audit.status().state is State.RUNNING and audit.status().ready
    assert audit.stop(deadline_in(10))
    assert audit.status().state is State.STOPPED
    assert [r["decision_id"] for r in read_records(path) if r["type"] == "decision"] == ["early"]


def test_stop_before_start_says_what_was_left(tmp_path: Path) -> None:
    audit = AuditLog(settings(tmp_path))
    assert audit.stop(deadline_in(1))  # nothing queued: clean
    queued = AuditLog(settings(tmp_path, file_path=tmp_path / "other.jsonl"))
    queued.record(make_request(), DENY, decision_id="never-written")
    assert not queued.stop(deadline_in(1))
    assert queued.stats().dropped == {"queue/closed": 1}
    assert not queued.record(make_request(), DENY, decision_id="after")  # refused, counted
    queued.start()  # a stopped log does not start again
    assert queued.status().state is State.STOPPED


def test_stop_returns_by_its_deadline_while_a_sink_hangs_and_says_records_were_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hanging = HangingSink()
    audit = AuditLog(settings(tmp_path), sinks=[hanging])
    audit.start()
    try:
        for i in range(5):
            audit.record(make_request(), DENY, decision_id=f"h{i}")
        assert hanging.entered.wait(10)  # the first write is stuck
        for i in range(5, 8):
            audit.record(make_request(), DENY, decision_id=f"h{i}")
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="policy_engine.audit.writer"):
            assert audit.stop(deadline_in(0.5)) is False
        assert time.monotonic() - started < 5  # the deadline plus a short grace, not forever
        messages = [r.getMessage() for r in caplog.records]
        stuck = next(m for m in messages if m.startswith("audit sink hanging"))
        assert "still busy at the deadline" in stuck and "record(s) it holds" in stuck
        assert any("closed before every record was written" in m for m in messages)
    finally:
        hanging.release.set()


@pytest.mark.parametrize("required", [False, True])
def test_status_names_a_failing_sink_and_a_required_log_is_not_ready_meanwhile(
    tmp_path: Path, required: bool
) -> None:
    flaky = FlakySink(tmp_path / "audit.jsonl")
    audit = AuditLog(settings(tmp_path, retry_max_ms=50), sinks=[flaky], required=required)
    audit.start()
    try:
        audit.record(make_request(), DENY, decision_id="ok")
        assert audit.flush()
        assert audit.status().state is State.RUNNING
        flaky.broken.set()
        audit.record(make_request(), DENY, decision_id="while-broken")
        wait_for(lambda: audit.status().state is State.DEGRADED)
        status = audit.status()
        assert status.detail.startswith("sink flaky: write failed (")
        assert "No space left on device" in status.detail and "record(s) waiting" in status.detail
        assert status.ready is not required
        flaky.broken.clear()
        wait_for(lambda: audit.status().state is State.RUNNING)
        assert audit.status().ready
    finally:
        assert audit.stop(deadline_in(10))
