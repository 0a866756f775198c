"""What the tests comparing `pdp eval` with the server share: a real server to compare with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from policy_engine.client import PdpClient
from policy_engine.config import Settings
from policy_engine.policy import load_policy_set
from policy_engine.server.app import build_server
from policy_engine.server.service import PolicyDecisionServicer


@contextlib.contextmanager
def serving_client(policy_dir: Path) -> Iterator[PdpClient]:
    """The broker's client, connected to a real server on an ephemeral port serving the
    policies of `policy_dir` (loaded once); the server stops when the block ends."""
    policies = load_policy_set(policy_dir)
    settings = Settings().replace(address="127.0.0.1:0", threads=2)
    server, port = build_server(
        PolicyDecisionServicer(lambda: policies, settings), settings, policy_ready=True
    )
    server.start()
    try:
        with PdpClient(f"127.0.0.1:{port}", timeout=10) as pdp:
            yield pdp
    finally:
        server.stop(grace=None)
