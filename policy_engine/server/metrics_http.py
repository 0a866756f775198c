"""The Prometheus endpoint: one HTTP listener per server, whatever the number of workers.

Workers cannot all bind the metrics port (it is plain HTTP, no SO_REUSEPORT balancing would
make sense: a scrape must see every worker). So with `--workers N` the supervisor creates a
fresh PROMETHEUS_MULTIPROC_DIR before spawning, the workers write their metrics there, and
the supervisor alone serves the aggregate (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server
from prometheus_client.registry import Collector

from policy_engine.config import ConfigError
from policy_engine.lifecycle.component import ComponentStatus, State

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CLOSE_SECONDS = 5.0  # `close()`: how long the listener's thread gets to end


class MetricsBindError(ConfigError):
    """The metrics port is taken. The server carries on without metrics (`optional`)."""


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all interfaces); port 0 picks a free port."""
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ConfigError(f"setting metrics_address: expected host:port, got {address!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"setting metrics_address: bad port in {address!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"setting metrics_address: port out of range in {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, port


class MetricsEndpoint:
    """The metrics listener, a lifecycle `Component` ("metrics").

    The constructor checks the address and does nothing else. `start()` binds and serves
    (with `multiprocess`, first a fresh PROMETHEUS_MULTIPROC_DIR exported in os.environ, so
    that the workers spawned next write there, and the aggregate served). A taken port raises
    MetricsBindError, or with `optional` is logged and leaves the endpoint DEGRADED and still
    ready: metrics are for operators, decisions for the broker, and two servers on one host on
    different gRPC ports may well both default to one metrics port. The listener never sets
    SO_REUSEPORT, so it is never shared. `stop()` closes it and removes the directory.
    """

    name = "metrics"

    def __init__(
        self,
        address: str,
        registry: Collector = REGISTRY,
        *,
        multiprocess: bool = False,
        optional: bool = False,
    ) -> None:
        """Raises ConfigError for an address that is not host:port."""
        split_address(address)
        self.address = address
        self.port = 0
        self.multiproc_dir: Path | None = None
        self._registry = registry
        self._multiprocess = multiprocess
        self._optional = optional
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._state = State.NEW
        self._problem = ""

    @property
    def url(self) -> str:
        host = self.address.rpartition(":")[0] or "0.0.0.0"
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> None:
        if self._state is not State.NEW:
            return
        self._state = State.STARTING
        registry = self._registry
        if self._multiprocess:
            self.multiproc_dir = Path(tempfile.mkdtemp(prefix="pdp-metrics-"))
            os.environ[MULTIPROC_ENV] = str(self.multiproc_dir)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(self.multiproc_dir))
        host, port = split_address(self.address)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            error = MetricsBindError(
                f"metrics_address {self.address}: cannot bind ({exc.strerror or exc})"
            )
            self._remove_directory()  # the workers then keep their metrics to themselves
            if not self._optional:
                self._state = State.STOPPED
                raise error from exc
            log.error("%s; serving without a metrics endpoint", error)
            self._problem = f"{error}; no metrics are served"
            self._state = State.DEGRADED
            return
        self.port = self._server.server_port
        self._state = State.RUNNING
        log.info("metrics on %s", self.url)

    def mark_worker_dead(self, pid: int) -> None:
        """Drop a finished worker's live gauges (its counters keep counting in the sums)."""
        if self.multiproc_dir is not None:
            multiprocess.mark_process_dead(pid, str(self.multiproc_dir))

    def stop(self, deadline: float) -> bool:
        """Close the listener (waiting for its thread until `deadline`) and remove the
        multiprocess directory; True when the thread ended in time. Safe to call twice."""
        if self._state is State.STOPPED:
            return True
        self._state = State.STOPPING
        clean = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.0))
            clean = not self._thread.is_alive()
        self._remove_directory()
        self._state = State.STOPPED
        return clean

    def _remove_directory(self) -> None:
        if self.multiproc_dir is not None:
            if os.environ.get(MULTIPROC_ENV) == str(self.multiproc_dir):
                del os.environ[MULTIPROC_ENV]
            shutil.rmtree(self.multiproc_dir, ignore_errors=True)
            self.multiproc_dir = None

    def close(self) -> None:
        """`stop` with a few seconds for the listener's thread."""
        self.stop(time.monotonic() + CLOSE_SECONDS)

    def status(self) -> ComponentStatus:
        state = self._state
        if state is State.RUNNING:
            return ComponentStatus(self.name, state, True, f"serving {self.url}")
        if state is State.DEGRADED:
            return ComponentStatus(self.name, state, True, self._problem)
        return ComponentStatus(self.name, state, False)


def start_metrics(address: str, registry: Collector = REGISTRY) -> MetricsEndpoint | None:
    """Serve `registry` on `address`; None when metrics are off (empty address). Raises
    MetricsBindError when the port is taken."""
    if not address:
        return None
    endpoint = MetricsEndpoint(address, registry)
    endpoint.start()
    return endpoint


def start_multiprocess_metrics(address: str) -> MetricsEndpoint | None:
    """For a supervisor: a fresh multiprocess directory, exported in os.environ so that the
    workers spawned next write there, and the aggregate served on `address`. Raises
    MetricsBindError (and leaves nothing behind) when the port is taken."""
    if not address:
        return None
    endpoint = MetricsEndpoint(address, multiprocess=True)
    endpoint.start()
    return endpoint
