"""Redis Cluster: a call's items are grouped by organization (the keys' hash tag), one
EVALSHA per organization, all in one cluster pipeline (a one-node cluster owning every slot)."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from policy_engine.bench.redis_server import cluster_node
from tests.quota.support import SLIDING, charge, consume, redis_store, spec


def test_one_script_per_organization_in_one_pipeline(tmp_path: Path) -> None:
    server = cluster_node(tmp_path / "cluster")
    try:
        node = redis.Redis(port=server.port)
        store = redis_store(server.url, redis_mode="cluster")
        acme, globex = spec(limit=2), spec(limit=1, organization="globex", algorithm=SLIDING)
        items = [[charge(acme)], [charge(globex)], [charge(acme)], [charge(globex)], [charge(acme)]]
        try:
            # The first call finds no script (NOSCRIPT), loads it and runs again once.
            assert consume(store, [[charge(spec("warm-up"))]])[0].admitted
            assert store.round_trips == 2
            node.config_resetstat()
            verdicts = consume(store, items)
        finally:
            store.stop(time.monotonic() + 5)
        assert [v.admitted for v in verdicts] == [True, True, True, False, False]
        assert verdicts[3].exhausted == globex and verdicts[4].exhausted == acme
        assert store.round_trips == 3  # one more pipeline
        assert int(node.info("commandstats")["cmdstat_evalsha"]["calls"]) == 2  # 2 organizations
        node.close()
    finally:
        server.stop()


def test_a_cluster_node_that_may_evict_counters_counts_nothing(tmp_path: Path) -> None:
    """Cluster mode reads every node's eviction settings (INFO answered per node)."""
    server = cluster_node(tmp_path / "cluster")
    try:
        node = redis.Redis(port=server.port)
        node.config_set("maxmemory", "100mb")
        node.config_set("maxmemory-policy", "allkeys-lru")
        store = redis_store(server.url, redis_mode="cluster")
        try:
            assert not consume(store, [[charge(spec())]])[0].admitted
            assert "maxmemory-policy allkeys-lru" in store.status().detail
        finally:
            store.stop(time.monotonic() + 5)
        assert node.keys("pdp:quota:*") == []
        node.close()
    finally:
        server.stop()
