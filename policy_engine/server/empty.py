"""A servicer that answers ALLOW without looking at the request: the benchmark's ceiling.

It is served through the very same `build_server` (same options, event loop, health and
reflection) as the real service, so the gap between the two measures the decision path
alone: conversion, the engine and response building. Never deploy it.
"""

from __future__ import annotations

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import Settings

_ALLOW = pdp_pb2.CheckResponse(
    effect=pdp_pb2.EFFECT_ALLOW,
    policy_revision="empty",
    decision_id="0" * 32,
    cache_level=pdp_pb2.CACHE_LEVEL_NONE,
)


class EmptyServicer(pdp_pb2_grpc.PolicyDecisionServiceServicer):
    """Check returns one constant response; CheckBatch one constant result per item. Both are
    coroutines, awaited by the asyncio server as the PolicyDecisionServicer's are."""

    async def Check(self, request: pdp_pb2.CheckRequest, context: object) -> pdp_pb2.CheckResponse:
        return _ALLOW

    async def CheckBatch(
        self, request: pdp_pb2.CheckBatchRequest, context: object
    ) -> pdp_pb2.CheckBatchResponse:
        return pdp_pb2.CheckBatchResponse(results=[_ALLOW] * len(request.items))


def serve_empty(settings: Settings) -> None:
    """Serve the EmptyServicer with the real server's settings, workers and signal handling."""
    from policy_engine.server.app import serve_mode

    serve_mode(settings, "empty")
