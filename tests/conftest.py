"""Shared fixtures: real redis-server instances the tests start themselves.

Each is a fresh process on a free port with no persistence, in the test's tmp dir; never the
Redis a developer may run on 6379. Tests that need none of this never start one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from policy_engine.bench.redis_server import RedisServer, RedisUnavailable


def _start(workdir: Path) -> RedisServer:
    try:
        return RedisServer(workdir).start()
    except RedisUnavailable as exc:  # pragma: no cover - the image ships redis-server
        pytest.fail(f"the cache tests need a real redis-server: {exc}")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (to kill, pause or restart as it likes)."""
    server = _start(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = _start(tmp_path_factory.mktemp("redis-shared"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared_redis(shared_redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, emptied for this test (cheaper than a process per test)."""
    if not shared_redis_server.running:  # a test must not kill this one, but be robust
        shared_redis_server.start()
    admin = redis.Redis(port=shared_redis_server.port)
    admin.flushall()
    admin.config_resetstat()
    admin.close()
    yield shared_redis_server
