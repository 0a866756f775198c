"""SIGHUP reads every file anew: a writer can change a file's bytes without changing the stat
identity that incremental reloads trust (stores through a shared mmap to an already dirty page
leave size, mtime and ctime alone), and an operator's SIGHUP must then load what is on disk.
Real files, a real mmap writer, the real store and a real server with a real client."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import ReloadSettings, Settings
from policy_engine.domain.decision import Effect
from policy_engine.server.app import start_server
from policy_engine.store import DirectoryBackend, PolicyStore
from policy_engine.store.store import ReloadResult
from tests.store.support import check_request, decide_scope, org_policy, wait_for, write_policy_dir

ALLOWED = org_policy(["repo00"], deny=["zzzzzz"])
DENIED = org_policy(["repo00"], deny=["repo00"])  # the same length, so the same size
assert len(ALLOWED.encode()) == len(DENIED.encode())


def _store_through_mapping(path: Path, text: str) -> None:
    """Overwrite `path` (same size) through a shared, writable mapping, as an mmap writer
    does: the kernel dates such stores only when a clean page is first written, so on a
    page still dirty from an earlier store the file's size, mtime and ctime may all stay."""
    with path.open("r+b") as file, mmap.mmap(file.fileno(), 0) as mapping:
        mapping[:] = text.encode()


def _identity(path: Path) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def test_a_full_reload_reads_what_a_shared_mapping_wrote(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", ALLOWED)
    org = root / "acme" / "org.yaml"
    _store_through_mapping(org, ALLOWED)  # the writer's first store dirties the page
    time.sleep(1.1)  # past the racy window: the loaded file is trusted by its identity
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    assert decide_scope(store.current(), "repo00").effect is Effect.ALLOW
    before = _identity(org)
    _store_through_mapping(org, DENIED)
    assert org.read_text() == DENIED
    if _identity(org) != before:  # this kernel dated the store: an ordinary reload sees it
        assert store.reload("watcher") is ReloadResult.LOADED
    store.reload("SIGHUP", full=True)
    assert decide_scope(store.current(), "repo00").effect is Effect.DENY


def _effect(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        return stub.Check(check_request("repo00"), timeout=5).effect


def test_sighup_on_a_real_server_reads_every_file(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", ALLOWED)
    org = root / "acme" / "org.yaml"
    _store_through_mapping(org, ALLOWED)
    time.sleep(1.1)
    running = start_server(
        Settings(
            address="127.0.0.1:0",
            policy_dir=root,
            threads=4,
            metrics_address="",
            reload=ReloadSettings(watch=False),
        )
    )
    try:
        assert _effect(running.port) == pdp_pb2.EFFECT_ALLOW
        _store_through_mapping(org, DENIED)
        running.reload("SIGHUP")  # what the SIGHUP handler calls
        wait_for(
            lambda: _effect(running.port) == pdp_pb2.EFFECT_DENY,
            timeout=10,
            what="the SIGHUP reload to load the mapped write",
        )
    finally:
        running.stop(grace=None)
