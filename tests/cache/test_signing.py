"""The Redis level's signing keys: required, long enough, from a file, rotated; refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from policy_engine.cache import MIN_KEY_BYTES, build_cache, load_signing_keys
from policy_engine.config import CacheSettings, ConfigError
from tests.cache.support import KEY, NEW_KEY, OLD_KEY
from tests.server.harness import EXAMPLE_POLICIES, REPO

REDIS = CacheSettings(redis_url="redis://127.0.0.1:1/0")  # nothing is connected to build one


def test_the_redis_level_without_a_signing_key_is_refused() -> None:
    for settings in (REDIS, replace(REDIS, redis_signing_key="   ")):
        with pytest.raises(ConfigError) as refused:
            build_cache(settings)
        message = str(refused.value)
        assert "cache.redis_signing_key" in message and "cache.redis_signing_key_file" in message
        assert "openssl rand -hex 32" in message


def test_no_key_is_needed_without_a_redis_level() -> None:
    assert build_cache(CacheSettings()) is not None  # in-process only
    assert build_cache(replace(REDIS, enabled=False)) is None


def test_a_key_too_short_to_be_secret_is_refused() -> None:
    short = "k" * (MIN_KEY_BYTES - 1)
    with pytest.raises(ConfigError, match=rf"cache\.redis_signing_key: a key of {len(short)} "):
        load_signing_keys(replace(REDIS, redis_signing_key=short))
    # Counted in bytes of UTF-8: 11 three-byte characters are 33 bytes.
    assert load_signing_keys(replace(REDIS, redis_signing_key="鍵" * 11)) is not None
    with pytest.raises(ConfigError, match=r"cache\.redis_verify_keys: a key of 6 bytes"):
        load_signing_keys(replace(REDIS, redis_signing_key=KEY, redis_verify_keys="s3cret"))


def test_the_key_can_come_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "cache.key"
    key_file.write_text(f"\n{KEY}\n")
    from_file = load_signing_keys(replace(REDIS, redis_signing_key_file=str(key_file)))
    assert from_file == load_signing_keys(replace(REDIS, redis_signing_key=KEY))

    key_file.write_text(f"{KEY}\n{OLD_KEY}\n")
    with pytest.raises(ConfigError, match="exactly one key, found 2"):
        load_signing_keys(replace(REDIS, redis_signing_key_file=str(key_file)))
    key_file.write_text("\n")
    with pytest.raises(ConfigError, match="exactly one key, found 0"):
        load_signing_keys(replace(REDIS, redis_signing_key_file=str(key_file)))
    missing = str(tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=r"cache\.redis_signing_key_file: cannot read .*nope"):
        load_signing_keys(replace(REDIS, redis_signing_key_file=missing))
    with pytest.raises(ConfigError, match="set one, not both"):
        load_signing_keys(replace(REDIS, redis_signing_key=KEY, redis_signing_key_file=missing))


def test_verify_keys_inline_and_from_a_file(tmp_path: Path) -> None:
    verify_file = tmp_path / "verify.keys"
    verify_file.write_text(f"{OLD_KEY}\n\n{NEW_KEY}\n")
    keys = load_signing_keys(
        replace(
            REDIS,
            redis_signing_key=KEY,
            redis_verify_keys=f" {OLD_KEY} ,",
            redis_verify_keys_file=str(verify_file),
        )
    )
    assert keys.verifying[0] == keys.signing
    assert len({k.key_id for k in keys.verifying}) == 3  # KEY, OLD_KEY, NEW_KEY once each


def _serve(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "policy_engine.cli.main", "serve", "--address", "127.0.0.1:0",
        "--policies", str(EXAMPLE_POLICIES), "--redis-url", "redis://127.0.0.1:1/0", *args,
    ]  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    full_env = {**clean, "PYTHONPATH": str(REPO), "PDP_METRICS_ADDRESS": "", **env}
    return subprocess.run(
        command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({}, "cache.redis_signing_key"),
        ({"PDP_CACHE__REDIS_SIGNING_KEY": "s3cret"}, "cache.redis_signing_key"),
        ({"PDP_CACHE__REDIS_SIGNING_KEY_FILE": "/nonexistent/key"}, "redis_signing_key_file"),
    ],
)
def test_pdp_serve_refuses_the_redis_level_without_a_usable_key(
    tmp_path: Path, env: dict[str, str], setting: str
) -> None:
    for workers in ("1", "2"):
        done = _serve(tmp_path, "--workers", workers, env=env)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("pdp: error: setting ") and setting in done.stderr
        assert "Traceback" not in done.stderr
