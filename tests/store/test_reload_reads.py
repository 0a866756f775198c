"""What a reload opens: at 10,000 policies an edit reads exactly the changed file (the others'
identities vouch for their bytes), yet the revision and every answer equal a fresh full load's;
a file whose identity changed is read again even when its size and mtime did not, and files
not read still count against the set's size limit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy_engine.config import PolicyLimits
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.store import DirectoryBackend, PolicyStore, ReloadResult
from tests.policy_builder import dump_yaml, request, user_policy, write_user_policies
from tests.store.support import write_text_atomically

USERS = 10_000
FILES = USERS + 3  # organization.yaml, the org and application allow-alls, one per user


class _TrustingBackend(DirectoryBackend):
    """These tests write first and reload after: no file is within the racy window (a file
    changed just before the last load is read again by design; see test_incremental_reload)."""

    racy_window_ns = 0


@dataclass
class _Large:
    root: Path
    store: PolicyStore
    backend: DirectoryBackend


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Large]:
    root = tmp_path_factory.mktemp("large") / "policies"
    write_user_policies(root, "acme", 0)
    # The files write_user_policies(root, "acme", USERS) writes, from one YAML dump (fast).
    template = dump_yaml({"kind": "Policy", **user_policy(99_999, templated=True)})
    assert template.count("99999") == 2  # the policy's name and its subject
    users = root / "acme" / "users"
    for index in range(USERS):
        (users / f"user-{index:05d}.yaml").write_text(template.replace("99999", str(index)))
    backend = _TrustingBackend(root)
    store = PolicyStore(backend)
    assert store.reload("startup") is ReloadResult.LOADED
    yield _Large(root, store, backend)


def _user_file(root: Path, index: int) -> Path:
    return root / "acme" / "users" / f"user-{index:05d}.yaml"


def _policy_text(index: int, scope: str) -> str:
    policy = user_policy(index, templated=True)
    policy["rules"][0]["condition"] = f'scope == "{scope}"'
    return dump_yaml({"kind": "Policy", **policy})


def _allowed(policies: CompiledPolicySet, index: int, scope: str) -> bool:
    return decide(policies, request(scope, subject=f"user-{index}"), now=datetime.now(UTC)).allowed


def _work(backend: DirectoryBackend) -> tuple[int, int, int]:
    """(files read, files parsed, organizations built) so far."""
    cache = backend.cache
    return cache.reads, cache.parses, cache.organizations


def test_an_edit_reads_exactly_the_changed_file_and_equals_a_fresh_load(large: _Large) -> None:
    reads, parses, built = _work(large.backend)
    write_text_atomically(_user_file(large.root, 42), _policy_text(42, "edited-42"))
    assert large.store.reload("edit") is ReloadResult.LOADED
    assert _work(large.backend) == (reads + 1, parses + 1, built + 1)
    after = large.store.current()
    assert _allowed(after, 42, "edited-42")
    fresh = load_policy_set(large.root)
    assert after.revision == fresh.revision
    assert after.file_count == fresh.file_count == FILES
    for index, scope in ((42, "edited-42"), (42, "repo"), (41, "repo"), (41, "admin")):
        assert _allowed(after, index, scope) == _allowed(fresh, index, scope)
    # Every file is still recorded as read (watched, checked), the unread ones as before.
    assert len(after.files_read) == FILES


def test_a_new_identity_with_the_same_bytes_is_read_and_changes_nothing(large: _Large) -> None:
    before = large.store.current()
    reads, parses, built = _work(large.backend)
    path = _user_file(large.root, 17)
    path.write_bytes(path.read_bytes())  # same bytes, new mtime and ctime
    assert large.store.reload("touched") is ReloadResult.UNCHANGED
    assert _work(large.backend) == (reads + 1, parses, built)  # read, parse reused
    assert large.store.current() is before


def test_a_rename_with_the_same_size_and_mtime_is_read(large: _Large) -> None:
    path = _user_file(large.root, 23)
    old = path.stat()
    padding = old.st_size - len(_policy_text(23, "renamed-").encode())
    scope = "renamed-" + "x" * padding
    text = _policy_text(23, scope)
    assert len(text.encode()) == old.st_size  # the same size as the version it replaces
    temporary = path.with_name(".swap.tmp")
    temporary.write_text(text)
    os.utime(temporary, ns=(old.st_atime_ns, old.st_mtime_ns))  # the very same mtime
    reads, parses, _ = _work(large.backend)
    os.replace(temporary, path)  # a new inode under the old name
    assert large.store.reload("renamed") is ReloadResult.LOADED
    assert _work(large.backend)[:2] == (reads + 1, parses + 1)
    assert _allowed(large.store.current(), 23, scope)


def test_files_not_read_still_count_against_the_set_size_limit(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    write_user_policies(root, "acme", 20, templated=True)
    total = sum(path.stat().st_size for path in root.rglob("*.yaml"))
    backend = _TrustingBackend(root, limits=PolicyLimits(max_set_bytes=total + 10))
    store = PolicyStore(backend)
    assert store.reload("startup") is ReloadResult.LOADED
    reads = backend.cache.reads
    path = _user_file(root, 3)
    # 40 bytes more: over the limit only counted with the files that are not read again.
    write_text_atomically(path, path.read_text() + "# " + "x" * 37 + "\n")
    assert store.reload("grown") is ReloadResult.FAILED
    assert "max_set_bytes" in store.status().last_error
    assert backend.cache.reads <= reads + 1  # the others were not read, only charged
