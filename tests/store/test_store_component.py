"""The policy store as a lifecycle component (PolicyReloader): start loads, status tells."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from policy_engine.lifecycle import Component, State, deadline_in
from policy_engine.store import DirectoryBackend, PolicyReloader, PolicyStore
from tests.store.support import (
    BAD_CEL,
    BAD_CEL_LINE,
    org_policy,
    wait_for,
    write_policy_dir,
    write_text_atomically,
)

GOOD = org_policy(["repo"])
OTHER = org_policy(["read"])


def _component(root: Path, *, watch: bool = True) -> PolicyReloader:
    return PolicyReloader(PolicyStore(DirectoryBackend(root)), watch=watch, debounce_ms=50)


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("pdp-policy")}


def test_start_does_the_first_load_and_the_store_is_ready_with_a_valid_set(
    tmp_path: Path,
) -> None:
    before = _threads()
    store = _component(write_policy_dir(tmp_path / "policies", GOOD))
    assert isinstance(store, Component) and store.name == "policy_store"
    assert store.store.status().attempts == 0 and not _threads() - before  # nothing yet
    assert store.status().state is State.NEW and not store.status().ready
    store.start()
    try:
        assert store.store.status().serving  # loaded by start itself, before its threads
        status = store.status()
        assert status.state is State.RUNNING and status.ready
        assert status.detail.startswith("serving revision ")
        assert len(_threads() - before) == 2  # the reload and watch threads
    finally:
        assert store.stop(deadline_in(10))
    assert store.status().state is State.STOPPED and not store.status().ready
    assert not _threads() - before


def test_not_ready_until_a_valid_set_loads_and_never_unready_after(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", BAD_CEL)
    store = _component(root)
    store.start()
    try:
        status = store.status()
        assert status.state is State.DEGRADED and not status.ready
        assert "no valid policy set loaded" in status.detail
        assert f"org.yaml:{BAD_CEL_LINE}:" in status.detail  # the first issue, file:line

        write_text_atomically(root / "acme" / "org.yaml", GOOD)
        wait_for(lambda: store.status().ready, what="the valid edit to load")
        assert store.status().state is State.RUNNING

        revision = store.store.status().revision
        write_text_atomically(root / "acme" / "org.yaml", BAD_CEL)
        wait_for(lambda: store.status().state is State.DEGRADED, what="the failed reload")
        status = store.status()
        assert status.ready  # the last good set keeps serving
        assert f"serving revision {revision}" in status.detail
        assert "failed:" in status.detail and f"org.yaml:{BAD_CEL_LINE}:" in status.detail

        write_text_atomically(root / "acme" / "org.yaml", OTHER)
        wait_for(lambda: store.status().state is State.RUNNING, what="the fix to load")
    finally:
        store.stop(deadline_in(10))


def test_a_directory_that_cannot_be_watched_is_degraded_until_it_can(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", GOOD)
    store = _component(root)
    store.start()
    try:
        wait_for(lambda: store.watching, what="the watch")
        shutil.move(root, tmp_path / "elsewhere")
        wait_for(lambda: not store.watching, what="the watcher to notice")
        status = store.status()
        assert status.state is State.DEGRADED and status.ready  # still serving the last set
        assert f"not watching: the policy directory {root} is missing" in status.detail
        shutil.move(tmp_path / "elsewhere", root)
        wait_for(lambda: store.status().state is State.RUNNING, what="the watch to return")
        assert store.watching
    finally:
        store.stop(deadline_in(10))


def test_without_watching_the_status_does_not_ask_for_a_watcher(tmp_path: Path) -> None:
    store = _component(write_policy_dir(tmp_path / "policies", GOOD), watch=False)
    store.start()
    try:
        assert store.status().state is State.RUNNING and not store.watching
    finally:
        store.stop(deadline_in(10))
