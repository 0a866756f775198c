"""How Redis is used: round trips per RPC, replicas sharing it, and redis-py's three clients.

Counted with Redis' own `INFO commandstats`, on a real redis-server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.api import pdp_pb2
from policy_engine.bench.redis_server import RedisServer, cluster_node
from policy_engine.policy import CompiledPolicySet, load_policy_set
from tests.cache.support import (
    LOCAL,
    NONE,
    REDIS,
    admin,
    answer,
    command_calls,
    servicer_for,
    serving,
    settings,
    tuple_request,
)
from tests.server.harness import EXAMPLE_POLICIES


@pytest.fixture(scope="module")
def policies() -> CompiledPolicySet:
    return load_policy_set(EXAMPLE_POLICIES)


def _batch(size: int, offset: int = 0) -> pdp_pb2.CheckBatchRequest:
    """`size` distinct tuples, allows and denies."""
    items = []
    for i in range(offset, offset + size):
        scope = ("repo", "delete_repo", "read:org")[i % 3]
        items.append(tuple_request(f"engineer-{i}", ["engineering"], "github", scope))
    return pdp_pb2.CheckBatchRequest(items=items)


def _delta(after: dict[str, int], before: dict[str, int], command: str) -> int:
    return after.get(command, 0) - before.get(command, 0)


def test_a_batch_reads_with_one_mget_and_writes_with_one_pipeline(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    config = settings(shared_redis)
    servicer = servicer_for(policies, config)
    cache = servicer.cache
    assert cache is not None
    client = admin(shared_redis)
    batch = _batch(30)
    with serving(servicer, config) as stub:
        before, pipelines = command_calls(client), cache.pipelines
        first = stub.CheckBatch(batch, timeout=10)
        assert cache.flush()
        after = command_calls(client)
        assert _delta(after, before, "mget") == 1  # every local miss in one MGET
        assert _delta(after, before, "get") == 0
        assert _delta(after, before, "set") == 30  # every write ...
        assert cache.pipelines - pipelines == 1  # ... in one pipeline
        assert {r.cache_level for r in first.results} == {NONE}

        cache.clear_local()  # as on a replica that has never seen these tuples
        before = after
        second = stub.CheckBatch(batch, timeout=10)
        assert cache.flush()
        after = command_calls(client)
        assert _delta(after, before, "mget") == 1
        assert _delta(after, before, "set") == 0  # hits are not written back
        assert {r.cache_level for r in second.results} == {REDIS}

        before = after
        third = stub.CheckBatch(batch, timeout=10)
        after = command_calls(client)
        assert _delta(after, before, "mget") == 0  # all local: Redis not asked at all
        assert {r.cache_level for r in third.results} == {LOCAL}
    assert [answer(r) for r in first.results] == [answer(r) for r in third.results]


def test_a_check_reads_with_one_get_and_only_on_a_local_miss(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    config = settings(shared_redis)
    servicer = servicer_for(policies, config)
    client = admin(shared_redis)
    msg = tuple_request()
    with serving(servicer, config) as stub:
        before = command_calls(client)
        stub.Check(msg, timeout=10)
        assert servicer.cache is not None and servicer.cache.flush()
        stub.Check(msg, timeout=10)
        stub.Check(msg, timeout=10)
        after = command_calls(client)
    assert _delta(after, before, "get") == 1
    assert _delta(after, before, "set") == 1


def test_two_replicas_share_decisions_through_redis(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    config = settings(shared_redis)
    replica_a, replica_b = servicer_for(policies, config), servicer_for(policies, config)
    batch = _batch(12)
    single = tuple_request("bob", ["sales"])
    with serving(replica_a, config) as stub_a, serving(replica_b, config) as stub_b:
        from_a = stub_a.CheckBatch(batch, timeout=10)
        stub_a.Check(single, timeout=10)
        assert replica_a.cache is not None and replica_a.cache.flush()
        from_b = stub_b.CheckBatch(batch, timeout=10)
        single_b = stub_b.Check(single, timeout=10)
    assert {r.cache_level for r in from_a.results} == {NONE}
    assert {r.cache_level for r in from_b.results} == {REDIS}
    assert single_b.cache_level == REDIS
    assert [answer(r) for r in from_a.results] == [answer(r) for r in from_b.results]


def test_redis_with_a_password(
    policies: CompiledPolicySet, tmp_path: Path, shared_redis: RedisServer
) -> None:
    server = RedisServer(tmp_path / "auth", None, "--requirepass", "s3cret").start()
    try:
        right = settings(
            local_max_entries=0, redis_url=f"redis://:s3cret@127.0.0.1:{server.port}/0"
        )
        wrong = settings(local_max_entries=0, redis_url=f"redis://:nope@127.0.0.1:{server.port}/0")
        good, bad = servicer_for(policies, right), servicer_for(policies, wrong)
        msg = tuple_request()
        with serving(good, right) as stub, serving(bad, wrong) as stub_bad:
            stub.Check(msg, timeout=10)
            assert good.cache is not None and good.cache.flush()
            assert stub.Check(msg, timeout=10).cache_level == REDIS
            # A refused login is a Redis failure like any other: the engine answers.
            answers = [stub_bad.Check(msg, timeout=10) for _ in range(5)]
            assert all(r.effect == pdp_pb2.EFFECT_ALLOW and not r.cached for r in answers)
            assert bad.cache is not None and bad.cache.breaker.opened_count >= 1
    finally:
        server.stop()


def test_redis_cluster_mode(policies: CompiledPolicySet, tmp_path: Path) -> None:
    """A one-node cluster owning every slot: redis-py's RedisCluster, mget_nonatomic."""
    server = cluster_node(tmp_path / "cluster")
    try:
        config = settings(server, redis_mode="cluster", local_max_entries=0)
        writer, reader = servicer_for(policies, config), servicer_for(policies, config)
        batch = _batch(10)
        with serving(writer, config) as stub_w, serving(reader, config) as stub_r:
            first = stub_w.CheckBatch(batch, timeout=10)
            stub_w.Check(tuple_request(), timeout=10)
            assert writer.cache is not None and writer.cache.flush()
            second = stub_r.CheckBatch(batch, timeout=10)
            single = stub_r.Check(tuple_request(), timeout=10)
        assert {r.cache_level for r in first.results} == {NONE}
        assert {r.cache_level for r in second.results} == {REDIS}
        assert single.cache_level == REDIS
        assert [answer(r) for r in first.results] == [answer(r) for r in second.results]
        assert writer.cache.redis is not None and writer.cache.redis.mode == "cluster"
    finally:
        server.stop()


def test_redis_sentinel_mode(policies: CompiledPolicySet, tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master").start()
    sentinel = RedisServer(tmp_path / "sentinel", None, sentinel_of=("pdp-master", master.port))
    try:
        sentinel.start()
        config = settings(
            local_max_entries=0,
            redis_mode="sentinel",
            redis_sentinel_master="pdp-master",
            redis_url=f"redis://127.0.0.1:{sentinel.port}/0",
            redis_timeout_ms=500,
        )
        servicer = servicer_for(policies, config)
        msg = tuple_request()
        with serving(servicer, config) as stub:
            stub.Check(msg, timeout=10)
            assert servicer.cache is not None and servicer.cache.flush()
            assert stub.Check(msg, timeout=10).cache_level == REDIS
        assert admin(master).dbsize() == 1  # written to the master Sentinel named
    finally:
        sentinel.stop()
        master.stop()


def test_sentinel_urls_list_the_sentinels() -> None:
    from policy_engine.cache.redis_backend import RedisBackend
    from policy_engine.config import CacheSettings

    backend = RedisBackend(
        CacheSettings(
            redis_mode="sentinel",
            redis_sentinel_master="m",
            redis_url="rediss://u:p%40ss@h1:26379,[::1]:26380/3",
        )
    )
    pool = backend.client().connection_pool  # creating it connects nothing
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("h1", 26379), ("::1", 26380)]
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "u", "p@ss")
    assert "SSL" in pool.connection_class.__name__  # rediss:// means TLS to the master too
    assert kwargs["socket_timeout"] == 0.05


@pytest.mark.parametrize(
    ("mode", "url", "message"),
    [
        ("replicated", "redis://h:1", "redis_mode"),
        ("standalone", "http://h:1", "redis_url"),
        ("cluster", "memcached://h:1", "redis_url"),
    ],
)
def test_bad_redis_settings_are_named(mode: str, url: str, message: str) -> None:
    from policy_engine.cache.redis_backend import RedisBackend
    from policy_engine.config import CacheSettings, ConfigError

    with pytest.raises(ConfigError, match=message):
        RedisBackend(CacheSettings(redis_mode=mode, redis_url=url))
