"""`pdp config check` and `pdp serve` agree: every setting the server refuses at startup is
refused by the check, with the same message; no error quotes a value that is or may hold a
secret; absurd sizes and durations are refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from policy_engine.config import (
    MAX_MILLIS,
    MAX_SECONDS,
    MAX_THREADS,
    MAX_WORKERS,
    ConfigError,
    load_settings,
)
from tests.scenarios import EXAMPLE_POLICIES

KEY = "k" * 64
# Serve on a free port without metrics, so that only the setting under test can fail.
QUIET = {"PDP_ADDRESS": "127.0.0.1:0", "PDP_METRICS_ADDRESS": ""}

# (case id, environment on top of QUIET, words every error line list must contain)
BAD_SETTINGS = [
    ("port-out-of-range", {"PDP_ADDRESS": "127.0.0.1:99999"}, "setting address:"),
    ("metrics-not-host-port", {"PDP_METRICS_ADDRESS": "nonsense"}, "setting metrics_address:"),
    ("health-without-port", {"PDP_HEALTH_ADDRESS": "localhost"}, "setting health_address:"),
    ("ipv6-without-brackets", {"PDP_ADDRESS": "::1:50051"}, "setting address:"),
    ("workers-on-port-0", {"PDP_WORKERS": "2"}, "explicit port"),
    ("workers-absurd", {"PDP_WORKERS": "100000"}, "setting workers:"),
    ("threads-absurd", {"PDP_THREADS": "100000000"}, "setting threads:"),
    ("ttl-absurd", {"PDP_CACHE__LOCAL_TTL_SECONDS": "1e300"}, "cache.local_ttl_seconds"),
    ("tls-cert-alone", {"PDP_TLS__CERT_FILE": "/etc/hostname"}, "tls.key_file"),
    ("redis-without-key", {"PDP_CACHE__REDIS_URL": "redis://127.0.0.1:1/0"}, "required"),
    ("redis-url-scheme", {"PDP_CACHE__REDIS_URL": "http://h/0"}, "setting cache.redis_url:"),
    ("quota-url-scheme", {"PDP_QUOTA__REDIS_URL": "http://h/0"}, "setting quota.redis_url:"),
    ("quota-prefix-brace", {"PDP_QUOTA__KEY_PREFIX": "pdp:{q}"}, "setting quota.key_prefix:"),
    (
        "redis-key-file-missing",
        {
            "PDP_CACHE__REDIS_URL": "redis://127.0.0.1:1/0",
            "PDP_CACHE__REDIS_SIGNING_KEY_FILE": "/nonexistent/key",
        },
        "cannot read /nonexistent/key",
    ),
    ("not-before-no-zone", {"PDP_BUNDLE__NOT_BEFORE": "2026-01-01T00:00:00"}, "ISO 8601"),
    (
        "audit-redis-sink-without-url",
        {"PDP_AUDIT__ENABLED": "true", "PDP_AUDIT__SINKS": "redis"},
        "setting audit.redis_url: required",
    ),
]


def _pdp(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`pdp ARGS` with only `env` among the PDP_* variables; a server that starts (the
    setting was accepted) is stopped by the timeout, which fails the test."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
        cwd=cwd,
    )


def _errors(stderr: str) -> list[str]:
    """The configuration errors in `stderr`, as listed (several) or as one `pdp: error:`."""
    lines = stderr.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("pdp: invalid configuration: "):
            return [item.strip() for item in lines[index + 1 :] if item.startswith("  ")]
        if line.startswith("pdp: error: "):
            return [line.removeprefix("pdp: error: ")]
    return []


@pytest.mark.parametrize(
    ("env", "expected"), [case[1:] for case in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS]
)
def test_config_check_refuses_what_serve_refuses_with_the_same_message(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    env = {**QUIET, **env}
    checked = _pdp("config", "check", env=env, cwd=tmp_path)
    try:
        served = _pdp("serve", "--policies", str(EXAMPLE_POLICIES), env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pdp serve started with {env}")
    assert checked.returncode == 2, checked.stdout
    assert served.returncode == 2, served.stderr
    errors = _errors(checked.stderr)
    assert errors, checked.stderr
    assert expected in "\n".join(errors)
    # serve stops at the first problem; the check lists them all, that one first.
    assert _errors(served.stderr) == errors[:1] or _errors(served.stderr) == errors


SECRET = "leakme-0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("env", "config"),
    [
        ({"PDP_CACHE": f'{{"redis_signing_key": "{SECRET}"}}'}, None),
        ({"PDP_CALLER_AUTH": f'{{"audience": "{SECRET}"}}'}, None),
        ({"PDP_CACHE__REDIS_URL": f"redis://pdp:{SECRET}@redis:99999/0"}, None),
        ({"PDP_AUDIT__REDIS_URL": f"http://pdp:{SECRET}@redis/0"}, None),
        ({"PDP_LOG_LEVEL": SECRET}, None),  # a long value of any setting is only described
        ({}, f"cache: 'redis_signing_key: {SECRET}'\n"),
        ({}, f"tls:\n  key_file:\n    - {SECRET}\n"),
        ({}, f"cache:\n  redis_verify_keys: [{SECRET}]\n"),
        (
            {
                "PDP_CACHE__REDIS_URL": "redis://h",
                "PDP_CACHE__REDIS_SIGNING_KEY": SECRET,
                "PDP_CACHE__REDIS_SIGNING_KEY_FILE": "/k",
            },
            None,
        ),
    ],
)
def test_errors_never_quote_a_value_that_may_hold_a_secret(
    tmp_path: Path, env: dict[str, str], config: str | None
) -> None:
    args = ["config", "check"]
    if config is not None:
        (tmp_path / "pdp.yaml").write_text(config)
        args += ["--config", str(tmp_path / "pdp.yaml")]
    done = _pdp(*args, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    assert _errors(done.stderr), done.stderr
    assert "leakme" not in done.stderr + done.stdout
    # Still says what was wrong with it: its kind and size.
    assert "got a " in done.stderr or "not both" in done.stderr


def test_short_values_of_plain_settings_are_still_quoted() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"PDP_CACHE__REDIS_MODE": "ring", "PDP_ADDRESS": "host:x"})
    assert "got 'ring'" in str(caught.value)
    assert "got 'host:x'" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "largest", "too_large"),
    [
        ("PDP_WORKERS", MAX_WORKERS, MAX_WORKERS + 1),
        ("PDP_THREADS", MAX_THREADS, MAX_THREADS + 1),
        ("PDP_CACHE__LOCAL_TTL_SECONDS", MAX_SECONDS, 1e300),
        ("PDP_CACHE__REDIS_TTL_SECONDS", MAX_SECONDS, MAX_SECONDS + 1),
        ("PDP_AUDIT__CHECKPOINT_SECONDS", MAX_SECONDS, MAX_SECONDS * 2),
        ("PDP_CACHE__REDIS_TIMEOUT_MS", MAX_MILLIS, MAX_MILLIS + 1),
        ("PDP_RELOAD__DEBOUNCE_MS", MAX_MILLIS, 10**12),
        ("PDP_LIMITS__MAX_MESSAGE_BYTES", 2**31 - 1, 2**31),
        ("PDP_CACHE__LOCAL_MAX_ENTRIES", 2**31 - 1, 10**18),
    ],
)
def test_absurd_sizes_and_durations_are_refused(
    name: str, largest: float, too_large: float
) -> None:
    load_settings(environ={name: str(largest)})
    with pytest.raises(ConfigError, match="less than or equal to"):
        load_settings(environ={name: str(too_large)})


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("PDP_ADDRESS", "[::1]:0", True),
        ("PDP_ADDRESS", "0.0.0.0:50051", True),
        ("PDP_ADDRESS", "localhost:0", True),
        ("PDP_ADDRESS", "unix:/tmp/pdp.sock", True),
        ("PDP_ADDRESS", ":50051", True),
        ("PDP_ADDRESS", "", False),
        ("PDP_ADDRESS", "host", False),
        ("PDP_ADDRESS", "host:", False),
        ("PDP_ADDRESS", "host:-1", False),
        ("PDP_ADDRESS", "host:65536", False),
        ("PDP_ADDRESS", "host: 1", False),
        ("PDP_METRICS_ADDRESS", "", True),
        ("PDP_METRICS_ADDRESS", ":9464", True),
        ("PDP_METRICS_ADDRESS", "unix:/tmp/m", False),
        ("PDP_HEALTH_ADDRESS", "127.0.0.1:0", True),
        ("PDP_HEALTH_ADDRESS", "127.0.0.1", False),
        ("PDP_CACHE__REDIS_URL", "rediss://u:p@h:6380/0", True),
        ("PDP_CACHE__REDIS_URL", "unix:///run/redis.sock", True),
        ("PDP_CACHE__REDIS_URL", "redis://[::1]:6379", True),
        ("PDP_CACHE__REDIS_URL", "redis://", False),
        ("PDP_CACHE__REDIS_URL", "redis://h:0", False),
        ("PDP_CACHE__REDIS_URL", "h:6379", False),
        ("PDP_AUDIT__REDIS_URL", "redis://h:6379/1", True),
        ("PDP_AUDIT__REDIS_URL", "redis://h:port/1", False),
        ("PDP_BUNDLE__NOT_BEFORE", "2026-11-30T12:00:00+00:00", True),
        ("PDP_BUNDLE__NOT_BEFORE", "2026-11-30T12:00:00Z", True),
        ("PDP_BUNDLE__NOT_BEFORE", "2026-11-30", False),
    ],
)
def test_addresses_urls_and_times_are_checked_on_load(
    name: str, value: str, accepted: bool
) -> None:
    environ = {name: value, "PDP_CACHE__REDIS_SIGNING_KEY": KEY}
    if accepted:
        load_settings(environ=environ)
    else:
        with pytest.raises(ConfigError, match=f"^setting {name[4:].lower().replace('__', '.')}:"):
            load_settings(environ=environ)


def test_sentinel_urls_list_several_hosts() -> None:
    settings = load_settings(
        environ={
            "PDP_CACHE__REDIS_MODE": "sentinel",
            "PDP_CACHE__REDIS_URL": "redis://s1:26379,s2:26379,[::1]:26380/0",
            "PDP_CACHE__REDIS_SIGNING_KEY": KEY,
        }
    )
    assert settings.cache.redis_mode == "sentinel"
    with pytest.raises(ConfigError, match="unix:// only with redis_mode standalone"):
        load_settings(
            environ={
                "PDP_CACHE__REDIS_MODE": "cluster",
                "PDP_CACHE__REDIS_URL": "unix:///run/redis.sock",
                "PDP_CACHE__REDIS_SIGNING_KEY": KEY,
            }
        )
