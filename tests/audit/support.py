"""Helpers for the audit log tests: sample decisions, schema checks, a private redis-server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import redis

from policy_engine.audit import AuditLog, load_schema
from policy_engine.audit.chain import Sealed
from policy_engine.audit.sinks import FileSink, OpenState, Sink
from policy_engine.audit.verify import verify_files
from policy_engine.bench.redis_server import RedisServer
from policy_engine.config import AuditSettings
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer, Reason
from policy_engine.domain.request import (
    CheckRequest,
    ConnectionState,
    RequestContext,
    Resource,
    Subject,
    SubjectKind,
)

# A token no record may ever contain: tests search every sink's output for it.
TOKEN = "eyJhbGciOiJIUzI1NiJ9.RECOGNISABLE-SUBJECT-TOKEN-4f1c9e.c2lnbmF0dXJl"

VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def schema_errors(record: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(record)]


def assert_valid_lines(lines: list[str]) -> None:
    for number, line in enumerate(lines, 1):
        errors = schema_errors(json.loads(line))
        assert not errors, f"line {number} does not match the schema: {errors}\n{line}"


def jsonl(text: str) -> list[str]:
    """The lines of JSON-lines text. Records may hold U+2028, U+0085 and other characters that
    `str.splitlines` also splits on (JSON leaves them unescaped): only "\n" ends a record."""
    return [line for line in text.split("\n") if line]


def read_records(*paths: Path) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        records.extend(json.loads(line) for line in jsonl(path.read_text()))
    return records


def make_request(
    *,
    subject: str = "alice",
    organization: str = "acme",
    application: str = "pr-reviewer",
    integration: str = "github",
    scope: str = "repo",
    token: str = TOKEN,
    request_id: str = "req-1",
    subject_attributes: dict[str, Any] | None = None,
) -> CheckRequest:
    return CheckRequest(
        organization=organization,
        subject=Subject(
            id=subject,
            kind=SubjectKind.USER,
            attributes=(
                {"groups": ["engineering"], "email": "alice@acme.example"}
                if subject_attributes is None
                else subject_attributes
            ),
            access_token=token,
        ),
        application=Resource(application, {"owner": "platform"}),
        integration=Resource(integration, {}),
        scope=scope,
        context=RequestContext(
            connection=ConnectionState.ACTIVE,
            client_ip="10.1.2.3",
            session_id="sess-9",
            attributes={"source": "test"},
        ),
        request_id=request_id,
    )


ALLOW = Decision(Effect.ALLOW, (), "rev-0123456789abcdef")
DENY = Decision(
    Effect.DENY,
    (
        Reason(
            ErrorCode.POLICY_DENIED,
            Layer.ORG,
            "engineering-developer-tools",
            "no-repository-deletion",
            "Deleting repositories through an agent is not allowed at Acme.",
        ),
    ),
    "rev-0123456789abcdef",
)


def settings(tmp_path: Path, **changes: Any) -> AuditSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "sinks": "file",
        "file_path": tmp_path / "audit.jsonl",
        "checkpoint_every": 50,
        "checkpoint_seconds": 0,
        "retry_max_ms": 200,
    }
    values.update(changes)
    return AuditSettings(**values)


@contextmanager
def module_audit_log(directory: Path) -> Iterator[AuditLog]:
    """A file audit log (`directory`/audit.jsonl) whose queue holds a whole module's decisions;
    closed on the way out."""
    log = AuditLog(
        AuditSettings(enabled=True, file_path=directory / "audit.jsonl", queue_size=100_000)
    )
    log.start()
    try:
        yield log
    finally:
        log.close()


def assert_audited_intact(audit: AuditLog) -> None:
    """Every decision `audit` was given is in its file: none dropped, every line matches the
    schema and the chain verifies."""
    assert audit.flush(timeout=30)
    stats = audit.stats()
    assert stats.dropped == {}, stats.dropped
    path = audit.settings.file_path
    lines = jsonl(path.read_text())
    assert len(lines) > 1
    for line in lines:
        errors = schema_errors(json.loads(line))
        assert not errors, (errors, line[:500])
    report = verify_files([path], None)
    assert report.ok, report.render()


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError("condition not reached")


# --- a private redis-server ----------------------------------------------------------------------


def redis_log(tmp_path: Path, server: RedisServer, key: str, **changes: Any) -> AuditLog:
    audit = AuditLog(
        settings(tmp_path, sinks="redis", redis_url=server.url, redis_stream=key, **changes)
    )
    audit.start()
    return audit


def text_client(server: RedisServer) -> redis.Redis:
    """A client for one of the tests' redis-servers that answers with str."""
    return redis.Redis.from_url(server.url, decode_responses=True)


class FlakySink(Sink):
    """A file sink that fails while `broken` is set (a disk that is full for a while)."""

    name = "flaky"

    def __init__(self, path: Path) -> None:
        self.inner = FileSink(path)
        self.broken = threading.Event()
        self.failures = 0

    def open(self) -> OpenState:
        return self.inner.open()

    def write(self, records: Sequence[Sealed]) -> None:
        if self.broken.is_set():
            self.failures += 1
            raise OSError(28, "No space left on device")
        self.inner.write(records)

    def close(self) -> None:
        self.inner.close()


class HangingSink(Sink):
    """A sink whose writes hang until `release` is set (a stuck NFS mount, a frozen peer)."""

    name = "hanging"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def open(self) -> OpenState:
        return OpenState()

    def write(self, records: Sequence[Sealed]) -> None:
        self.entered.set()
        self.release.wait()
