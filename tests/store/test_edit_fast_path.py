"""What a one-file edit of a large set costs, on real directories: with the watcher running a
reload re-stats only the paths inotify reported (no walk of the tree), an organization with a
few changed files is updated rather than rebuilt (unchanged rules stay filed where they were),
and the first large set is frozen out of full garbage collections; every reload still equals
a fresh full load, decision for decision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy_engine.domain.decision import POLICY_LAYERS, Layer
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.store import DirectoryBackend, PolicyReloader, PolicyStore, ReloadResult
from tests.policy_builder import dump_yaml, request, user_policy, write_user_policies
from tests.store.support import wait_for, write_text_atomically

USERS = 60
SUBJECTS = [f"user-{n}" for n in (0, 3, 5, 6, 7, 59, 106, 1000)] + ["team-x", "ci-bot", "alice"]
SCOPES = ["repo", "repo-3", "admin", "admin-5", "team-read", "bot-write"]


def _glob_policies(root: Path) -> None:
    """User policies with glob subjects next to the exact ones (prefix, suffix, no anchor)."""
    users = root / "acme" / "users"
    for name, subjects, scope in [
        ("teams", ["team-*"], "team-read"),
        ("bots", ["*-bot"], "bot-write"),
        ("anyone-admin", ["*"], "admin"),
    ]:
        policy = {
            "kind": "Policy",
            "name": name,
            "layer": "user",
            "target": {"subjects": subjects},
            "rules": [{"name": "r", "effect": "allow", "condition": f'scope == "{scope}"'}],
        }
        (users / f"{name}.yaml").write_text(dump_yaml(policy))


def _answers(policies: CompiledPolicySet) -> list[tuple[bool, str]]:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    answers = []
    for subject in SUBJECTS:
        for scope in SCOPES:
            message = request(scope, subject=subject, explain=True)
            message.subject.attributes.update({"groups": ["team", "team-3"]})
            decision = decide(policies, message, now=now)
            answers.append((decision.allowed, repr(decision)))
    return answers


def _buckets(policies: CompiledPolicySet) -> dict[tuple[Layer, str], tuple]:
    """Every bucket's rules by (policy, rule) name, denies then allows."""
    org = policies.organizations["acme"]
    return {
        (layer, integration): tuple(
            (rule.policy, rule.name) for rule in (*bucket.denies.rules, *bucket.allows.rules)
        )
        for layer in POLICY_LAYERS
        for integration, bucket in org.layers[layer].by_integration.items()
    }


def _assert_equals_a_fresh_load(store: PolicyStore, root: Path) -> None:
    fresh = load_policy_set(root)
    serving = store.current()
    assert serving.revision == fresh.revision
    assert _buckets(serving) == _buckets(fresh)
    assert _answers(serving) == _answers(fresh)
    org, fresh_org = serving.organizations["acme"], fresh.organizations["acme"]
    assert (org.policy_count, org.rule_count) == (fresh_org.policy_count, fresh_org.rule_count)


class _CountingBackend(DirectoryBackend):
    """Counts walks of the whole tree."""

    walks = 0

    def _snapshot(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super()._snapshot()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_user_policies(tmp_path / "policies", "acme", USERS, templated=False)
    _glob_policies(tmp_path / "policies")
    return tmp_path / "policies"


@pytest.fixture
def watched(root: Path) -> Iterator[tuple[PolicyStore, _CountingBackend]]:
    backend = _CountingBackend(root)
    store = PolicyStore(backend)
    assert store.reload("startup") is ReloadResult.LOADED
    reloader = PolicyReloader(store, watch=True, debounce_ms=50)
    reloader.start()
    try:
        # The watcher's first notice reloads once, walking: nothing was watched before it.
        wait_for(lambda: store.status().attempts >= 2, what="the watcher's first notice")
        yield store, backend
    finally:
        reloader.stop()


def _user_text(index: int, scope: str) -> str:
    policy = user_policy(index, templated=False)
    policy["rules"][0]["condition"] = f'scope == "{scope}"'
    return dump_yaml({"kind": "Policy", **policy})


def test_edits_seen_by_the_watcher_reload_without_walking_the_tree(
    root: Path, watched: tuple[PolicyStore, _CountingBackend]
) -> None:
    store, backend = watched
    users = root / "acme" / "users"
    walks = backend.walks

    def applied() -> bool:
        return store.current().revision == load_policy_set(root).revision

    edits = [
        lambda: write_text_atomically(users / "user-00003.yaml", _user_text(3, "repo-3")),
        lambda: write_text_atomically(users / "user-00106.yaml", _user_text(106, "admin")),
        lambda: (users / "user-00005.yaml").unlink(),
        lambda: os.rename(users / "user-00006.yaml", users / "user-01000.yaml"),
        lambda: (users / "user-00007.yaml").write_text(_user_text(7, "repo")),  # in place
        lambda: write_text_atomically(
            users / "teams.yaml", _user_text(59, "x").replace("user-59", "team-y")
        ),  # a glob policy replaced by an exact one
    ]
    for edit in edits:
        edit()
        wait_for(applied, timeout=10, what="the edit to be served")
        _assert_equals_a_fresh_load(store, root)
    assert backend.walks == walks  # every change came from the journal: no walk


def test_a_new_folder_is_walked_and_loaded(
    root: Path, watched: tuple[PolicyStore, _CountingBackend]
) -> None:
    store, backend = watched
    walks = backend.walks
    (root / "acme" / "more").mkdir()
    write_text_atomically(root / "acme" / "more" / "user-00200.yaml", _user_text(200, "repo"))
    wait_for(
        lambda: store.current().revision == load_policy_set(root).revision,
        timeout=10,
        what="the new folder's file to be served",
    )
    _assert_equals_a_fresh_load(store, root)
    assert backend.walks > walks  # a folder watched anew: its changes were not all seen


def test_an_updated_organization_keeps_unchanged_rules_where_they_were(root: Path) -> None:
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    users = root / "acme" / "users"

    def filed(policies: CompiledPolicySet, subject: str) -> object:
        bucket = policies.organizations["acme"].layers[Layer.USER].bucket("github")
        return bucket.allows._dimensions[0].exact[subject]  # the tuple its rules are filed in

    before = store.current()
    for step, (index, scope) in enumerate([(3, "repo-3"), (3, "admin"), (40, "repo"), (41, "x")]):
        write_text_atomically(users / f"user-{index:05d}.yaml", _user_text(index, scope))
        (users / f"step-{step}.yaml").write_text(
            _user_text(300 + step, "repo").replace(f"user-{300 + step}", f"step-{step}-bot")
        )
        if step == 2:
            (users / "bots.yaml").unlink()
        assert store.reload("edit") is ReloadResult.LOADED
        _assert_equals_a_fresh_load(store, root)
        # The rules of a user whose file did not change are the very tuple they were.
        assert filed(store.current(), "user-11") is filed(before, "user-11")


def test_a_duplicate_or_broken_edit_is_reported_as_a_full_load_reports_it(root: Path) -> None:
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    users = root / "acme" / "users"
    (users / "copy.yaml").write_text(_user_text(4, "repo"))  # user-4's policy name again
    assert store.reload("duplicate") is ReloadResult.FAILED
    with pytest.raises(Exception) as fresh:
        load_policy_set(root)
    assert store.status().last_error == "\n".join(str(i) for i in fresh.value.issues)  # type: ignore[attr-defined]
    (users / "copy.yaml").write_text(_user_text(4, "repo").replace("scope ==", "scope =!"))
    assert store.reload("broken") is ReloadResult.FAILED
    (users / "copy.yaml").unlink()
    assert store.reload("fixed") is ReloadResult.UNCHANGED
    _assert_equals_a_fresh_load(store, root)


_FREEZE_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    from pathlib import Path
    from policy_engine.store import DirectoryBackend, PolicyStore, ReloadResult

    store = PolicyStore(DirectoryBackend(Path(sys.argv[1])))
    frozen_before = gc.get_freeze_count()
    assert store.reload("startup") is ReloadResult.LOADED
    print(json.dumps({"before": frozen_before, "after": gc.get_freeze_count()}))
    """
)


def test_the_first_large_set_is_frozen_out_of_full_collections(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    write_user_policies(root, "acme", 2_600, templated=True)  # 5,202 rules
    done = subprocess.run(
        [sys.executable, "-c", _FREEZE_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["before"] == 0
    assert figures["after"] > 100_000  # the set's objects: full collections skip them
