"""Fixtures for the audit log tests.

Every audit file a test leaves under its tmp_path is validated against the JSON Schema after
the test (files named `*.tampered` are left alone: they are broken on purpose).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policy_engine.audit import writer as writer_module
from tests.audit.support import RedisServer, assert_valid_lines, jsonl


@pytest.fixture(autouse=True)
def _audit_files_match_schema(tmp_path: Path) -> Iterator[None]:
    yield
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and ".jsonl" in path.name and not path.name.endswith(".tampered"):
            assert_valid_lines(jsonl(path.read_text()))


@pytest.fixture
def audit_redis(shared_redis_server: RedisServer) -> RedisServer:
    """The session's redis-server (tests use keys of their own)."""
    return shared_redis_server


@pytest.fixture
def audit_own_redis(redis_server: RedisServer) -> RedisServer:
    """A redis-server for one test, which it may kill and restart."""
    return redis_server


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Holds the dispatcher inside its first record until released, so the queue fills."""
    entered, release = threading.Event(), threading.Event()
    real = writer_module.encode_record

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "encode_record", slow)
    yield entered, release
    release.set()
