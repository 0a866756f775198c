"""One port, one server: a second `pdp serve` on a port in use fails at startup with the
address named, in every order of lone processes and `--workers` supervisors; a supervisor's
own workers still share its port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import ConfigError, Settings
from policy_engine.server.app import build_server
from policy_engine.server.empty import EmptyServicer
from policy_engine.server.ports import Reservation, reserve
from tests.server.harness import EXAMPLE_POLICIES, REPO, serve_process
from tests.store.support import free_port

QUIET = {"PDP_METRICS_ADDRESS": "", "PDP_RELOAD__WATCH": "false"}


def _second_serve(
    tmp_path: Path, address: str, workers: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "policy_engine.cli.main", "serve", "--address", address,
        "--policies", str(EXAMPLE_POLICIES), "--workers", str(workers), "--threads", "2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), **QUIET}
    env.update(dict(item.split("=", 1) for item in extra))
    # Bounded: a second server that starts (the old fault) runs until killed here.
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )


def _status(port: int) -> pdp_pb2.GetStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pdp_pb2_grpc.PolicyStatusServiceStub(channel).GetStatus(
            pdp_pb2.GetStatusRequest(), timeout=10
        )


@pytest.mark.parametrize("first", [1, 2])
def test_a_second_server_on_a_port_in_use_fails_at_startup(tmp_path: Path, first: int) -> None:
    """Against a lone server and a `--workers 2` one: a second lone server and a second
    supervisor both fail, on the gRPC port and on the health port alike."""
    health = f"127.0.0.1:{free_port()}"
    env = {**QUIET, "PDP_HEALTH_ADDRESS": health}
    with serve_process(tmp_path, EXAMPLE_POLICIES, workers=first, env=env) as (proc, port, _):
        address = f"127.0.0.1:{port}"
        for second in (1, 2):
            done = _second_serve(tmp_path, address, second)
            assert done.returncode == 2, done.stderr
            assert f"pdp: error: address {address}: cannot bind" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
            elsewhere = f"127.0.0.1:{free_port()}"
            done = _second_serve(tmp_path, elsewhere, second, f"PDP_HEALTH_ADDRESS={health}")
            assert done.returncode == 2, done.stderr
            assert f"pdp: error: health_address {health}: cannot bind" in done.stderr
            assert "Traceback" not in done.stderr
        # The first server still answers, alone: every fresh connection reaches its processes
        # (with --workers 2, both of them: they share the port among themselves).
        pids: set[int] = set()
        for _ in range(64):
            pid = int(_status(port).instance.rsplit(":", 1)[1])
            assert proc.pid in (pid, _parent(pid))
            pids.add(pid)
            if len(pids) == first:
                break
        assert len(pids) == first


def _parent(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no parent for {pid}")


def test_a_reserved_port_admits_only_the_reserving_supervisors_workers() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    reservation = Reservation()
    reserve(address, "address", reservation)
    try:
        with pytest.raises(ConfigError, match=rf"address {address}: cannot bind"):
            reserve(address, "address", Reservation())  # a second supervisor
        with pytest.raises(ConfigError, match=rf"address {address}: cannot bind"):
            build_server(EmptyServicer(), Settings(address=address), policy_ready=True)
        worker, bound = build_server(
            EmptyServicer(), Settings(address=address, workers=2), policy_ready=True
        )
        assert bound == port
        worker.stop(grace=None)
    finally:
        reservation.close()
    with pytest.raises(ConfigError, match="expected host:port"):
        reserve("127.0.0.1", "address", Reservation())


def test_a_name_resolving_to_several_addresses_cannot_start_beside_a_server(
    tmp_path: Path,
) -> None:
    """`localhost` is 127.0.0.1 and ::1: gRPC starts when any one of them binds, so without a
    check a second server would own [::1]:port and answer every client that resolves there."""
    with serve_process(tmp_path, EXAMPLE_POLICIES, workers=1, env=QUIET) as (_proc, port, _):
        for second in (1, 2):
            done = _second_serve(tmp_path, f"localhost:{port}", second)
            assert done.returncode == 2, done.stderr
            assert f"pdp: error: address localhost:{port}: cannot bind 127.0.0.1:{port}" in (
                done.stderr
            ), done.stderr
            assert "Traceback" not in done.stderr
