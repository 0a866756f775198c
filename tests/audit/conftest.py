"""Fixtures for the audit log tests.

Every audit file a test leaves under its tmp_path is validated against the JSON Schema after
the test (files named `*.tampered` are left alone: they are broken on purpose).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.support import RedisServer, assert_valid_lines


@pytest.fixture(autouse=True)
def _audit_files_match_schema(tmp_path: Path) -> Iterator[None]:
    yield
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and ".jsonl" in path.name and not path.name.endswith(".tampered"):
            assert_valid_lines(path.read_text().splitlines())


@pytest.fixture(scope="session")
def audit_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def audit_own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for one test, which it may kill and restart."""
    if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis-own"))
    server.start()
    yield server
    server.stop()
