"""An older signed set put back cannot replace a newer one: someone who can write the policy
directory but holds no signing key could otherwise restore last month's bundle, validly signed,
and with it an allow that was since taken away. Real files, real signatures, the real store."""

from __future__ import annotations

import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest

from policy_engine.config import BundleSettings, ConfigError, Settings
from policy_engine.domain.decision import Effect
from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.policy.bundle import BUNDLE_FILE, sign_bundle
from policy_engine.server.app import bundle_not_before
from policy_engine.store import DirectoryBackend, PolicyStore
from policy_engine.store.store import NoPolicyLoaded, ReloadResult
from tests.policy.test_bundle import key_pair
from tests.store.support import decide_scope, org_policy, write_policy_dir

OLD_ORG = org_policy(["repo", "delete_repo"])  # before: deleting repositories allowed
NEW_ORG = org_policy(["repo", "delete_repo"], deny=["delete_repo"])  # now: denied


@pytest.fixture
def keys(tmp_path: Path) -> tuple[bytes, bytes]:
    private, public = key_pair(tmp_path)
    return private.read_bytes(), public.read_bytes()


def _signed(root: Path, org_yaml: str, private: bytes) -> Path:
    write_policy_dir(root, org_yaml)
    sign_bundle(root, private)
    time.sleep(0.002)  # signing times are microseconds apart at least
    return root


def test_a_server_refuses_an_older_signed_set_put_back(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    old = _signed(tmp_path / "old", OLD_ORG, keys[0])
    live = _signed(tmp_path / "live", NEW_ORG, keys[0])
    store = PolicyStore(DirectoryBackend(live, bundle_public_key=keys[1]))
    assert store.reload("startup") is ReloadResult.LOADED
    serving = store.current()
    assert decide_scope(serving, "delete_repo").effect is Effect.DENY

    for name in ("acme/org.yaml", BUNDLE_FILE):  # the old bundle, restored file by file
        shutil.copyfile(old / name, live / name)
    load_policy_set(live, bundle_public_key=keys[1])  # valid on its own: only order refuses it
    assert store.reload("rollback") is ReloadResult.FAILED
    assert "an older signed set is not loaded (rollback)" in store.status().last_error
    assert store.current() is serving
    assert decide_scope(store.current(), "delete_repo").effect is Effect.DENY

    sign_bundle(live, keys[0])  # signing the same files anew is a newer set: it loads
    assert store.reload("re-signed") is ReloadResult.LOADED
    assert decide_scope(store.current(), "delete_repo").effect is Effect.ALLOW


def test_bundle_not_before_refuses_an_older_set_at_startup(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    old = _signed(tmp_path / "old", OLD_ORG, keys[0])
    floor = load_policy_set(old, bundle_public_key=keys[1]).signed_at
    assert floor is not None
    store = PolicyStore(
        DirectoryBackend(
            old, bundle_public_key=keys[1], bundle_not_before=floor + timedelta(microseconds=1)
        )
    )
    assert store.reload("startup") is ReloadResult.FAILED
    assert "rollback" in store.status().last_error
    with pytest.raises(NoPolicyLoaded):
        store.current()
    with pytest.raises(PolicyLoadError, match="rollback"):
        load_policy_set(old, bundle_public_key=keys[1], bundle_not_before=floor + timedelta(1))
    assert load_policy_set(old, bundle_public_key=keys[1], bundle_not_before=floor).signed_at


@pytest.mark.parametrize("text", ["yesterday", "2026-11-30T12:00:00", "2026-13-01T00:00:00Z"])
def test_bundle_not_before_must_be_a_time_with_a_zone(text: str) -> None:
    with pytest.raises(ConfigError, match=r"setting bundle\.not_before"):
        bundle_not_before(Settings(bundle=BundleSettings(not_before=text)))
    assert bundle_not_before(Settings()) is None
