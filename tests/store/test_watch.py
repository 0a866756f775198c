"""The reloader with a real watcher (inotify) on real directories."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from policy_engine.lifecycle import deadline_in
from policy_engine.policy import load_policy_set
from policy_engine.store import DirectoryBackend, PolicyReloader, PolicyStore, ReloadResult
from policy_engine.store.watch import PolicyChangeFilter
from tests.store.support import (
    BAD_CEL,
    BAD_CEL_LINE,
    org_policy,
    wait_for,
    write_policy_dir,
    write_text_atomically,
)

VERSION_A = org_policy(["repo"])
VERSION_B = org_policy(["read"], deny=["repo"])
VERSION_C = org_policy(["read", "write"])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_policy_dir(tmp_path / "policies", VERSION_A)


def _revision_of(tmp_path: Path, text: str) -> str:
    scratch = tmp_path / f"expected-{abs(hash(text))}"
    if not scratch.exists():
        write_policy_dir(scratch, text)
    return load_policy_set(scratch).revision


@pytest.fixture
def watched(root: Path) -> Iterator[tuple[PolicyStore, PolicyReloader]]:
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    reloader = PolicyReloader(store, watch=True, debounce_ms=50)
    reloader.start()
    # The watch is in place once it has reported itself (one no-op reload).
    wait_for(lambda: store.status().attempts >= 2, what="the watch to be established")
    try:
        yield store, reloader
    finally:
        reloader.stop()


def _serves(store: PolicyStore, revision: str) -> bool:
    return store.status().revision == revision


def test_an_in_place_edit_is_applied(
    tmp_path: Path, root: Path, watched: tuple[PolicyStore, PolicyReloader]
) -> None:
    store, reloader = watched
    assert reloader.watching
    (root / "acme" / "org.yaml").write_text(VERSION_B)
    wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_B)), what="version B")


def test_an_atomic_rename_save_is_applied(
    tmp_path: Path, root: Path, watched: tuple[PolicyStore, PolicyReloader]
) -> None:
    store, _ = watched
    write_text_atomically(root / "acme" / "org.yaml", VERSION_B)
    wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_B)), what="version B")
    # A second save over the renamed file: the watch follows the new inode.
    write_text_atomically(root / "acme" / "org.yaml", VERSION_C)
    wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_C)), what="version C")


def test_a_new_file_in_a_new_folder_is_applied(
    tmp_path: Path, root: Path, watched: tuple[PolicyStore, PolicyReloader]
) -> None:
    store, _ = watched
    write_policy_dir(root.parent / "globex-src", VERSION_B)
    shutil.copytree(root.parent / "globex-src" / "acme", root / "globex")
    (root / "globex" / "organization.yaml").write_text(
        (root / "globex" / "organization.yaml").read_text().replace("acme", "globex")
    )
    wait_for(lambda: store.status().organizations == ("acme", "globex"), what="globex")


def test_a_broken_save_is_reported_and_its_fix_applied(
    tmp_path: Path, root: Path, watched: tuple[PolicyStore, PolicyReloader]
) -> None:
    store, _ = watched
    good = store.current()
    write_text_atomically(root / "acme" / "org.yaml", BAD_CEL)
    wait_for(lambda: not store.status().last_ok, what="the failed reload")
    assert store.current() is good
    assert f"org.yaml:{BAD_CEL_LINE}:" in store.status().last_error
    write_text_atomically(root / "acme" / "org.yaml", VERSION_B)
    wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_B)), what="the fix")
    assert store.status().last_ok


def test_a_deleted_and_recreated_directory_is_watched_again(
    tmp_path: Path, root: Path, watched: tuple[PolicyStore, PolicyReloader]
) -> None:
    store, reloader = watched
    good = store.current()
    shutil.rmtree(root)
    wait_for(lambda: "does not exist" in store.status().last_error, what="the failed reload")
    assert store.current() is good
    write_policy_dir(root, VERSION_B)
    wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_B)), what="the new directory")
    # And the new directory is watched: later edits still arrive.
    (root / "acme" / "org.yaml").write_text(VERSION_C)
    wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_C)), what="an edit after")
    assert reloader.watching


def test_a_directory_replaced_by_rename_is_watched_again(
    tmp_path: Path, root: Path, watched: tuple[PolicyStore, PolicyReloader]
) -> None:
    store, _ = watched
    staged = write_policy_dir(root.parent / "staged", VERSION_B)
    old = root.parent / "old"
    os.rename(root, old)
    os.rename(staged, root)
    wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_B)), what="the new directory")
    (root / "acme" / "org.yaml").write_text(VERSION_C)
    wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_C)), what="an edit after")


def test_a_symlink_swap_deploy_is_applied(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    write_policy_dir(releases / "1", VERSION_A)
    write_policy_dir(releases / "2", VERSION_B)
    live = tmp_path / "live"
    live.symlink_to(releases / "1")
    store = PolicyStore(DirectoryBackend(live))
    assert store.reload("startup") is ReloadResult.LOADED
    reloader = PolicyReloader(store, watch=True, debounce_ms=50)
    reloader.start()
    try:
        wait_for(lambda: store.status().attempts >= 2, what="the watch to be established")
        swap = tmp_path / "live.new"
        swap.symlink_to(releases / "2")
        os.replace(swap, live)  # the atomic deploy: one rename switches every file at once
        wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_B)), what="release 2")
    finally:
        reloader.stop()


def test_requests_reload_without_watching(tmp_path: Path, root: Path) -> None:
    store = PolicyStore(DirectoryBackend(root))
    store.reload("startup")
    reloader = PolicyReloader(store, watch=False)
    reloader.start()
    try:
        assert not reloader.watching
        (root / "acme" / "org.yaml").write_text(VERSION_B)
        reloader.request("SIGHUP")
        wait_for(lambda: _serves(store, _revision_of(tmp_path, VERSION_B)), what="version B")
        assert store.status().last_reason == "SIGHUP"
    finally:
        reloader.stop()


def test_stop_ends_both_threads(watched: tuple[PolicyStore, PolicyReloader]) -> None:
    _, reloader = watched
    reloader.stop(deadline_in(5))
    assert not reloader.watching


@pytest.mark.parametrize(
    ("relative", "deleted", "is_dir", "passes"),
    [
        ("acme/org.yaml", False, False, True),
        ("acme/users/alice.yml", False, False, True),
        ("acme/org.yaml", True, False, True),
        ("acme", True, True, True),
        ("acme.io", True, False, True),  # maybe a symlinked folder: cannot tell once deleted
        ("", False, True, True),  # the root itself
        ("acme/.org.yaml.tmp", False, False, False),
        ("acme/.#org.yaml", False, False, False),
        ("acme/.org.yaml.swp", False, False, False),
        ("acme/org.yaml~", False, False, False),
        ("acme/4913", False, False, False),
        ("acme/notes.txt", False, False, False),
        ("acme/org.yaml.bak", True, False, False),
        (".git/index", False, False, False),
        ("..data", False, False, True),  # Kubernetes ConfigMap volumes swap this link
    ],
)
def test_the_filter_passes_policy_files_and_folders_only(
    tmp_path: Path, relative: str, deleted: bool, is_dir: bool, passes: bool
) -> None:
    (tmp_path / "acme").mkdir()
    path = tmp_path / relative if relative else tmp_path
    assert PolicyChangeFilter(tmp_path)(str(path), deleted=deleted, is_dir=is_dir) is passes


def test_the_filter_passes_a_new_folder(tmp_path: Path) -> None:
    (tmp_path / "globex").mkdir()
    assert PolicyChangeFilter(tmp_path)(str(tmp_path / "globex"))


def _kubernetes_version(volume: Path, name: str, text: str) -> None:
    """A ConfigMap volume's version folder, as the kubelet writes it (hidden, complete)."""
    write_policy_dir(volume / name, text)


def _kubernetes_publish(volume: Path, name: str) -> None:
    """The kubelet's switch: a new `..data` link renamed over the old one."""
    staged = volume / "..data_tmp"
    staged.symlink_to(name)
    os.replace(staged, volume / "..data")


def test_a_kubernetes_configmap_update_is_applied_each_time(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    _kubernetes_version(volume, "..v1", VERSION_A)
    _kubernetes_publish(volume, "..v1")
    (volume / "acme").symlink_to("..data/acme")  # the projected entry, stable across updates
    store = PolicyStore(DirectoryBackend(volume))
    assert store.reload("startup") is ReloadResult.LOADED
    reloader = PolicyReloader(store, watch=True, debounce_ms=50)
    reloader.start()
    try:
        wait_for(lambda: store.status().attempts >= 2, what="the watch to be established")
        for index, text in enumerate([VERSION_B, VERSION_C, VERSION_A], start=2):
            _kubernetes_version(volume, f"..v{index}", text)
            _kubernetes_publish(volume, f"..v{index}")
            shutil.rmtree(volume / f"..v{index - 1}")  # the kubelet removes the old version
            revision = _revision_of(tmp_path, text)
            wait_for(lambda r=revision: _serves(store, r), what=f"version {index}")
    finally:
        reloader.stop()
