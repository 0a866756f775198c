"""Log setup shared by the server, its workers, the CLI and the benchmark servers.

Two formats (setting `log_format`):

- `text`: `2026-11-30 13:40:11,777 INFO policy_engine.server.app: message`, as always.
- `json`: one JSON object per line, `{"time", "level", "logger", "message", ...}`, where `...`
  are the record's `extra` fields, so identifiers go in as fields, never pasted into the text:
  `log.info("decided", extra={"decision_id": d, "request_id": r})` gives
  `{"time": "2026-11-30T13:40:11.777+00:00", "level": "INFO", "logger": "...",
  "message": "decided", "decision_id": "...", "request_id": "..."}`. A traceback is the
  `exc_info` field. python-json-logger does the encoding, imported only for `json`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import IO, Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_FORMAT_WITH_PROCESS = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

# JSON field names: the record attribute, then its name in the output.
JSON_FIELDS = {"asctime": "time", "levelname": "level", "name": "logger", "message": "message"}


def make_formatter(log_format: LogFormat = "text", *, process: bool = False) -> logging.Formatter:
    """The formatter for `log_format`; `process` adds the process id (several workers share
    one stream). Raises ValueError for any other format name (settings validate it first)."""
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT_WITH_PROCESS if process else TEXT_FORMAT)
    if log_format != "json":
        raise ValueError(f"log_format: expected text or json, got {log_format!r}")
    from pythonjsonlogger.json import JsonFormatter

    class UtcJsonFormatter(JsonFormatter):
        """`time` as ISO 8601 in UTC with milliseconds: sortable, no locale, no zone guess."""

        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
            moment = datetime.fromtimestamp(record.created, UTC)
            return moment.isoformat(timespec="milliseconds")

    names = ["asctime", "levelname", "name", *(["process"] if process else []), "message"]
    return UtcJsonFormatter(
        "".join(f"{{{name}}}" for name in names),
        style="{",
        rename_fields={k: v for k, v in JSON_FIELDS.items() if k != v},
    )


def setup_logging(
    level: str = "INFO",
    log_format: LogFormat = "text",
    *,
    process: bool = False,
    stream: IO[str] | None = None,
    force: bool = False,
) -> bool:
    """Give the root logger one handler writing `log_format` at `level` to `stream` (default
    stderr), as `logging.basicConfig` does: nothing happens when the root logger already has
    handlers (an embedding program or test configured it), unless `force`.

    Returns whether it configured the root logger. Raises ValueError for an unknown level or
    format."""
    root = logging.getLogger()
    if root.handlers and not force:
        return False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter(log_format, process=process))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=force)
    return True
