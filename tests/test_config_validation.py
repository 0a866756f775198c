"""Every setting is validated when settings are loaded, whichever source gave it (config file,
`PDP_*` environment, flags): the error names the setting and where its value came from, and
lists every bad setting at once, one per line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from policy_engine.config import (
    CacheSettings,
    ConfigError,
    RequestLimits,
    Settings,
    load_settings,
    mask_url,
)

# (dotted setting, bad value as an operator would write it, words the error must contain)
BAD = [
    # choices
    ("cache.redis_mode", "ring", "'standalone', 'sentinel' or 'cluster'"),
    ("audit.when_full", "wait", "'block' or 'drop'"),
    ("audit.sinks", "file,kafka", "unknown sink(s) kafka"),
    ("audit.sinks", " , ", "name at least one of file, redis, stdout"),
    ("log_level", "LOUD", "'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
    ("log_format", "xml", "'text' or 'json'"),
    # bounds
    ("limits.max_batch_size", "0", "greater than or equal to 1"),
    ("limits.max_message_bytes", "-1", "greater than or equal to 1"),
    ("workers", "0", "greater than or equal to 1"),
    ("threads", "0", "greater than or equal to 1"),
    ("cache.redis_timeout_ms", "0", "greater than 0"),
    ("cache.local_ttl_seconds", "-1", "greater than 0"),
    ("cache.local_ttl_seconds", "nan", "greater than 0"),
    ("cache.redis_ttl_seconds", "inf", "finite"),
    ("cache.local_max_entries", "-1", "greater than or equal to 0"),
    ("audit.queue_size", "0", "greater than or equal to 1"),
    ("reload.debounce_ms", "-5", "greater than or equal to 0"),
    ("policy_limits.max_set_bytes", "0", "greater than or equal to 1"),
    # types
    ("workers", "many", "valid integer"),
    ("limits.max_id_length", "1.5", "valid integer"),
    ("cache.enabled", "maybe", "expected one of 0, 1, false, no, off, on, true, yes"),
    ("reload.watch", "2", "expected one of"),
    ("cache.breaker_reset_seconds", "soon", "valid number"),
]

UNKNOWN = ["bogus", "cache.bogus", "audit.file_pathh"]


def _nested(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _yaml(path: str, value: str) -> str:
    *groups, name = path.split(".")
    lines = [f"{'  ' * depth}{group}:" for depth, group in enumerate(groups)]
    lines.append(f"{'  ' * len(groups)}{name}: '{value}'")
    return "\n".join(lines) + "\n"


def _env_name(path: str) -> str:
    return "PDP_" + path.replace(".", "__").upper()


def _error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)
    return str(caught.value)


@pytest.mark.parametrize(("path", "value", "expected"), BAD)
def test_a_bad_value_from_the_environment_is_named_with_its_variable(
    path: str, value: str, expected: str
) -> None:
    message = _error(environ={_env_name(path): value})
    assert message.startswith(f"setting {path}: ")
    assert expected in message
    assert message.endswith(f"(from {_env_name(path)})")
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(("path", "value", "expected"), BAD)
def test_a_bad_value_from_the_config_file_is_named_with_the_file(
    tmp_path: Path, path: str, value: str, expected: str
) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text(_yaml(path, value))
    message = _error(config_file=config, environ={})
    assert message.startswith(f"setting {path}: ")
    assert expected in message
    assert message.endswith(f"(from {config})")


@pytest.mark.parametrize(("path", "value", "expected"), BAD)
def test_a_bad_value_from_a_flag_is_named_as_such(path: str, value: str, expected: str) -> None:
    message = _error(environ={}, overrides=_nested(path, value))
    assert message.startswith(f"setting {path}: ")
    assert expected in message
    assert message.endswith("(from the command line)")


@pytest.mark.parametrize("path", UNKNOWN)
def test_an_unknown_setting_is_refused_from_every_source(tmp_path: Path, path: str) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text(_yaml(path, "1"))
    assert _error(config_file=config, environ={}) == (
        f"setting {path}: unknown setting (from {config})"
    )
    assert _error(environ={_env_name(path): "1"}) == (
        f"setting {path}: unknown setting (from {_env_name(path)})"
    )
    assert _error(environ={}, overrides=_nested(path, "1")) == (
        f"setting {path}: unknown setting (from the command line)"
    )


def test_a_variable_below_a_plain_setting_is_unknown() -> None:
    assert _error(environ={"PDP_ADDRESS__PORT": "1"}) == (
        "setting address.port: unknown setting (from PDP_ADDRESS__PORT)"
    )


def test_a_group_given_a_plain_value_names_the_group(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("limits: 5\n")
    message = _error(config_file=config, environ={})
    assert message.startswith("setting limits: ")
    assert "dictionary" in message
    # JSON in a variable is not a way to set a group either (it never was).
    assert _error(environ={"PDP_LIMITS": '{"max_batch_size": 3}'}).startswith("setting limits: ")


def test_every_bad_setting_is_listed_one_per_line(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("audit:\n  when_full: wait\nnonsense: 1\n")
    message = _error(
        config_file=config,
        environ={"PDP_CACHE__REDIS_MODE": "ring", "PDP_NOPE": "x", "HOME": "/root"},
        overrides={"threads": 0, "workers": None},
    )
    lines = message.splitlines()
    assert len(lines) == 5, message
    for name in ("nope", "threads", "nonsense", "cache.redis_mode", "audit.when_full"):
        assert sum(line.startswith(f"setting {name}: ") for line in lines) == 1, message


def test_precedence_is_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("threads: 2\nworkers: 2\ncache:\n  redis_pool_size: 2\n  key_prefix: f\n")
    settings = load_settings(
        config,
        environ={"PDP_WORKERS": "3", "PDP_THREADS": "3", "PDP_CACHE__REDIS_POOL_SIZE": "3"},
        overrides={"threads": 4, "workers": None},
    )
    assert (settings.threads, settings.workers) == (4, 3)
    assert settings.cache.redis_pool_size == 3
    assert settings.cache.key_prefix == "f"  # the rest of the file's group is kept
    # A bad value that a higher source replaces is not an error.
    config.write_text("workers: 0\n")
    assert load_settings(config, environ={"PDP_WORKERS": "2"}).workers == 2


def test_accepted_values_are_those_accepted_before() -> None:
    settings = load_settings(
        environ={
            "PDP_CACHE__REDIS_MODE": " Cluster ",
            "PDP_LOG_LEVEL": "debug",
            "PDP_CACHE__ENABLED": "Off",
            "PDP_RELOAD__WATCH": "yes",
            "PDP_AUDIT__SINKS": "file, STDOUT",
            "PDP_AUDIT__WHEN_FULL": "DROP",
            "PDP_CACHE__LOCAL_MAX_ENTRIES": "0",
            "PDP_AUDIT__CHECKPOINT_SECONDS": "0",
            "PDP_AUDIT__FILE_PATH": "/var/log/pdp/{worker}.jsonl",
            "PDP_CACHE__KEY_PREFIX": "0123",
            "pdp_workers": "9",  # the prefix is matched as written, as before
        }
    )
    assert settings.cache.redis_mode == "cluster"
    assert settings.log_level == "DEBUG"
    assert settings.cache.enabled is False
    assert settings.reload.watch is True
    assert settings.audit.sinks == "file, STDOUT"
    assert settings.audit.when_full == "drop"
    assert settings.cache.local_max_entries == 0
    assert settings.audit.checkpoint_seconds == 0.0
    assert settings.audit.file_path == Path("/var/log/pdp/{worker}.jsonl")
    assert settings.cache.key_prefix == "0123"
    assert settings.workers == 1
    assert load_settings(environ={}) == Settings()


def test_the_settings_stay_plain_frozen_dataclasses() -> None:
    settings = load_settings(environ={"PDP_LIMITS__MAX_BATCH_SIZE": "7"})
    assert type(settings) is Settings and type(settings.limits) is RequestLimits
    assert not hasattr(settings.limits, "__dict__")  # slots: a plain attribute read
    with pytest.raises(AttributeError):
        settings.limits.max_batch_size = 8  # type: ignore[misc]
    changed = settings.replace(cache=CacheSettings(redis_pool_size=2))
    assert changed.cache.redis_pool_size == 2 and changed.limits.max_batch_size == 7


def test_secrets_are_not_echoed_in_errors(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("cache:\n  redis_signing_key:\n    s3cr3t-value: 1\n")
    message = _error(config_file=config, environ={})
    assert message.startswith("setting cache.redis_signing_key: ")
    assert "s3cr3t" not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
        ("rediss://:pw@h/0", "rediss://:***@h/0"),
        ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("", ""),
    ],
)
def test_passwords_in_redis_urls_are_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_the_server_does_not_import_pydantic_until_settings_are_loaded() -> None:
    # Spawned workers unpickle their settings without it (about 8 MB of RSS each).
    code = (
        "import sys, policy_engine.server.app, policy_engine.cli.main\n"
        "assert not any(m.startswith('pydantic') for m in sys.modules), 'imported'\n"
        "from policy_engine.config import load_settings\n"
        "load_settings(environ={})\n"
        "assert 'pydantic_settings' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
