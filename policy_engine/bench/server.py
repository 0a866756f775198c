"""Starting a server under test as a subprocess, waiting until it is healthy, stopping it.

A subprocess rather than an in-process server, so the harness's own work (the gRPC client,
parsing logs) never shares a GIL with the server being measured, and so the server runs
exactly as deployed: the `pdp serve` command line, its flags and its environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.bench import procs
from policy_engine.errors import PolicyEngineError
from policy_engine.server import balance

HEALTH_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0  # the server's own grace (5 s) plus the supervisor's slack


class ServerError(PolicyEngineError, RuntimeError):
    """The server did not start, did not become healthy, or died while being measured."""


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What every server in one benchmark run shares (set from the harness's flags).

    `threads` None leaves the server's own default (`--threads` is not passed); `cpu` pins a
    one-process server to that core with taskset (a server of several workers is never
    pinned: its workers need the cores).
    """

    workers: int
    threads: int | None
    policy_dir: Path
    cpu: int | None = None


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """`command` run on `cpu` only (through taskset, which execs it: the pid stays the same)."""
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def default_cpus() -> tuple[int | None, int | None]:
    """(server core, load core): the first two usable cores, or no pinning with fewer or
    without taskset."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None, None
    return cpus[0], cpus[1]


def _process_flags(options: ServerOptions) -> list[str]:
    threads = [] if options.threads is None else ["--threads", str(options.threads)]
    return ["--workers", str(options.workers), *threads]


def _policy_command(address: str, options: ServerOptions) -> list[str]:
    return [
        sys.executable, "-m", "policy_engine.cli.main", "serve",
        "--address", address, "--policies", str(options.policy_dir), *_process_flags(options),
    ]  # fmt: skip


def _empty_command(address: str, options: ServerOptions) -> list[str]:
    return [
        sys.executable, "-m", "policy_engine.bench.empty_server",
        "--address", address, *_process_flags(options),
    ]  # fmt: skip


CommandBuilder = Callable[[str, ServerOptions], list[str]]

# Placeholders a row's environment may use; the harness substitutes them when it starts the
# server: its own redis-server's URL, a URL on which nothing listens (Redis down), the file
# holding the run's random Redis signing key, and a directory for audit files with a signing
# key made for the run.
REDIS_URL = "{redis_url}"
CLOSED_REDIS_URL = "{closed_redis_url}"
CACHE_KEY_FILE = "{cache_key_file}"
AUDIT_DIR = "{audit_dir}"
AUDIT_KEY = "{audit_key}"

# A server "kind" names how to start it; a row adds flags and environment on top.
SERVER_KINDS: dict[str, CommandBuilder] = {
    "policy": _policy_command,
    "empty": _empty_command,
}


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """Which server a row measures: a kind from SERVER_KINDS, extra flags, extra environment,
    and its own number of worker processes (None: the run's `--workers`). `policy_files`:
    (path below the policy directory, text) of files the server's copy of the run's policy
    directory gains (a quota for a row that measures one), none: the directory as it is."""

    kind: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workers: int | None = None
    policy_files: tuple[tuple[str, str], ...] = ()

    @property
    def needs_redis(self) -> bool:
        return any(REDIS_URL in value for value in self.env.values())

    def environment(self, substitutions: Mapping[str, str]) -> dict[str, str]:
        """The row's environment with the placeholders replaced."""
        env: dict[str, str] = {}
        for key, value in self.env.items():
            for placeholder, actual in substitutions.items():
                value = value.replace(placeholder, actual)
            env[key] = value
        return env

    def options(self, options: ServerOptions) -> ServerOptions:
        """The run's options with this server's own worker count, if it has one."""
        if self.workers is None:
            return options
        return dataclasses.replace(options, workers=self.workers)

    def with_policy_files(self, options: ServerOptions, workdir: Path) -> ServerOptions:
        """`options` serving a copy of its policy directory, in `workdir`, with this server's
        `policy_files` added; `options` itself when it adds none."""
        if not self.policy_files:
            return options
        copy = workdir / "policies"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(options.policy_dir, copy)
        for relative, text in self.policy_files:
            (copy / relative).write_text(text)
        return dataclasses.replace(options, policy_dir=copy)

    def command(self, address: str, options: ServerOptions) -> list[str]:
        """The command line: the kind's, then the extra flags; pinned to `options.cpu` when
        this server is one process."""
        try:
            build = SERVER_KINDS[self.kind]
        except KeyError:
            raise ServerError(
                f"unknown server kind {self.kind!r}; known: {', '.join(SERVER_KINDS)}"
            ) from None
        own = self.options(options)
        command = [*build(address, own), *self.args]
        return pinned(command, own.cpu if own.workers == 1 else None)


def free_port() -> int:
    """A port nothing listens on right now (the kernel's choice), for the server to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _health(target: str, timeout_s: float) -> int | None:
    """The overall ("") health status, or None if the server cannot be reached yet."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # types-grpcio-health-checking's HealthStub declares no methods (the generated
            # stub adds them in __init__).
            request = health_pb2.HealthCheckRequest(service="")
            reply = stub.Check(request, timeout=timeout_s)  # type: ignore[attr-defined]
        except grpc.RpcError:
            return None
        return int(reply.status)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class RunningServer:
    """A started server: where to reach it, its process, and where its output goes."""

    target: str  # host:port for gRPC clients
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url_base(self) -> str:
        return f"http://{self.target}"

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServerError(
                f"server exited with code {self.process.returncode}; "
                f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
            )


def _wait_healthy(server: RunningServer, timeout_s: float, workers: int = 1) -> None:
    """Until health says SERVING and, with several `workers`, every worker listens on the
    port: health answers from whichever worker a connection reaches, and a worker still
    starting would leave every connection of the load to the others."""
    deadline = time.monotonic() + timeout_s
    status: int | None = None
    while time.monotonic() < deadline:
        server.check_alive()
        status = _health(server.target, timeout_s=1.0)
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.1)
    else:
        raise ServerError(
            f"server at {server.target} not SERVING after {timeout_s:.0f}s (last status "
            f"{status}); last lines of {server.log_path}:\n{_tail(server.log_path)}"
        )
    if workers < 2:
        return
    port = int(server.target.rpartition(":")[2])
    ready: dict[int, bool] = {}
    while time.monotonic() < deadline:
        server.check_alive()
        found = [p for p in procs.workers(server.process.pid) if p != server.process.pid]
        ready = balance.listening(port, found)
        if len(ready) == workers and all(ready.values()):
            return
        time.sleep(0.1)
    raise ServerError(
        f"server at {server.target}: {sum(ready.values())} of {workers} workers listening "
        f"after {timeout_s:.0f}s; last lines of {server.log_path}:\n{_tail(server.log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the supervisor forwards it to its workers), then SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The whole session: workers too, which were started by the supervisor we started.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


SPAWN_WAIT_S = 10.0  # after a signal: how long to wait for a Popen under way to finish


def _spawn(command: list[str], into: list[subprocess.Popen[bytes]], **options: Any) -> None:
    """`subprocess.Popen` on a thread of its own, the process appended to `into`.

    A signal (Ctrl-C, the harness's SIGTERM) raises in the main thread, and raised inside
    Popen after its fork it would leave the child running with no one holding its pid. Here it
    raises while the main thread waits; the wait for the Popen under way goes on (up to
    SPAWN_WAIT_S, in case the thread never started), so the caller, who holds `into`, stops
    whatever started.
    """
    failed: list[BaseException] = []
    finished = threading.Event()

    def start() -> None:
        try:
            into.append(subprocess.Popen(command, **options))
        except BaseException as exc:
            failed.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=start, name="spawn-server", daemon=True)
    try:
        thread.start()
        finished.wait()
    finally:
        finished.wait(SPAWN_WAIT_S)
    if failed:
        raise failed[0]


@contextlib.contextmanager
def running(
    spec: ServerSpec,
    options: ServerOptions,
    log_path: Path,
    *,
    cwd: Path,
    health_timeout_s: float = HEALTH_TIMEOUT_S,
    substitutions: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Start `spec` in `cwd` on a free port, yield it once healthy, always stop it afterwards.

    `extra_env` goes under the row's own environment (a previous build's PYTHONPATH).
    Output goes to a file, not a pipe: a pipe nobody drains would block a chatty server
    (an audit log line per decision) and quietly throttle the benchmark.
    """
    target = f"127.0.0.1:{free_port()}"
    env = {**os.environ, **(extra_env or {}), **spec.environment(substitutions or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []
    try:
        with log_path.open("wb") as log:
            _spawn(
                spec.command(target, options),
                started,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a hung one is killed whole
            )
        server = RunningServer(target, started[0], log_path)
        _wait_healthy(server, health_timeout_s, spec.options(options).workers)
        yield server
        server.check_alive()
    finally:
        for process in started:
            _stop(process)
