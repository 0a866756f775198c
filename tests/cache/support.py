"""Helpers for the cache tests: settings, requests, answers to compare, a clock to move."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import redis

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.bench.workloads import check_request
from policy_engine.config import CacheSettings, Settings
from policy_engine.policy import CompiledPolicySet
from policy_engine.server.service import PolicyDecisionServicer
from tests.server.harness import DOCS, running

BASE = Settings(docs_base_url=DOCS)
# Signing keys for the Redis level (64 hex characters, as `openssl rand -hex 32` makes them).
KEY = "5e1f" * 16
OLD_KEY = "0a1d" * 16
NEW_KEY = "9e77" * 16
NONE, LOCAL, REDIS = (
    pdp_pb2.CACHE_LEVEL_NONE,
    pdp_pb2.CACHE_LEVEL_LOCAL,
    pdp_pb2.CACHE_LEVEL_REDIS,
)


def settings(redis_server: RedisServer | None = None, **cache: Any) -> Settings:
    """Test settings: the cache as given, Redis at `redis_server` when there is one."""
    values: dict[str, Any] = {"breaker_reset_seconds": 0.5}
    if redis_server is not None:
        values["redis_url"] = redis_server.url
        values["redis_timeout_ms"] = 200  # generous: CI boxes stall; faults are tested apart
    if redis_server is not None or cache.get("redis_url"):
        values["redis_signing_key"] = KEY
    values.update(cache)
    return BASE.replace(cache=replace(CacheSettings(), **values))


def tuple_request(
    subject_id: str = "alice",
    groups: Sequence[str] = ("engineering",),
    integration: str = "github",
    scope: str = "repo",
    **fields: Any,
) -> pdp_pb2.CheckRequest:
    msg = check_request(subject_id, list(groups), integration, scope)
    if fields:
        msg.MergeFrom(pdp_pb2.CheckRequest(**fields))
    return msg


def answer(resp: pdp_pb2.CheckResponse) -> tuple[Any, ...]:
    """What must be identical between a cached and an uncached answer."""
    return (
        resp.effect,
        tuple(
            (r.code, r.http_status, r.layer, r.policy, r.rule, r.message, r.docs_url, r.field)
            for r in resp.reasons
        ),
        resp.policy_revision,
        tuple((m.layer, m.policy, m.rule, m.effect) for m in resp.matched_rules),
    )


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime(2026, 6, 1, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@contextmanager
def serving(
    servicer: PolicyDecisionServicer, config: Settings = BASE
) -> Iterator[pdp_pb2_grpc.PolicyDecisionServiceStub]:
    """A real gRPC server for `servicer` on an ephemeral port, and a stub to call it."""
    try:
        with running(servicer, config) as channel:
            yield pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
    finally:
        servicer.close()


def servicer_for(
    policies: CompiledPolicySet, config: Settings, **kwargs: Any
) -> PolicyDecisionServicer:
    return PolicyDecisionServicer(lambda: policies, config, **kwargs)


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=5)


def command_calls(client: redis.Redis) -> dict[str, int]:
    """`INFO commandstats` as {command: calls}."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def call(stub: pdp_pb2_grpc.PolicyDecisionServiceStub, msg: pdp_pb2.CheckRequest) -> Any:
    return stub.Check(msg, timeout=10)


def rpc_code(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code()  # type: ignore[no-any-return]
