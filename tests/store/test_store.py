"""PolicyStore on real directories: swaps only valid sets, keeps the last good one otherwise."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.store import (
    DirectoryBackend,
    NoPolicyLoaded,
    PolicyStore,
    ReloadResult,
)
from policy_engine.store.backend import _Fingerprint, _Identity
from tests.store.support import (
    BAD_CEL,
    BAD_CEL_LINE,
    BAD_YAML,
    make_unreadable,
    org_policy,
    write_policy_dir,
)

ALLOW_REPO = org_policy(["repo", "read"])
DENY_REPO = org_policy(["read"], deny=["repo"])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_policy_dir(tmp_path / "policies", ALLOW_REPO)


@pytest.fixture
def store(root: Path) -> PolicyStore:
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    return store


def _allowed(policies: CompiledPolicySet, scope: str) -> bool:
    from tests.store.support import decide_scope

    return decide_scope(policies, scope).allowed


def test_a_valid_set_loads_and_the_status_describes_it(root: Path, store: PolicyStore) -> None:
    policies = store.current()
    status = store.status()
    assert status.revision == policies.revision == load_policy_set(root).revision
    assert status.serving and status.last_ok
    assert status.organizations == ("acme",)
    assert status.file_count == 3
    assert status.loaded_at is not None and status.loaded_at == status.last_attempt_at
    assert status.last_result is ReloadResult.LOADED
    assert status.last_error == ""
    assert status.last_reason == "startup"
    assert status.source == str(root)
    assert _allowed(policies, "repo")


def test_a_changed_set_is_swapped_in_whole(root: Path, store: PolicyStore) -> None:
    before = store.current()
    swapped: list[CompiledPolicySet] = []
    store.subscribe(swapped.append)
    (root / "acme" / "org.yaml").write_text(DENY_REPO)
    assert store.reload("edit") is ReloadResult.LOADED
    after = store.current()
    assert after.revision != before.revision
    assert swapped == [after]
    assert not _allowed(after, "repo") and _allowed(before, "repo")  # the old object is intact
    assert store.status().revision == after.revision


def test_reloading_the_same_revision_swaps_nothing_but_records_the_attempt(
    store: PolicyStore,
) -> None:
    before, status = store.current(), store.status()
    swapped: list[CompiledPolicySet] = []
    store.subscribe(swapped.append)
    assert store.reload("again") is ReloadResult.UNCHANGED
    after = store.status()
    assert store.current() is before
    assert swapped == []
    assert after.loaded_at == status.loaded_at
    assert after.last_attempt_at is not None and status.last_attempt_at is not None
    assert after.last_attempt_at >= status.last_attempt_at
    assert after.attempts == status.attempts + 1
    assert after.last_result is ReloadResult.UNCHANGED and after.last_ok
    assert after.last_reason == "again"


def _bad_yaml(root: Path) -> str:
    (root / "acme" / "org.yaml").write_text(BAD_YAML)
    return "org.yaml:6: invalid YAML"


def _bad_cel(root: Path) -> str:
    (root / "acme" / "org.yaml").write_text(BAD_CEL)
    return f"org.yaml:{BAD_CEL_LINE}:"


def _half_written(root: Path) -> str:
    text = DENY_REPO
    (root / "acme" / "org.yaml").write_text(text[: len(text) // 2])
    return "org.yaml:10:"


def _emptied(root: Path) -> str:
    for child in root.iterdir():
        shutil.rmtree(child)
    return "no policy files"


def _deleted(root: Path) -> str:
    shutil.rmtree(root)
    return "does not exist"


def _unreadable(root: Path) -> str:
    make_unreadable(root / "acme" / "organization.yaml")
    return "organization.yaml:0: cannot read"


def _organization_removed(root: Path) -> str:
    (root / "acme" / "organization.yaml").unlink()
    return "expected exactly one 'kind: Organization'"


BREAKAGES: dict[str, Callable[[Path], str]] = {
    "bad-yaml": _bad_yaml,
    "bad-cel": _bad_cel,
    "half-written-file": _half_written,
    "emptied-directory": _emptied,
    "deleted-directory": _deleted,
    "unreadable-file": _unreadable,
    "organization-file-removed": _organization_removed,
}


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_a_broken_change_keeps_the_last_good_set_until_fixed(
    root: Path, store: PolicyStore, breakage: Callable[[Path], str]
) -> None:
    good = store.current()
    good_status = store.status()
    expected_error = breakage(root)

    assert store.reload("broken") is ReloadResult.FAILED
    assert store.current() is good  # nothing half-applied: the very same set keeps serving
    status = store.status()
    assert status.revision == good.revision
    assert status.loaded_at == good_status.loaded_at
    assert not status.last_ok and status.last_result is ReloadResult.FAILED
    assert expected_error in status.last_error, status.last_error
    assert status.last_attempt_at is not None
    assert good_status.last_attempt_at is not None
    assert status.last_attempt_at >= good_status.last_attempt_at

    # Fixed with a different version: it loads, and decides differently.
    if root.exists():
        shutil.rmtree(root)
    write_policy_dir(root, DENY_REPO)
    assert store.reload("fixed") is ReloadResult.LOADED
    assert store.status().last_ok and store.status().last_error == ""
    assert not _allowed(store.current(), "repo")


def test_every_issue_is_reported_with_file_and_line(root: Path, store: PolicyStore) -> None:
    (root / "acme" / "org.yaml").write_text(BAD_CEL)
    (root / "acme" / "open.yaml").write_text(BAD_YAML)
    assert store.reload() is ReloadResult.FAILED
    lines = store.status().last_error.splitlines()
    assert any(f"org.yaml:{BAD_CEL_LINE}:" in line for line in lines), lines
    assert any("open.yaml:6:" in line for line in lines), lines


def test_without_a_valid_set_the_store_raises_and_says_why(tmp_path: Path) -> None:
    store = PolicyStore(DirectoryBackend(tmp_path / "missing"))
    with pytest.raises(NoPolicyLoaded, match="no valid policy set"):
        store.current()
    assert store.reload("startup") is ReloadResult.FAILED
    with pytest.raises(NoPolicyLoaded):
        store.current()
    status = store.status()
    assert not status.serving and status.revision == "" and status.loaded_at is None
    assert "does not exist" in status.last_error

    write_policy_dir(tmp_path / "missing", ALLOW_REPO)
    assert store.reload("created") is ReloadResult.LOADED
    assert store.status().serving and _allowed(store.current(), "repo")


class _DeployLandsMidRead(DirectoryBackend):
    """A directory into which a deploy writes while the first load is reading it."""

    def __init__(self, directory: Path, new_text: str) -> None:
        super().__init__(directory)
        self.new_text = new_text
        self.fingerprints = 0

    def _fingerprint(self) -> tuple[_Identity | None, _Fingerprint]:
        fingerprint = super()._fingerprint()
        self.fingerprints += 1
        if self.fingerprints == 1:
            target = self.directory / "acme" / "org.yaml"
            target.write_text(self.new_text)
            os.utime(target, ns=(1, 1))  # a different mtime even on a coarse clock
        return fingerprint


def test_a_change_during_the_load_is_never_half_applied(root: Path) -> None:
    backend = _DeployLandsMidRead(root, DENY_REPO)
    store = PolicyStore(backend)
    assert store.reload("startup") is ReloadResult.LOADED
    assert backend.fingerprints > 2  # the first, torn read was refused and retried
    assert store.current().revision == load_policy_set(root).revision
    assert not _allowed(store.current(), "repo")


@pytest.mark.parametrize("kind", ["dangling-symlink", "fifo"])
def test_a_policy_path_that_cannot_be_read_as_a_file_fails_the_load(
    root: Path, store: PolicyStore, kind: str
) -> None:
    path = root / "acme" / "org.yaml"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(root / "gone.yaml")
    assert store.reload("broken") is ReloadResult.FAILED


def test_an_empty_policy_file_fails_the_load(root: Path, store: PolicyStore) -> None:
    (root / "acme" / "org.yaml").write_text("")
    assert store.reload("truncated") is ReloadResult.FAILED


class _FileDeletedMidRead(DirectoryBackend):
    """A deploy deletes a policy file after the load listed it and before it is read."""

    def __init__(self, directory: Path, doomed: Path) -> None:
        super().__init__(directory)
        self.doomed = doomed
        self.fingerprints = 0

    def _fingerprint(self) -> _Fingerprint:
        fingerprint = super()._fingerprint()
        self.fingerprints += 1
        if self.fingerprints == 1:
            self.doomed.unlink()
        return fingerprint


def test_a_file_deleted_between_listing_and_reading_is_a_retry_not_a_failure(
    root: Path,
) -> None:
    doomed = root / "acme" / "gone.yaml"
    doomed.write_text(
        "kind: Policy\nname: soon-gone\nlayer: user\ntarget:\n  subjects: [nobody]\n"
        "rules:\n  - name: r\n    effect: deny\n"
    )
    backend = _FileDeletedMidRead(root, doomed)
    store = PolicyStore(backend)
    assert store.reload("startup") is ReloadResult.LOADED  # was FAILED: "cannot read"
    assert backend.fingerprints > 2  # the torn read was refused and retried
    assert store.current().revision == load_policy_set(root).revision
