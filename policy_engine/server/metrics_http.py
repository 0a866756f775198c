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
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server
from prometheus_client.registry import Collector

from policy_engine.config import ConfigError

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsBindError(ConfigError):
    """The metrics port is taken. The server carries on without metrics (see `serve`)."""


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


@dataclass
class MetricsEndpoint:
    """A running metrics listener; `close()` stops it and removes the multiprocess directory."""

    address: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread
    multiproc_dir: Path | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        host = self.address.rpartition(":")[0] or "0.0.0.0"
        return f"http://{host}:{self.port}/metrics"

    def mark_worker_dead(self, pid: int) -> None:
        """Drop a finished worker's live gauges (its counters keep counting in the sums)."""
        if self.multiproc_dir is not None:
            multiprocess.mark_process_dead(pid, str(self.multiproc_dir))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        if self.multiproc_dir is not None:
            if os.environ.get(MULTIPROC_ENV) == str(self.multiproc_dir):
                del os.environ[MULTIPROC_ENV]
            shutil.rmtree(self.multiproc_dir, ignore_errors=True)


def start_metrics(address: str, registry: Collector = REGISTRY) -> MetricsEndpoint | None:
    """Serve `registry` on `address`; None when metrics are off (empty address)."""
    if not address:
        return None
    host, port = split_address(address)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        reason = exc.strerror or exc
        raise MetricsBindError(f"metrics_address {address}: cannot bind ({reason})") from exc
    endpoint = MetricsEndpoint(address, server.server_port, server, thread)
    log.info("metrics on %s", endpoint.url)
    return endpoint


def start_multiprocess_metrics(address: str) -> MetricsEndpoint | None:
    """For a supervisor: a fresh multiprocess directory, exported in os.environ so that the
    workers spawned next write there, and the aggregate served on `address`. Raises
    MetricsBindError (and leaves nothing behind) when the port is taken."""
    if not address:
        return None
    split_address(address)  # a bad setting fails before anything is created
    directory = Path(tempfile.mkdtemp(prefix="pdp-metrics-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    try:
        endpoint = start_metrics(address, registry)
    except BaseException:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    assert endpoint is not None
    endpoint.multiproc_dir = directory
    return endpoint
