"""The periodic resync (`reload.resync_seconds`): changes inotify never reports are served
without a signal. Each scenario runs a real DirectoryBackend with its watcher and reloader
over real files: a hard link made to an in-tree file from outside the tree *after* the
watcher started, then the file rewritten through that outside name, reports nothing to the
tree's watches. Before the resync, the revoked allow was served until SIGHUP or an unrelated
change made a reload walk."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policy_engine.config import ConfigError, load_settings
from policy_engine.policy import load_policy_set
from policy_engine.store import DirectoryBackend, PolicyReloader, PolicyStore, ReloadResult
from tests.policy_builder import write_user_policies
from tests.store.support import wait_for
from tests.store.test_journal_blind_spots import allowed, policy_text, write_in_place

RESYNC_SECONDS = 0.5
STORE_LOGGER = "policy_engine.store"


@pytest.fixture(autouse=True)
def trusting_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    """No file counts as changed for having been written within a second of the last load
    (the racy window): only a real difference makes a resync reload."""
    monkeypatch.setattr(DirectoryBackend, "racy_window_ns", 0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "policies"
    write_user_policies(root, "acme", 5)
    return root


@contextlib.contextmanager
def serve(root: Path, resync_seconds: float) -> Iterator[PolicyStore]:
    """A store loaded from `root`, reloaded by its watcher (and resync), past the watcher's
    first notice."""
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    reloader = PolicyReloader(store, watch=True, debounce_ms=50, resync_seconds=resync_seconds)
    reloader.start()
    try:
        wait_for(lambda: store.status().attempts >= 2, what="the watcher's first notice")
        yield store
    finally:
        reloader.stop()


def revoke_through_a_later_outside_link(root: Path) -> None:
    """Links acme's user-1 file from outside the tree now, and revokes its allow through
    that name (written in place: the same inode)."""
    outside = root.parent / "deployed-user-1.yaml"
    os.link(root / "acme" / "users" / "user-00001.yaml", outside)
    write_in_place(outside, policy_text(1, revoked=True))


def resync_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage().startswith("resync of")]


def test_an_edit_through_a_hard_link_made_later_outside_is_served_without_a_signal(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOGGER)
    with serve(root, RESYNC_SECONDS) as store:
        assert allowed(store.current(), "acme", "user-1")
        revoke_through_a_later_outside_link(root)
        wait_for(
            lambda: store.current().revision == load_policy_set(root).revision,
            timeout=8,
            what="the revoke to be served",
        )
        assert not allowed(store.current(), "acme", "user-1")
        assert store.status().last_reason.startswith("resync:")
    found = [record for record in resync_records(caplog) if record.levelno == logging.INFO]
    assert found, "the resync that found the edit is logged at info"
    assert "1 path(s) differ" in found[0].getMessage()
    assert "acme/users/user-00001.yaml" in found[0].getMessage()


def test_a_resync_that_finds_nothing_changed_does_not_reload(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=STORE_LOGGER)
    with serve(root, RESYNC_SECONDS) as store:
        status = store.status()
        caplog.clear()
        # Several resyncs' worth of time: each walks and finds nothing.
        wait_for(lambda: len(resync_records(caplog)) >= 3, what="three resyncs")
        assert store.status().attempts == status.attempts
        assert store.status().revision == status.revision
    assert all(record.levelno == logging.DEBUG for record in resync_records(caplog))
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name != __name__]


def test_resync_zero_is_off(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=STORE_LOGGER)
    with serve(root, 0) as store:
        revision = store.current().revision
        revoke_through_a_later_outside_link(root)
        time.sleep(RESYNC_SECONDS * 4)  # four resyncs' worth: none runs
        assert store.current().revision == revision
        assert allowed(store.current(), "acme", "user-1")  # stale, as documented
    assert not resync_records(caplog)


def test_a_broken_tree_left_alone_is_not_reloaded_again_by_each_resync(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=STORE_LOGGER)
    with serve(root, RESYNC_SECONDS) as store:
        write_in_place(root / "acme" / "users" / "user-00002.yaml", "kind: Policy\nrules: [\n")
        wait_for(
            lambda: store.status().last_result is ReloadResult.FAILED, what="the failed reload"
        )
        attempts = store.status().attempts
        caplog.clear()
        wait_for(lambda: len(resync_records(caplog)) >= 3, what="three resyncs")
        assert store.status().attempts == attempts
        # Fixed through a name no watch reports: the resync compares with the failed look.
        revoke_through_a_later_outside_link(root)
        broken = root / "acme" / "users" / "user-00002.yaml"
        outside = root.parent / "deployed-user-2.yaml"
        os.link(broken, outside)
        write_in_place(outside, policy_text(2, revoked=False))
        wait_for(
            lambda: store.status().last_result is ReloadResult.LOADED,
            timeout=8,
            what="the fixed tree to load",
        )
        assert store.current().revision == load_policy_set(root).revision
        assert not allowed(store.current(), "acme", "user-1")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", "greater than or equal to 0"),
        ("nan", "greater than or equal to 0"),
        ("inf", "finite"),
        (str(31 * 86_400), "less than or equal to"),
        ("soon", "valid number"),
    ],
)
def test_resync_seconds_is_bounded_like_the_other_intervals(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"PDP_RELOAD__RESYNC_SECONDS": value})
    assert "reload.resync_seconds" in str(caught.value) or "RESYNC_SECONDS" in str(caught.value)
    assert expected in str(caught.value)


def test_resync_seconds_defaults_to_30_and_takes_0() -> None:
    assert load_settings(environ={}).reload.resync_seconds == 30.0
    assert load_settings(environ={"PDP_RELOAD__RESYNC_SECONDS": "0"}).reload.resync_seconds == 0


def test_a_resync_lists_each_difference_once(root: Path) -> None:
    """Without a watcher too: what differs from the last good load, each path once."""
    backend = DirectoryBackend(root)
    backend.load()
    assert backend.resync() == ([], False)
    (root / "acme" / "users" / "user-00002.yaml").unlink()
    (root / "acme" / "users" / "user-00009.yaml").write_text(policy_text(9, revoked=False))
    write_in_place(root / "acme" / "users" / "user-00003.yaml", policy_text(3, revoked=True))
    os.link(root / "acme" / "users" / "user-00004.yaml", root.parent / "user-4.yaml")
    differences, aliased = backend.resync()
    assert sorted(differences) == [
        "+acme/users/user-00009.yaml",
        "-acme/users/user-00002.yaml",
        "acme/users/user-00003.yaml",
        "acme/users/user-00004.yaml",  # linked: its ctime changed
    ]
    assert aliased
