"""Helpers for the server tests: a real gRPC server on an ephemeral port and a real client."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from policy_engine.api import pdp_pb2_grpc
from policy_engine.config import Settings
from policy_engine.server.app import build_server

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICIES = REPO / "policies"
DOCS = "https://docs.test.example"


@contextmanager
def running(
    servicer: pdp_pb2_grpc.PolicyDecisionServiceServicer,
    settings: Settings | None = None,
    *,
    policy_ready: bool = True,
) -> Iterator[grpc.Channel]:
    """Serve `servicer` on 127.0.0.1:0 and yield a channel to it; stop the server afterwards."""
    settings = (settings or Settings(docs_base_url=DOCS)).replace(address="127.0.0.1:0", threads=4)
    server, port = build_server(servicer, settings, policy_ready=policy_ready)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            yield channel
    finally:
        server.stop(grace=None)
