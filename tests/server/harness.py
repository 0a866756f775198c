"""Helpers for the server tests: a real gRPC server on an ephemeral port and a real client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from policy_engine.api import pdp_pb2_grpc
from policy_engine.config import Settings
from policy_engine.server.app import build_server
from tests.store.support import free_port, wait_for

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


@contextmanager
def serve_process(
    tmp_path: Path, root: Path, *, workers: int, env: dict[str, str], args: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """`pdp serve` in a subprocess on a free port, as deployed; yields the process, the port and
    its log file. Leaving the block sends SIGTERM and expects a clean exit. No metrics endpoint
    unless `env` names one: the default port (9464) is one for the whole machine, and tests
    run side by side (make test's pytest-xdist workers)."""
    port = free_port()
    log_file = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "policy_engine.cli.main", "serve",
        "--address", f"127.0.0.1:{port}", "--policies", str(root),
        "--workers", str(workers), "--threads", "2", *args,
    ]  # fmt: skip
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PDP_RELOAD__DEBOUNCE_MS": "50",
        "PDP_METRICS_ADDRESS": "",
        **env,
    }
    with log_file.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=log)
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or log_file.read_text().count("serving kontext.pdp.v1") >= workers
            ),
            timeout=60,
            what="the server to start",
        )
        assert proc.poll() is None, log_file.read_text()
        yield proc, port, log_file
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 0, log_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
