"""Only complete files load: a policy file rewritten in place is never read half-written.

org.yaml is rewritten in place (open with O_TRUNC, write a chunk, pause, write the next, close)
while clients hammer Check on a real server. Every prefix of the new text is a valid policy
that ALLOWS `delete` (the deny rule comes last), so one answer from a truncated file shows up
as an ALLOW of `delete`, or as a revision that is neither the old nor the new version.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import ReloadSettings, Settings
from policy_engine.lifecycle import deadline_in
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.app import RunningServer, start_server
from policy_engine.store import DirectoryBackend, PolicyReloader, PolicyStore, ReloadResult
from policy_engine.store import store as store_module
from policy_engine.store.writes import open_for_writing
from tests.store.support import (
    check_request,
    decide_scope,
    org_policy,
    wait_for,
    write_policy_dir,
    write_text_atomically,
)

# Both versions deny `delete` (allowed by the first rule, denied by the last) and differ on
# `read` / `write`, so the new content is visible once it loads.
VERSION_A = org_policy(["repo", "read", "delete"], deny=["delete"])
VERSION_B = org_policy(["repo", "write", "delete"], deny=["delete"])
CLIENT_THREADS = 2


def _chunks(text: str, count: int) -> list[str]:
    """`text` cut where each prefix is a valid policy that allows `delete`: before the deny
    rule, and (for three chunks) before the allow rule's condition too."""
    deny_at = text.index("  - name: forbidden-scopes")
    if count == 2:
        return [text[:deny_at], text[deny_at:]]
    condition_at = text.index("    condition:")
    return [text[:condition_at], text[condition_at:deny_at], text[deny_at:]]


def _revision(scratch: Path, text: str) -> CompiledPolicySet:
    return load_policy_set(write_policy_dir(scratch, text))


@pytest.mark.parametrize("count", [2, 3])
def test_every_truncated_prefix_is_a_valid_policy_that_allows_delete(
    tmp_path: Path, count: int
) -> None:
    """What makes the rewrite dangerous: read half-way, the file is valid and allows."""
    full = _revision(tmp_path / "full", VERSION_B)
    assert not decide_scope(full, "delete").allowed
    chunks = _chunks(VERSION_B, count)
    assert "".join(chunks) == VERSION_B
    for index in range(1, count):
        prefix = _revision(tmp_path / f"prefix-{index}", "".join(chunks[:index]))
        assert decide_scope(prefix, "delete").allowed, index
        assert prefix.revision != full.revision


def rewrite_in_place(
    path: Path, chunks: list[str], pause: float, during_pause: Callable[[], None] | None = None
) -> None:
    """How a careless deploy writes: truncate, then write chunk by chunk, pausing between."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        for index, chunk in enumerate(chunks):
            if index:
                if during_pause is not None and index == 1:
                    during_pause()
                time.sleep(pause)
            os.write(fd, chunk.encode())
    finally:
        os.close(fd)


class Hammer:
    """Client threads calling Check for `delete`, `read` and `write` as fast as they can,
    recording (scope, effect, revision) of every answer."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.answers: list[tuple[str, int, str]] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(seed,), daemon=True)
            for seed in range(CLIENT_THREADS)
        ]

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        wait_for(lambda: len(self.answers) > 0, what="the first answer")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def _run(self, seed: int) -> None:
        scopes = ("delete", "read", "write", "delete")[seed % 2 :]
        with grpc.insecure_channel(self.target) as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            turn = 0
            while not self._stop.is_set():
                scope = scopes[turn % len(scopes)]
                turn += 1
                try:
                    response = stub.Check(check_request(scope), timeout=10)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failures.append(f"{scope}: {exc.code()} {exc.details()}")
                    continue
                with self._lock:
                    self.answers.append((scope, response.effect, response.policy_revision))


def _settings(root: Path) -> Settings:
    return Settings(
        address="127.0.0.1:0",
        policy_dir=root,
        threads=4,
        metrics_address="",
        reload=ReloadSettings(watch=True, debounce_ms=50),
    )


def _status(running: RunningServer) -> pdp_pb2.GetStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        return pdp_pb2_grpc.PolicyStatusServiceStub(channel).GetStatus(
            pdp_pb2.GetStatusRequest(), timeout=10
        )


@pytest.fixture
def revisions(tmp_path: Path) -> tuple[str, str]:
    return (
        _revision(tmp_path / "expected-a", VERSION_A).revision,
        _revision(tmp_path / "expected-b", VERSION_B).revision,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_policy_dir(tmp_path / "policies", VERSION_A)


@pytest.fixture
def server(root: Path) -> Iterator[tuple[RunningServer, list[str]]]:
    """A started server on an ephemeral port, and every revision it ever swapped in."""
    running = start_server(_settings(root))
    assert running.store is not None
    swapped: list[str] = [running.store.status().revision]
    running.store.subscribe(lambda policies: swapped.append(policies.revision))
    try:
        yield running, swapped
    finally:
        running.stop(grace=None)


def _assert_only_complete_versions(
    hammer: Hammer, swapped: list[str], revisions: tuple[str, str]
) -> None:
    assert hammer.failures == []
    allowed_deletes = [
        a for a in hammer.answers if a[0] == "delete" and a[1] != pdp_pb2.EFFECT_DENY
    ]
    assert allowed_deletes == [], f"{len(allowed_deletes)} answers from a truncated file"
    assert {revision for _, _, revision in hammer.answers} <= set(revisions)
    assert set(swapped) <= set(revisions), swapped


@pytest.mark.parametrize(
    ("count", "pause"),
    [(2, 0.05), (2, 0.15), (2, 0.3), (2, 1.0), (2, 2.0), (3, 0.15), (3, 1.0)],
)
def test_an_in_place_rewrite_never_serves_the_truncated_file(
    root: Path,
    server: tuple[RunningServer, list[str]],
    revisions: tuple[str, str],
    count: int,
    pause: float,
) -> None:
    running, swapped = server
    old, new = revisions
    assert _status(running).revision == old
    with Hammer(f"127.0.0.1:{running.port}") as hammer:
        before = hammer.count()
        rewrite_in_place(root / "acme" / "org.yaml", _chunks(VERSION_B, count), pause)
        assert hammer.count() > before  # answers were given while the file was half-written
        wait_for(lambda: _status(running).revision == new, what="the complete new version")
        wait_for(
            lambda: {"read", "write"} <= {s for s, _, r in list(hammer.answers) if r == new},
            what="answers from the new version",
        )
    _assert_only_complete_versions(hammer, swapped, revisions)
    # The new content is what serves: `write` is allowed now, `read` no longer is.
    answers = {(s, e) for s, e, r in hammer.answers if r == new}
    assert ("write", pdp_pb2.EFFECT_ALLOW) in answers and ("read", pdp_pb2.EFFECT_DENY) in answers


@pytest.mark.parametrize("trigger", ["SIGHUP", "another file changed"])
def test_a_reload_asked_for_during_the_pause_waits_for_the_writer(
    root: Path,
    server: tuple[RunningServer, list[str]],
    revisions: tuple[str, str],
    trigger: str,
) -> None:
    running, swapped = server
    old, new = revisions

    def ask_for_a_reload() -> None:
        attempts = running.store.status().attempts if running.store else 0
        if trigger == "SIGHUP":
            running.reload("SIGHUP")  # what the SIGHUP handler calls
        else:
            # Saved again as it was (a new inode, the same text): the revisions stay as known.
            text = (root / "acme" / "open.yaml").read_text()
            write_text_atomically(root / "acme" / "open.yaml", text)
        wait_for(
            lambda: running.store is not None and running.store.status().attempts > attempts,
            what="the reload attempt",
        )
        status = _status(running)
        assert status.revision == old and not status.last_reload_ok
        assert "acme/org.yaml" in status.last_error and "being written" in status.last_error

    with Hammer(f"127.0.0.1:{running.port}") as hammer:
        rewrite_in_place(root / "acme" / "org.yaml", _chunks(VERSION_B, 2), 0.5, ask_for_a_reload)
        wait_for(lambda: _status(running).revision == new, what="the complete new version")
        wait_for(lambda: any(r == new for _, _, r in hammer.answers), what="answers from it")
    _assert_only_complete_versions(hammer, swapped, revisions)
    assert _status(running).last_reload_ok


def test_a_server_started_while_a_file_is_half_written_waits_for_it(
    root: Path, revisions: tuple[str, str]
) -> None:
    _, new = revisions
    chunks = _chunks(VERSION_B, 2)
    fd = os.open(root / "acme" / "org.yaml", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, chunks[0].encode())
        running = start_server(_settings(root))
    except BaseException:
        os.close(fd)
        raise
    try:
        status = _status(running)
        assert status.revision == "" and "acme/org.yaml" in status.last_error
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            for _ in range(20):  # retried while it waits: still nothing read
                response = stub.Check(check_request("delete"), timeout=10)
                assert response.effect == pdp_pb2.EFFECT_DENY and not response.policy_revision
            os.write(fd, chunks[1].encode())
            os.close(fd)
            fd = -1
            wait_for(lambda: _status(running).revision == new, what="the complete file")
            assert stub.Check(check_request("delete"), timeout=10).effect == pdp_pb2.EFFECT_DENY
            assert stub.Check(check_request("write"), timeout=10).effect == pdp_pb2.EFFECT_ALLOW
    finally:
        if fd >= 0:
            os.close(fd)
        running.stop(grace=None)


class _KernelCannotTell(DirectoryBackend):
    """As where leases are unavailable (files owned by another user, NFS): only the watcher's
    record of writes (IN_MODIFY until IN_CLOSE_WRITE) can hold a reload back."""

    probe_open_for_writing = staticmethod(lambda path: None)


def test_without_the_kernel_probe_the_watchers_record_still_holds_the_reload(
    tmp_path: Path, root: Path, revisions: tuple[str, str]
) -> None:
    old, new = revisions
    store = PolicyStore(_KernelCannotTell(root))
    assert store.reload("startup") is ReloadResult.LOADED
    swapped: list[str] = []
    store.subscribe(lambda policies: swapped.append(policies.revision))
    reloader = PolicyReloader(store, watch=True, debounce_ms=50)
    reloader.start()
    try:
        wait_for(lambda: store.status().attempts >= 2, what="the watch to be established")

        def sighup() -> None:
            # The truncate and first write must have reached the watcher before asking.
            wait_for(lambda: store.backend.files_being_written(), what="the write to be seen")
            attempts = store.status().attempts
            reloader.request("SIGHUP")
            wait_for(lambda: store.status().attempts > attempts, what="the reload attempt")
            assert store.status().deferred and store.status().revision == old

        rewrite_in_place(root / "acme" / "org.yaml", _chunks(VERSION_B, 2), 0.3, sighup)
        wait_for(lambda: store.status().revision == new, what="the complete new version")
    finally:
        reloader.stop()
    assert swapped == [new]


def test_a_writer_that_keeps_the_file_open_is_logged_and_stop_does_not_hang(
    root: Path,
    revisions: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, _ = revisions
    monkeypatch.setattr(store_module, "LONG_WRITE_WARNING_SECONDS", 0.3)
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    reloader = PolicyReloader(store, watch=True, debounce_ms=50)
    reloader.start()
    fd = os.open(root / "acme" / "org.yaml", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, _chunks(VERSION_B, 2)[0].encode())
        with caplog.at_level(logging.WARNING, logger="policy_engine.store.store"):
            reloader.request("SIGHUP")
            wait_for(
                lambda: any("waited" in r.getMessage() for r in caplog.records),
                what="the warning about the writer",
            )
        message = next(r.getMessage() for r in caplog.records if "waited" in r.getMessage())
        assert "acme/org.yaml" in message and f"still serving revision {old}" in message
        assert store.status().deferred and store.status().revision == old
        reloader.stop(deadline_in(5))  # while still waiting for the writer
        assert not any(thread.is_alive() for thread in reloader._threads)
    finally:
        os.close(fd)
        reloader.stop(deadline_in(5))
    assert store.status().revision == old


def test_the_kernel_probe_sees_writers_only(tmp_path: Path) -> None:
    path = tmp_path / "org.yaml"
    path.write_text(VERSION_A)
    assert open_for_writing(path) is False
    reader = os.open(path, os.O_RDONLY)
    assert open_for_writing(path) is False
    writer = os.open(path, os.O_WRONLY | os.O_APPEND)
    assert open_for_writing(path) is True
    os.close(writer)
    os.close(reader)
    assert open_for_writing(path) is False
    assert open_for_writing(tmp_path / "missing.yaml") is None
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert open_for_writing(fifo) is None  # never opened for long: a FIFO would block


def test_a_writer_opening_while_the_probe_holds_its_lease_is_harmless(tmp_path: Path) -> None:
    """The lease break signal is one whose default action is to ignore it (not SIGIO's,
    which ends the process), and the writer's open goes through."""
    path = tmp_path / "org.yaml"
    path.write_text(VERSION_A)
    opened = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal opened
        while not stop.is_set():
            os.close(os.open(path, os.O_WRONLY))
            opened += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        seen = {open_for_writing(path) for _ in range(3000)}
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and opened > 0
    assert seen <= {True, False}
