"""One server process as a lifecycle: every component listed in GetStatus, health derived from
their statuses, a failed start undone, and the signals of the first half second of
`pdp serve` (SIGHUP held and replayed, Ctrl-C quiet)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit.verify import verify_files
from policy_engine.cli.main import main
from policy_engine.config import AuditSettings, ConfigError, ReloadSettings, Settings, TlsSettings
from policy_engine.server.app import RunningServer, start_server
from policy_engine.server.service import SERVICE_NAME
from tests.audit.support import read_records
from tests.server.harness import REPO
from tests.store.support import (
    BAD_CEL,
    BAD_CEL_LINE,
    free_port,
    org_policy,
    wait_for,
    write_policy_dir,
    write_text_atomically,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
COMPONENTS = [
    "event_loop", "audit", "cache", "quota", "jwks", "policy_store", "grpc_server",
    "health_server", "metrics",
]  # fmt: skip


def _settings(root: Path, tmp_path: Path, **changes: object) -> Settings:
    return Settings(
        address="127.0.0.1:0",
        health_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        policy_dir=root,
        reload=ReloadSettings(watch=True, debounce_ms=50),
        audit=AuditSettings(enabled=True, file_path=tmp_path / "audit" / "audit.jsonl"),
    ).replace(**changes)


def _health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _status(port: int) -> pdp_pb2.GetStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pdp_pb2_grpc.PolicyStatusServiceStub(channel)
        return stub.GetStatus(pdp_pb2.GetStatusRequest(), timeout=10)


def _healths(running: RunningServer) -> set[int]:
    assert running.health_port is not None
    return {
        _health(port, service)
        for port in (running.port, running.health_port)
        for service in ("", SERVICE_NAME)
    }


@pytest.fixture
def bad_root(tmp_path: Path) -> Path:
    return write_policy_dir(tmp_path / "policies", BAD_CEL)


def test_health_and_get_status_are_derived_from_every_component(
    bad_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = start_server(_settings(bad_root, tmp_path), serve_metrics=True)
    watched: list[int] = []
    try:
        # No valid set: the store is the one component not ready, so health is NOT_SERVING.
        assert _healths(running) == {NOT_SERVING}
        status = _status(running.port)
        assert [c.name for c in status.components] == COMPONENTS
        store = next(c for c in status.components if c.name == "policy_store")
        assert (store.state, store.ready) == ("degraded", False)
        assert f"org.yaml:{BAD_CEL_LINE}:" in store.detail
        assert all(c.ready for c in status.components if c.name != "policy_store")
        assert main(["status", "--address", f"127.0.0.1:{running.port}"]) == 1
        printed = capsys.readouterr().out
        assert "policy_store" in printed and "NOT READY" in printed

        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60
            )

            def follow() -> None:
                with contextlib.suppress(grpc.RpcError):  # the stream ends with the server
                    for answer in stream:
                        watched.append(answer.status)

            follower = threading.Thread(target=follow, daemon=True)
            follower.start()
            wait_for(lambda: watched == [NOT_SERVING], what="the first watched status")

            write_text_atomically(bad_root / "acme" / "org.yaml", org_policy(["repo"]))
            wait_for(lambda: _healths(running) == {SERVING}, what="health to follow the store")
            wait_for(lambda: watched[-1:] == [SERVING], what="the watch to follow")
            status = _status(running.port)
            assert [c.name for c in status.components] == COMPONENTS
            assert all(c.ready for c in status.components), status.components
            assert main(["status", "--address", f"127.0.0.1:{running.port}"]) == 0
            capsys.readouterr()

            # A failed reload never flips it back: the last good set serves.
            write_text_atomically(bad_root / "acme" / "org.yaml", BAD_CEL)
            wait_for(lambda: not _status(running.port).last_reload_ok, what="the failed reload")
            assert _healths(running) == {SERVING}

            assert running.stop(grace=1.0)  # every component stopped cleanly
            follower.join(30)
    finally:
        running.stop(grace=None)
    # The watch heard NOT_SERVING as the shutdown began, before its stream was closed.
    assert watched[-1] == NOT_SERVING and SERVING in watched
    assert not running.lifecycle.ready()
    assert all(s.state.value == "stopped" for s in running.lifecycle.statuses()[1:])


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("pdp-audit", "pdp-policy"))}


def test_a_failed_start_stops_the_components_already_started(
    tmp_path: Path, bad_root: Path
) -> None:
    before = _threads()
    missing = str(tmp_path / "missing.pem")
    settings = _settings(bad_root, tmp_path, tls=TlsSettings(cert_file=missing, key_file=missing))
    # The store has loaded and the audit log is writing when the decision server cannot start.
    with pytest.raises(ConfigError, match=r"tls\."):
        start_server(settings)
    assert not _threads() - before  # the audit writer and the store's threads are gone
    audit_file = tmp_path / "audit" / "audit.jsonl"
    report = verify_files([audit_file], None)
    assert report.ok, report.render()
    last = read_records(audit_file)[-1]  # drained and closed: a final checkpoint ends it
    assert last["type"] == "checkpoint" and last["final"] is True


_START_FAILS = textwrap.dedent(
    """
    import sys
    from policy_engine.store import reloader

    def broken(self):
        raise OSError(5, "Input/output error")

    reloader.PolicyReloader.start = broken
    from policy_engine.cli.main import main
    sys.exit(main(["serve", *sys.argv[1:]]))
    """
)


def test_pdp_serve_names_a_component_that_cannot_start(tmp_path: Path, bad_root: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PDP_METRICS_ADDRESS": ""}
    command = [sys.executable, "-c", _START_FAILS, "--address", f"127.0.0.1:{port}"]
    done = subprocess.run(
        [*command, "--policies", str(bad_root)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "pdp: error: policy_store could not start: [Errno 5] Input/output error" in done.stderr
    assert "Traceback" not in done.stderr


def _serve(tmp_path: Path, root: Path, *, log: Path) -> subprocess.Popen[bytes]:
    """`pdp serve` as deployed (`python -m policy_engine.cli.main`) in its own process group,
    its output in `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PDP_METRICS_ADDRESS": ""}
    command = [sys.executable, "-m", "policy_engine.cli.main", "serve"]
    command += ["--address", f"127.0.0.1:{free_port()}", "--policies", str(root)]
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=out, start_new_session=True
        )


def _catches(pid: int, signum: int) -> bool:
    """Has process `pid` a handler for (or ignores) `signum`? (/proc/PID/status masks)"""
    try:
        fields = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    except (OSError, ValueError):
        return False
    mask = int(fields.get("SigCgt", "0"), 16) | int(fields.get("SigIgn", "0"), 16)
    return bool(mask >> (signum - 1) & 1)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the settings check `pdp serve` forks)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_sighup_in_the_first_moments_of_pdp_serve_is_replayed_as_a_reload(
    tmp_path: Path,
) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    log = tmp_path / "serve.log"
    proc = _serve(tmp_path, root, log=log)
    try:
        # As soon as the entry point holds SIGHUP (its first lines), and at the latest after
        # 0.15 s: long before the server's own handlers (imports, settings: ~0.5 s).
        started = time.monotonic()
        while not _catches(proc.pid, signal.SIGHUP) and time.monotonic() - started < 0.15:
            time.sleep(0.001)
        assert "serving kontext.pdp.v1" not in log.read_text()  # still starting
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: proc.poll() is not None or "serving kontext.pdp.v1" in log.read_text(),
            timeout=60,
            what="the server to start",
        )
        assert proc.poll() is None, f"killed by the SIGHUP: {proc.returncode}\n{log.read_text()}"
        assert "a SIGHUP received while starting: reloading" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_while_pdp_serve_reads_its_settings_exits_quietly(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    for attempt in range(5):
        log = tmp_path / f"serve-{attempt}.log"
        proc = _serve(tmp_path, root, log=log)
        try:
            # The settings are checked in a forked child (config.load_settings_apart): Ctrl-C
            # while it runs, to the whole process group as a terminal sends it.
            deadline = time.monotonic() + 30
            while not _children(proc.pid) and proc.poll() is None:
                if time.monotonic() > deadline or "serving" in log.read_text():
                    break
                time.sleep(0.001)
            if not _children(proc.pid):
                continue  # missed the moment (a fast check): try again
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=30)
            output = log.read_text()
            assert code == 130, output
            assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
            return
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    pytest.fail("never caught pdp serve while it checked its settings")
