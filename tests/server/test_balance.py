"""Workers sharing a port: how their connections are counted, and connection recycling moving a
long-lived client between them (`policy_engine.server.balance`).

Real processes bind one real port with SO_REUSEPORT (plain sockets, and `pdp serve --workers
2`); a real gRPC client. Nothing is timed: the recycling test asserts which workers answered.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from policy_engine.api import pdp_pb2
from policy_engine.bench import procs, workloads
from policy_engine.bench.server import RunningServer, ServerOptions, ServerSpec, running
from policy_engine.config import Settings, TransportSettings
from policy_engine.server.app import transport_options
from policy_engine.server.balance import (
    WORKER_CONNECTION_AGE_MS,
    connection_age_ms,
    connections_by_pid,
    listening,
)

REPO = Path(__file__).resolve().parents[2]

# Binds the port given on the command line with SO_REUSEPORT, accepts and keeps every
# connection, and answers each line on stdin with how many it holds.
ACCEPTOR = textwrap.dedent(
    """
    import select, socket, sys
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1])))
    listener.listen(128)
    print("ready", flush=True)
    held = []
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if listener in readable:
            held.append(listener.accept()[0])
        if sys.stdin in readable:
            if not sys.stdin.readline():
                break
            print(len(held), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def acceptors() -> Iterator[tuple[int, list[subprocess.Popen[str]]]]:
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", ACCEPTOR, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield port, processes
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _held(process: subprocess.Popen[str]) -> int:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("count\n")
    process.stdin.flush()
    return int(process.stdout.readline())


def test_connections_are_counted_for_the_process_that_accepted_them(
    acceptors: tuple[int, list[subprocess.Popen[str]]],
) -> None:
    port, processes = acceptors
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
    try:
        deadline = time.monotonic() + 30
        while sum(_held(p) for p in processes) < len(clients) and time.monotonic() < deadline:
            time.sleep(0.05)
        held = {p.pid: _held(p) for p in processes}
        assert sum(held.values()) == len(clients)
        # What each process accepted is what /proc says it holds; client sockets (whose local
        # port is their own) and the listeners are not counted.
        assert connections_by_pid(port, [p.pid for p in processes]) == held
        assert connections_by_pid(port, [1_000_000_000]) == {1_000_000_000: 0}  # no such pid
    finally:
        for client in clients:
            client.close()


def test_listeners_are_found_per_process(
    acceptors: tuple[int, list[subprocess.Popen[str]]],
) -> None:
    port, processes = acceptors
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pids = [p.pid for p in processes]
        assert listening(port, [*pids, sleeper.pid]) == {**dict.fromkeys(pids, True),
                                                          sleeper.pid: False}  # fmt: skip
        assert listening(_free_port(), pids) == dict.fromkeys(pids, False)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_several_workers_recycle_connections_unless_configured() -> None:
    assert connection_age_ms(1, None) == 0  # one process: nothing to move a connection to
    assert connection_age_ms(2, None) == WORKER_CONNECTION_AGE_MS
    assert connection_age_ms(8, None) == WORKER_CONNECTION_AGE_MS
    assert connection_age_ms(2, 0) == 0  # the operator's "never" wins
    assert connection_age_ms(2, 5_000) == 5_000  # as does any age
    assert connection_age_ms(1, 5_000) == 5_000
    with pytest.raises(ValueError):
        connection_age_ms(0, None)
    with pytest.raises(ValueError):
        connection_age_ms(2, -1)


def test_the_server_recycles_connections_only_with_several_workers() -> None:
    def options(**fields: object) -> dict[str, int]:
        transport = TransportSettings(**fields)  # type: ignore[arg-type]
        return dict(transport_options(Settings(workers=workers, transport=transport)))

    workers = 1
    assert "grpc.max_connection_age_ms" not in options()
    workers = 2
    assert options()["grpc.max_connection_age_ms"] == WORKER_CONNECTION_AGE_MS
    assert "grpc.max_connection_age_ms" not in options(max_connection_age_ms=0)
    assert options(max_connection_age_ms=7_000)["grpc.max_connection_age_ms"] == 7_000


@contextlib.contextmanager
def _two_workers(tmp_path: Path, env: dict[str, str]) -> Iterator[RunningServer]:
    spec = ServerSpec(
        "policy",
        env={**workloads.CACHE_OFF, "PDP_METRICS_ADDRESS": "127.0.0.1:0", **env},
        workers=2,
    )
    options = ServerOptions(2, None, REPO / "policies")
    with running(spec, options, tmp_path / "server.log", cwd=REPO) as server:
        yield server


def _decisions_by_worker(server: RunningServer) -> dict[int, float]:
    workers = procs.workers(server.process.pid)
    directory = procs.multiproc_dir(workers[0])
    assert len(workers) == 2 and directory is not None
    return procs.decisions_by_pid(directory, workers)


def _call_until(server: RunningServer, done: Callable[[], bool], calls: int) -> None:
    """`calls` Checks over ONE channel (one connection at a time), stopping early once
    `done()` is true."""
    with grpc.insecure_channel(server.target) as channel:
        check = channel.unary_unary(
            workloads.method_path("Check"),
            request_serializer=pdp_pb2.CheckRequest.SerializeToString,
            response_deserializer=pdp_pb2.CheckResponse.FromString,
        )
        for index in range(calls):
            answer = check(workloads.allow_tuple(), timeout=10)
            assert answer.effect == pdp_pb2.EFFECT_ALLOW
            if index % 20 == 0 and done():
                return
            time.sleep(0.005)


def test_without_recycling_one_client_connection_stays_on_one_worker(tmp_path: Path) -> None:
    with _two_workers(tmp_path, {}) as server:
        port = int(server.target.rpartition(":")[2])
        with grpc.insecure_channel(server.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            held = connections_by_pid(port, procs.workers(server.process.pid))
            assert sorted(held.values()) == [0, 1]  # one connection, one worker holds it
        _call_until(server, lambda: False, 200)
        decided = _decisions_by_worker(server)
        assert sorted(decided.values()) == [0, 200]


def test_recycled_connections_move_one_client_between_workers(tmp_path: Path) -> None:
    """A 300 ms age redraws the client's worker on every reconnect: both answer, no call
    fails (chance of all draws on one worker in 10 s of calls: about 2^-30)."""
    env = {
        "PDP_TRANSPORT__MAX_CONNECTION_AGE_MS": "300",
        "PDP_TRANSPORT__MAX_CONNECTION_AGE_GRACE_MS": "5000",
    }
    with _two_workers(tmp_path, env) as server:
        _call_until(server, lambda: min(_decisions_by_worker(server).values()) > 0, 2000)
        assert min(_decisions_by_worker(server).values()) > 0
