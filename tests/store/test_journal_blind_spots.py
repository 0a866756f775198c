"""Where the watcher's journal cannot see a change, a reload walks the tree: each scenario runs
a real DirectoryBackend with its watcher, revokes a user's allow through a name the journal
does not report (a symlink's target, a hard link's other name, a bind mount's other path, a
folder left unwatched at the watch limit, a JWKS file through a symlinked hidden folder),
and expects the served set to equal a fresh load.
With the journal trusted there, the revoked allow was served until SIGHUP."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy_engine.engine import decide
from policy_engine.policy import load_policy_set
from policy_engine.store import DirectoryBackend, PolicyReloader, PolicyStore, ReloadResult
from tests.auth.material import jwks
from tests.policy_builder import dump_yaml, request, user_policy, write_user_policies
from tests.store.support import wait_for
from tests.store.test_jwks_reload import KEPT, write_policies

REPOSITORY = Path(__file__).resolve().parents[2]


def policy_text(index: int, *, revoked: bool) -> str:
    """User `user-<index>`'s policy; `revoked`: its allow rule never matches."""
    policy = {"kind": "Policy", **user_policy(index, templated=True)}
    if revoked:
        policy["rules"][0]["condition"] = "false"
    return dump_yaml(policy)


def allowed(policies: object, organization: str, subject: str) -> bool:
    message = request("repo", organization=organization, subject=subject, groups=["team"])
    return decide(policies, message, now=datetime.now(UTC)).allowed  # type: ignore[arg-type]


def write_in_place(path: Path, text: str) -> None:
    """Truncate and write the same inode (hard links and symlinks keep pointing at it)."""
    with open(path, "w") as file:
        file.write(text)


def poke(root: Path) -> None:
    """An ordinary edit elsewhere in the tree: the journal reports it, a reload follows."""
    path = root / "acme" / "users" / "user-00003.yaml"
    write_in_place(path, path.read_text() + "\n")


@pytest.fixture(autouse=True)
def trusting_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    """No file is read again for having changed within a second of the last load (the racy
    window), which would hide a path the journal never reported."""
    monkeypatch.setattr(DirectoryBackend, "racy_window_ns", 0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "policies"
    write_user_policies(root, "acme", 5)
    write_user_policies(root, "beta", 2)
    return root


@contextlib.contextmanager
def serve(root: Path) -> Iterator[PolicyStore]:
    """A store loaded from `root`, reloaded by its watcher, past the watcher's first notice."""
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    reloader = PolicyReloader(store, watch=True, debounce_ms=50)
    reloader.start()
    try:
        # The first notice walks (nothing was watched before it); the journal counts after.
        wait_for(lambda: store.status().attempts >= 2, what="the watcher's first notice")
        yield store
    finally:
        reloader.stop()


def assert_served_fresh(store: PolicyStore, root: Path, organization: str) -> None:
    """The store comes to serve what a fresh load reads, the revoke included."""
    wait_for(
        lambda: store.current().revision == load_policy_set(root).revision,
        timeout=8,
        what="the revoke to be served",
    )
    assert not allowed(store.current(), organization, "user-1")


def run(root: Path, mutate: Callable[[], None], organization: str) -> None:
    with serve(root) as store:
        assert allowed(store.current(), organization, "user-1")
        mutate()
        assert_served_fresh(store, root, organization)


def test_a_symlink_to_a_hidden_file_in_the_tree_edited_there(root: Path) -> None:
    (root / ".shared").mkdir()
    target = root / ".shared" / "user-1.yaml"
    target.write_text(policy_text(1, revoked=False))
    link = root / "acme" / "users" / "user-00001.yaml"
    link.unlink()
    link.symlink_to("../../.shared/user-1.yaml")
    run(root, lambda: write_in_place(target, policy_text(1, revoked=True)), "acme")


def test_a_symlink_to_another_organizations_file_edited_there(root: Path) -> None:
    link = root / "beta" / "users" / "user-00001.yaml"
    link.unlink()
    link.symlink_to("../../acme/users/user-00001.yaml")
    target = root / "acme" / "users" / "user-00001.yaml"
    run(root, lambda: write_in_place(target, policy_text(1, revoked=True)), "beta")


def test_two_organizations_files_hard_linked_one_written_in_place(root: Path) -> None:
    linked = root / "beta" / "users" / "user-00001.yaml"
    linked.unlink()
    os.link(root / "acme" / "users" / "user-00001.yaml", linked)
    target = root / "acme" / "users" / "user-00001.yaml"
    run(root, lambda: write_in_place(target, policy_text(1, revoked=True)), "beta")


def test_a_hard_link_outside_the_tree_edited_then_another_file_changes(root: Path) -> None:
    outside = root.parent / "deployed-user-1.yaml"  # as `cp -al` or `rsync --link-dest` leave
    os.link(root / "acme" / "users" / "user-00001.yaml", outside)

    def mutate() -> None:
        write_in_place(outside, policy_text(1, revoked=True))  # no watch sees this
        poke(root)

    run(root, mutate, "acme")


# --- namespaces: a private watch limit, a bind mount ---------------------------------------

# Run as root of a private user namespace (`unshare -Ur`, with `-m` its own mounts too): its
# inotify watch limit and its mounts touch nobody else.
_CHILD = textwrap.dedent(
    """
    import os, subprocess, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from tests.store import test_journal_blind_spots as t
    from tests.policy_builder import write_user_policies

    scenario, root = sys.argv[2], Path(sys.argv[3])
    t.DirectoryBackend.racy_window_ns = 0
    if scenario == "watch-limit":
        for index in range(20):
            write_user_policies(root, f"org{index:02d}", 3)
        Path("/proc/sys/user/max_inotify_watches").write_text("12")
        # The first organization the walk lists: its folder is among the watched ones.
        first = next(os.walk(root))[1][0]
        with t.serve(root) as store:
            for org in sorted(os.listdir(root)):  # most users folders are not watched
                target = root / org / "users" / "user-00001.yaml"
                temporary = target.with_name("user-00001.tmp")
                temporary.write_text(t.policy_text(1, revoked=True))
                os.replace(temporary, target)
            org_file = root / first / "organization.yaml"
            t.write_in_place(org_file, org_file.read_text() + "\\n")  # the other change
            t.assert_served_fresh(store, root, first)
            for org in sorted(os.listdir(root)):
                assert not t.allowed(store.current(), org, "user-1"), org
    elif scenario == "bind-mount":
        write_user_policies(root, "acme", 5)
        write_user_policies(root, "beta", 2)
        shared = root / "beta" / "users"
        subprocess.run(["mount", "--bind", str(root / "acme" / "users"), str(shared)], check=True)
        target = root / "acme" / "users" / "user-00001.yaml"
        t.run(root, lambda: t.write_in_place(target, t.policy_text(1, revoked=True)), "beta")
    print("served fresh")
    """
)


def _in_namespace(tmp_path: Path, scenario: str, *flags: str) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no private user namespace: {probe.stderr.decode().strip()}")
    result = subprocess.run(
        [
            "unshare",
            *flags,
            sys.executable,
            "-c",
            _CHILD,
            str(REPOSITORY),
            scenario,
            str(tmp_path / "policies"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "served fresh" in result.stdout, result.stderr[-3000:]


def test_folders_left_unwatched_at_the_watch_limit_are_walked_on_another_change(
    tmp_path: Path,
) -> None:
    _in_namespace(tmp_path, "watch-limit", "-Ur")


def test_a_folder_bind_mounted_into_another_organization_edited_by_its_first_name(
    tmp_path: Path,
) -> None:
    _in_namespace(tmp_path, "bind-mount", "-Urm")


def test_a_jwks_file_through_a_symlinked_hidden_folder_edited_where_it_leads(
    tmp_path: Path,
) -> None:
    root = write_policies(tmp_path / "policies")  # acme: .keys/jwks.json, two keys
    keys = root / "acme" / ".keys"
    keys.rename(root / "acme" / ".keys-v2")  # `.keys` now leads there, as a deploy swaps it
    keys.symlink_to(".keys-v2")
    with serve(root) as store:
        before = store.current().revision
        write_in_place(root / "acme" / ".keys-v2" / "jwks.json", jwks(KEPT))
        wait_for(
            lambda: store.current().revision == load_policy_set(root).revision,
            timeout=8,
            what="the JWKS without the compromised key to be served",
        )
        assert store.current().revision != before


class _CountingBackend(DirectoryBackend):
    """Counts walks of the whole tree."""

    walks = 0

    def _snapshot(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super()._snapshot()


def test_once_a_symlinked_folder_is_gone_edits_are_taken_from_the_journal_again(
    root: Path,
) -> None:
    (root / ".elsewhere").mkdir()
    (root / "acme" / "more").symlink_to("../.elsewhere")
    backend = _CountingBackend(root)
    store = PolicyStore(backend)
    assert store.reload("startup") is ReloadResult.LOADED
    reloader = PolicyReloader(store, watch=True, debounce_ms=50)
    reloader.start()
    user = root / "acme" / "users" / "user-00002.yaml"

    def served() -> bool:
        return store.current().revision == load_policy_set(root).revision

    try:
        wait_for(lambda: store.status().attempts >= 2, what="the watcher's first notice")
        write_in_place(user, user.read_text() + "\n")
        wait_for(served, timeout=8, what="an edit while the link is there")
        walks = backend.walks
        write_in_place(user, user.read_text() + "\n")
        wait_for(served, timeout=8, what="a second edit while the link is there")
        assert backend.walks > walks  # a folder with two names: every reload walks
        (root / "acme" / "more").unlink()
        wait_for(served, timeout=8, what="the link's removal")
        write_in_place(user, user.read_text() + "\n")  # the first period after: not exact
        wait_for(served, timeout=8, what="an edit after the link is gone")
        walks = backend.walks
        for _ in range(2):
            write_in_place(user, user.read_text() + "\n")
            wait_for(served, timeout=8, what="an edit taken from the journal")
        assert backend.walks == walks
    finally:
        reloader.stop()
