"""Quotas across real `pdp serve` processes sharing one real redis-server, end to end.

Concurrent clients spread over the replicas (Check and CheckBatch, cached answers and fresh
ones, some carrying a context.time far in the past or future) never get more ALLOWs than a
quota's limit in its window, and exactly the limit when demand exceeds it. With Redis gone,
a quota denies by default and lets the ALLOW stand with `when_unavailable: allow`.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.client import check_request
from tests.cache.support import KEY
from tests.server.harness import serve_process

REPLICAS = 3
LIMIT = 40

ORGANIZATION = """\
kind: Organization
defaults: {org: allow, user: allow, application: allow}
catalog:
  integrations: [github, slack]
  applications: [pr-reviewer]
"""
# Fixed windows of 31 days (a boundary falls inside a test run once in years) and a sliding
# hour: both are decided by Redis's clock, never by a request's.
QUOTAS = f"""\
kind: Quota
name: github-fixed
target: {{integrations: [github], scopes: [repo]}}
limit: {LIMIT}
window: 31d
per: [subject]
---
kind: Quota
name: github-sliding
target: {{integrations: [github], scopes: [read]}}
limit: {LIMIT}
window: 1h
algorithm: sliding
per: [subject, scope]
---
kind: Quota
name: slack-lenient
target: {{integrations: [slack]}}
limit: {LIMIT}
window: 1h
when_unavailable: allow
"""


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[int]]:
    """REPLICAS `pdp serve` processes (one of them with two workers) on one redis-server."""
    root = tmp_path / "policies"
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "organization.yaml").write_text(ORGANIZATION)
    (root / "acme" / "quotas.yaml").write_text(QUOTAS)
    env = {
        "PDP_CACHE__REDIS_URL": redis_server.url,
        "PDP_CACHE__REDIS_SIGNING_KEY": KEY,
        "PDP_QUOTA__REDIS_TIMEOUT_MS": "500",
        "PDP_METRICS_ADDRESS": "",
    }
    with ExitStack() as stack:
        ports = []
        for index in range(REPLICAS):
            logs = tmp_path / f"replica-{index}"
            logs.mkdir()
            workers = 2 if index == 0 else 1
            _, port, _ = stack.enter_context(serve_process(logs, root, workers=workers, env=env))
            ports.append(port)
        yield ports


def _request(subject: str, scope: str = "repo", integration: str = "github") -> Any:
    return check_request("acme", subject, "pr-reviewer", integration, scope)


def _outcome(response: pdp_pb2.CheckResponse) -> str:
    return "ALLOW" if response.effect == pdp_pb2.EFFECT_ALLOW else response.reasons[0].code


def _hammer(ports: list[int], make: Any, demand: int, clients: int = 8) -> Counter[str]:
    """`demand` requests from `clients` threads, each to a random replica: single Checks and
    CheckBatches of up to 5, a third of them with a context.time far away."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    left = [demand]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        stubs = [pdp_pb2_grpc.PolicyDecisionServiceStub(channel) for channel in channels]
        try:
            while True:
                with lock:
                    size = min(left[0], rng.choice((1, 1, 3, 5)))
                    left[0] -= size
                if size == 0:
                    return
                items = []
                for _ in range(size):
                    msg = make()
                    if rng.random() < 1 / 3:  # a client moving its own clock
                        msg.context.time.FromSeconds(rng.choice((0, 10**10, 4 * 10**9)))
                    items.append(msg)
                stub = rng.choice(stubs)
                if size == 1:
                    answers = [stub.Check(items[0], timeout=30)]
                else:
                    batch = pdp_pb2.CheckBatchRequest(items=items)
                    answers = list(stub.CheckBatch(batch, timeout=30).results)
                with lock:
                    outcomes.update(_outcome(answer) for answer in answers)
        finally:
            for channel in channels:
                channel.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def test_replicas_never_allow_more_than_the_quota_and_exactly_it_under_demand(
    cluster: list[int],
) -> None:
    # Demand far beyond the limit, for two subjects at once, fixed and sliding windows.
    fixed = _hammer(cluster, lambda: _request("alice"), demand=3 * LIMIT)
    assert fixed == {"ALLOW": LIMIT, "kontext_rate_limited": 2 * LIMIT}
    sliding = _hammer(cluster, lambda: _request("bob", scope="read"), demand=3 * LIMIT)
    assert sliding == {"ALLOW": LIMIT, "kontext_rate_limited": 2 * LIMIT}
    # Demand below the limit: every request is allowed.
    below = _hammer(cluster, lambda: _request("carol"), demand=LIMIT - 5)
    assert below == {"ALLOW": LIMIT - 5}
    # Alice stays exhausted on every replica, whatever time her requests claim.
    for port in cluster:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            msg = _request("alice")
            msg.context.time.FromSeconds(10**10)
            answer = stub.Check(msg, timeout=30)
        assert _outcome(answer) == "kontext_rate_limited"
        assert answer.reasons[0].policy == "github-fixed"
        assert answer.reasons[0].retry_after.ToMilliseconds() > 0


def test_without_redis_a_quota_denies_unless_it_says_allow(
    cluster: list[int], redis_server: RedisServer
) -> None:
    for port in cluster:  # the answers are cached locally: only the quota needs Redis
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            assert _outcome(stub.Check(_request("dave"), timeout=30)) == "ALLOW"
    redis_server.kill()
    for port in cluster:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            denied = stub.Check(_request("dave"), timeout=30)
            lenient = stub.Check(_request("dave", integration="slack"), timeout=30)
        assert _outcome(denied) == "kontext_server_error"
        assert "quota store is unreachable" in denied.reasons[0].message
        assert _outcome(lenient) == "ALLOW"
