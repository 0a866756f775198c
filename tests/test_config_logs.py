"""`log_format: json`: one JSON object per line with time, level, logger, message and every
`extra` field (so `decision_id` and `request_id` travel as fields, not inside the text)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from datetime import datetime

from policy_engine.logs import make_formatter

SCRIPT = """
import logging, sys
from policy_engine.config import load_settings
from policy_engine.logs import setup_logging

settings = load_settings()
setup_logging(settings.log_level, settings.log_format, process=bool(sys.argv[1:]))
log = logging.getLogger("policy_engine.server.service")
log.info("decided", extra={"decision_id": "d-1", "request_id": "r-1"})
log.debug("not at this level")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("failed with %s", "details")
"""


def _run(env: dict[str, str], *args: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_json_lines_parse_with_their_fields() -> None:
    lines = _run({"PDP_LOG_FORMAT": "json"})
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert first["level"] == "INFO"
    assert first["logger"] == "policy_engine.server.service"
    assert first["message"] == "decided"
    assert (first["decision_id"], first["request_id"]) == ("d-1", "r-1")
    assert datetime.fromisoformat(first["time"]).utcoffset().total_seconds() == 0
    assert second["level"] == "ERROR"
    assert second["message"] == "failed with details"
    assert "RuntimeError: boom" in second["exc_info"]


def test_workers_add_their_process_id_and_the_level_applies() -> None:
    lines = _run({"PDP_LOG_FORMAT": "json", "PDP_LOG_LEVEL": "debug"}, "worker")
    records = [json.loads(line) for line in lines]
    assert [r["message"] for r in records] == [
        "decided",
        "not at this level",
        "failed with details",
    ]
    assert all(isinstance(r["process"], int) for r in records)


def test_text_stays_the_default_format() -> None:
    lines = _run({})
    assert lines[0].endswith(" INFO policy_engine.server.service: decided")
    assert "d-1" not in lines[0]


def test_a_logger_call_with_extra_fields_through_the_formatter() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter("json"))
    log = logging.getLogger("tests.config_logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning(
            'quote " and\nnewline',
            extra={"request_id": "r\n2", "decision_id": "d-2", "items": 3},
        )
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1  # a newline inside a message or field stays inside the object
    record = json.loads(lines[0])
    assert record["message"] == 'quote " and\nnewline'
    assert (record["request_id"], record["decision_id"], record["items"]) == ("r\n2", "d-2", 3)
