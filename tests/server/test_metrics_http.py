"""The metrics endpoint as a lifecycle component: bound by start, optional when the port is
taken, its multiprocess directory removed by stop."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import pytest

from policy_engine.lifecycle import Component, State, deadline_in
from policy_engine.server.metrics_http import MULTIPROC_ENV, MetricsBindError, MetricsEndpoint


def test_start_binds_and_stop_closes() -> None:
    endpoint = MetricsEndpoint("127.0.0.1:0")
    assert isinstance(endpoint, Component)
    assert endpoint.port == 0 and endpoint.status().state is State.NEW  # nothing bound yet
    endpoint.start()
    try:
        assert endpoint.status().state is State.RUNNING and endpoint.status().ready
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics") as page:
            assert b"process_max_fds" in page.read()
    finally:
        assert endpoint.stop(deadline_in(10))
    assert endpoint.status().state is State.STOPPED
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT may remain
        sock.bind(("127.0.0.1", endpoint.port))  # nothing listens there any more


@pytest.mark.parametrize("multiprocess", [False, True])
def test_a_taken_port_is_an_error_or_with_optional_a_degraded_endpoint(multiprocess: bool) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        strict = MetricsEndpoint(address, multiprocess=multiprocess)
        with pytest.raises(MetricsBindError, match="cannot bind"):
            strict.start()
        assert MULTIPROC_ENV not in os.environ  # nothing left behind
        optional = MetricsEndpoint(address, multiprocess=multiprocess, optional=True)
        optional.start()
        status = optional.status()
        assert status.state is State.DEGRADED and status.ready  # decisions go on
        assert f"metrics_address {address}: cannot bind" in status.detail
        assert MULTIPROC_ENV not in os.environ and optional.multiproc_dir is None
        assert optional.stop(deadline_in(5))


def test_a_supervisors_endpoint_exports_its_directory_until_stopped() -> None:
    endpoint = MetricsEndpoint("127.0.0.1:0", multiprocess=True)
    endpoint.start()
    directory = endpoint.multiproc_dir
    try:
        assert directory is not None and directory.is_dir()
        assert os.environ[MULTIPROC_ENV] == str(directory)
    finally:
        endpoint.stop(deadline_in(10))
    assert MULTIPROC_ENV not in os.environ and not Path(str(directory)).exists()
