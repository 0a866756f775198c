"""A throwaway `redis-server` on a free port: for the benchmark's Redis rows and for the tests.

Never the Redis a developer may run on 6379: every instance gets its own free port, its own
working directory, no persistence (`--save ''`, `--appendonly no`), and is stopped afterwards.
Tests also kill it (SIGKILL), restart it on the same port, and pause it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from policy_engine.errors import PolicyEngineError

START_TIMEOUT_S = 10.0


class RedisUnavailable(PolicyEngineError, RuntimeError):
    """redis-server is not installed, or did not start."""


def redis_server_path() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if path is None:
        raise RedisUnavailable("redis-server not found (apt-get install -y redis-server)")
    return path


def redis_server_version() -> str:
    try:
        done = subprocess.run(
            [redis_server_path(), "--version"], capture_output=True, text=True, check=False
        )
    except (OSError, RedisUnavailable):
        return "redis-server (version unknown)"
    return done.stdout.split(" sha=")[0].strip() or "redis-server (version unknown)"


def free_port(*, with_cluster_bus: bool = False) -> int:
    """A free port; with `with_cluster_bus`, port + 10000 (Redis Cluster's bus) is free too."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not with_cluster_bus:
            return port
        if port + 10_000 <= 65_535:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10_000))
                except OSError:
                    continue
            return port


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")  # up, with a password
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `start()` again after `kill()` reuses the same port."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *extra_args: str,
        sentinel_of: tuple[str, int] | None = None,
    ) -> None:
        """`sentinel_of=(master name, master port)` starts a Sentinel watching that master."""
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = extra_args
        self.sentinel_of = sentinel_of
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        head = [redis_server_path()]
        if self.sentinel_of is not None:
            # Sentinel insists on a config file it can rewrite.
            name, master_port = self.sentinel_of
            config = self.workdir / f"sentinel-{self.port}.conf"
            config.write_text(f"sentinel monitor {name} 127.0.0.1 {master_port} 1\n")
            head += [str(config), "--sentinel"]
        command = [
            *head,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / f"redis-{self.port}.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise RedisUnavailable(f"redis-server exited {self.process.returncode}: {err}")
            if _ping(self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise RedisUnavailable(f"redis-server on port {self.port} did not answer PING")

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, as when a Redis host dies."""
        self._signal_and_wait(signal.SIGKILL)

    def stop(self) -> None:
        self._signal_and_wait(signal.SIGTERM)

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP: connections stay open, nothing is answered) for the
        block, continued (SIGCONT) after it, whatever happened: a hung Redis host."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


def cluster_node(workdir: Path) -> RedisServer:
    """A started one-node Redis Cluster owning every slot, its state ok (redis-py's
    RedisCluster client then runs against it as against any cluster). Raises
    RedisUnavailable when it does not become ok within START_TIMEOUT_S."""
    import redis

    server = RedisServer(
        workdir,
        free_port(with_cluster_bus=True),
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
    ).start()  # fmt: skip
    node = redis.Redis(port=server.port)
    try:
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        deadline = time.monotonic() + START_TIMEOUT_S
        while node.cluster("info").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                server.stop()
                raise RedisUnavailable(f"the cluster on port {server.port} did not become ok")
            time.sleep(0.05)
    finally:
        node.close()
    return server


@contextlib.contextmanager
def redis_server(workdir: Path, *extra_args: str) -> Iterator[RedisServer]:
    server = RedisServer(workdir, None, *extra_args).start()
    try:
        yield server
    finally:
        server.stop()
