"""Incremental reloads on real directories: only changed files are parsed and compiled again,
the result is the one a fresh full load gives, and an unchanged set is not read at all."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy_engine.cel import CelCompileError
from policy_engine.cel.compiler import CompileLimits, Declarations
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, PolicyLoadError, load_policy_set
from policy_engine.policy.compile_cache import CompileCache, LoadAttempt
from policy_engine.store import DirectoryBackend, PolicyReloader, PolicyStore, ReloadResult
from policy_engine.store.store import format_issues
from tests.policy_builder import dump_yaml, request, user_policy, write_user_policies
from tests.store.support import wait_for, write_text_atomically

USERS = 20
FILES = USERS + 3  # organization.yaml, the org and application allow-alls, one per user


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_user_policies(tmp_path / "policies", "acme", USERS, templated=False)
    return tmp_path / "policies"


@pytest.fixture
def store(root: Path) -> PolicyStore:
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    return store


def _cache(store: PolicyStore) -> CompileCache:
    backend = store.backend
    assert isinstance(backend, DirectoryBackend)
    return backend.cache


def _edit_user(root: Path, index: int, condition: str) -> None:
    policy = user_policy(index, templated=False)
    policy["rules"][0]["condition"] = condition
    write_text_atomically(
        root / "acme" / "users" / f"user-{index:05d}.yaml", dump_yaml({"kind": "Policy", **policy})
    )


def _answers(policies: CompiledPolicySet) -> list[tuple[bool, tuple[str, ...], str]]:
    """Decisions with their explain traces for a spread of users and scopes."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    answers = []
    for index in (0, 7, USERS - 1):
        for scope in ("repo-7", "admin-7", "edited", "read"):
            decision = decide(
                policies,
                request(scope, subject=f"user-{index}", explain=True, groups=["team-7"]),
                now=now,
            )
            answers.append(
                (decision.allowed, tuple(r.code.value for r in decision.reasons), repr(decision))
            )
    return answers


def test_the_first_load_compiles_each_condition_once(store: PolicyStore) -> None:
    cache = _cache(store)
    assert cache.parses == FILES
    assert cache.compiles == 2 * USERS  # every condition text differs


def test_identical_conditions_are_compiled_once(tmp_path: Path) -> None:
    root = write_user_policies(tmp_path / "policies", "acme", USERS, templated=True).parent
    backend = DirectoryBackend(root)
    backend.load()
    assert backend.cache.compiles == 2  # two texts, shared by every user


def test_an_edit_parses_and_compiles_only_the_changed_file(root: Path, store: PolicyStore) -> None:
    cache = _cache(store)
    parses, compiles = cache.parses, cache.compiles
    before = store.current()
    _edit_user(root, 7, 'scope == "edited"')
    assert store.reload("edit") is ReloadResult.LOADED
    assert cache.parses == parses + 1
    assert cache.compiles == compiles + 1  # its other rule's text is unchanged: shared
    after = store.current()
    # Unchanged files' compiled rules are the very same objects; the edited rule is new.
    assert _rules_of(after, "user-3") == _rules_of(before, "user-3")
    assert _rules_of(after, "user-7")[0] is not _rules_of(before, "user-7")[0]
    assert decide(after, request("edited", subject="user-7"), now=datetime.now(UTC)).allowed
    assert not decide(before, request("edited", subject="user-7"), now=datetime.now(UTC)).allowed


def test_an_incremental_reload_equals_a_fresh_full_load(root: Path, store: PolicyStore) -> None:
    for step, condition in enumerate(
        ('scope == "edited"', '"team-7" in subject.attributes.groups')
    ):
        _edit_user(root, 7 + step, condition)
        assert store.reload("edit") is ReloadResult.LOADED
        fresh = load_policy_set(root)
        assert store.current().revision == fresh.revision
        assert _answers(store.current()) == _answers(fresh)


def test_a_broken_file_keeps_the_last_good_set_and_does_not_poison_the_cache(
    root: Path, store: PolicyStore
) -> None:
    cache = _cache(store)
    good = store.current()
    for broken in ('scope == ["repo"', "subject.nme == 1"):  # a syntax error, a wrong field
        _edit_user(root, 5, broken)
        assert store.reload("broken") is ReloadResult.FAILED
        assert store.current() is good
        with pytest.raises(PolicyLoadError) as fresh:
            load_policy_set(root)
        assert store.status().last_error == format_issues(fresh.value)
        # Again with the same broken bytes: the same error, not a cached success.
        assert store.reload("again") is ReloadResult.FAILED
        assert store.status().last_error == format_issues(fresh.value)
    compiles = cache.compiles
    _edit_user(root, 5, 'scope == "fixed"')
    assert store.reload("fixed") is ReloadResult.LOADED
    assert cache.compiles == compiles + 1  # only the fixed condition: the rest stayed cached
    assert store.current().revision == load_policy_set(root).revision
    assert decide(
        store.current(), request("fixed", subject="user-5"), now=datetime.now(UTC)
    ).allowed


def test_the_cache_keeps_only_what_the_serving_set_uses(root: Path, store: PolicyStore) -> None:
    cache = _cache(store)
    held = len(cache)
    assert held == FILES + 2 * USERS
    for step in range(10):
        _edit_user(root, 3, f'scope == "edit-{step}"')
        assert store.reload("edit") is ReloadResult.LOADED
        assert len(cache) == held  # the replaced file and condition are dropped
    _edit_user(root, 3, 'scope == ["broken"')
    assert store.reload("broken") is ReloadResult.FAILED
    assert len(cache) <= held + 1  # the last good set, plus what the failed attempt used


def test_conditions_compiled_in_another_environment_are_not_shared() -> None:
    attempt = LoadAttempt(CompileCache())
    with_subject = Declarations(variables={"subject": frozenset({"id"})})
    also_with_subject = Declarations(variables={"subject": frozenset({"id"})})
    without = Declarations(variables={"scope": None})
    first = attempt.condition('subject.id == "a"', with_subject)
    assert attempt.condition('subject.id == "a"', also_with_subject) is first  # equal environment
    with pytest.raises(CelCompileError, match="unknown variable"):
        attempt.condition('subject.id == "a"', without)
    with pytest.raises(CelCompileError, match="too large"):
        attempt.condition('subject.id == "a"', with_subject, CompileLimits(max_ast_nodes=2))
    assert attempt.condition('subject.id == "a"', with_subject) is first


def _rules_of(policies: CompiledPolicySet, policy: str) -> list[object]:
    found: dict[int, object] = {}
    for layer in policies.organizations["acme"].layers.values():
        for bucket in layer.by_integration.values():
            for rule in (*bucket.denies.rules, *bucket.allows.rules):
                if rule.policy == policy:
                    found[id(rule)] = rule
    return sorted(found.values(), key=lambda rule: rule.name)  # type: ignore[attr-defined]


# --- unchanged sets ------------------------------------------------------------------------


@pytest.fixture
def trusting_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written just before a load are normally read again once (their change time is
    within the racy window); these tests write first and load after, so none is racy."""
    monkeypatch.setattr(DirectoryBackend, "racy_window_ns", 0)


@pytest.fixture
def watched(root: Path, trusting_stat: None) -> Iterator[tuple[PolicyStore, PolicyReloader]]:
    store = PolicyStore(DirectoryBackend(root))
    store.reload("startup")
    reloader = PolicyReloader(store, debounce_ms=50)
    reloader.start()
    wait_for(lambda: store.status().attempts >= 2, what="the watcher's first notice")
    yield store, reloader
    reloader.stop()


def test_startup_and_the_watchers_first_notice_load_once(
    watched: tuple[PolicyStore, PolicyReloader],
) -> None:
    store, _ = watched
    backend = store.backend
    assert isinstance(backend, DirectoryBackend)
    assert store.status().last_result is ReloadResult.UNCHANGED
    assert backend.full_loads == 1
    assert (backend.cache.parses, backend.cache.compiles) == (FILES, 2 * USERS)


def test_a_racy_unchanged_set_is_read_again_but_nothing_is_compiled(root: Path) -> None:
    backend = DirectoryBackend(root)  # files written just now: within the racy window
    first = backend.load()
    assert backend.load() is first
    assert backend.full_loads == 2
    assert (backend.cache.parses, backend.cache.compiles) == (FILES, 2 * USERS)


def test_a_walk_or_an_identity_that_differs_is_a_change(root: Path, trusting_stat: None) -> None:
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    backend = store.backend
    assert isinstance(backend, DirectoryBackend)
    assert store.reload("nothing") is ReloadResult.UNCHANGED
    assert backend.full_loads == 1
    extra = root / "acme" / "users" / "extra.yaml"
    extra.write_text(dump_yaml({"kind": "Policy", **user_policy(USERS, templated=False)}))
    assert store.reload("added") is ReloadResult.LOADED
    extra.unlink()
    assert store.reload("removed") is ReloadResult.LOADED
    (root / "acme" / "users" / "user-00002.yaml").touch()  # same bytes, new identity
    assert store.reload("touched") is ReloadResult.UNCHANGED
    assert backend.full_loads == 4
    assert store.current().revision == load_policy_set(root).revision
