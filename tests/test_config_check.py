"""`pdp config check`, run as operators run it: the effective settings with secrets masked and
exit 0, or every error and exit 2; the same sources and precedence as `pdp serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SIGNING_KEY = "k" * 40
VERIFY_KEYS = "v" * 40 + "," + "w" * 40


def _pdp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def test_prints_the_effective_settings_from_every_source_with_secrets_masked(
    tmp_path: Path,
) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text(
        "workers: 2\nthreads: 2\nlog_format: json\n"
        f"cache:\n  redis_signing_key: {SIGNING_KEY}\n  redis_verify_keys: '{VERIFY_KEYS}'\n"
        "audit:\n  redis_url: redis://audit:hunter2@audit-redis:6379/1\n"
    )
    done = _pdp(
        "config",
        "check",
        "--config",
        str(config),
        "--threads",
        "8",
        "--redis-url",
        "rediss://pdp:s3cr3t@redis:6380/0",
        env={"PDP_WORKERS": "3", "PDP_LIMITS__MAX_BATCH_SIZE": "50"},
    )
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert (shown["workers"], shown["threads"], shown["log_format"]) == (3, 8, "json")
    assert shown["limits"]["max_batch_size"] == 50
    assert shown["policy_dir"] == "policies"
    assert shown["cache"]["redis_url"] == "rediss://pdp:***@redis:6380/0"
    assert shown["cache"]["redis_signing_key"] == "***"
    assert shown["cache"]["redis_verify_keys"] == "***"
    assert shown["audit"]["redis_url"] == "redis://audit:***@audit-redis:6379/1"
    for secret in (SIGNING_KEY, "v" * 40, "hunter2", "s3cr3t"):
        assert secret not in done.stdout


def test_json_output_is_the_same_settings() -> None:
    as_yaml = _pdp("config", "check")
    as_json = _pdp("config", "check", "--format", "json")
    assert as_yaml.returncode == as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == yaml.safe_load(as_yaml.stdout)
    assert json.loads(as_json.stdout)["cache"]["redis_signing_key"] == ""  # unset: nothing to hide


def test_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("audit:\n  when_full: wait\n  sinks: file,kafka\nbogus: 1\n")
    done = _pdp(
        "config",
        "check",
        "--config",
        str(config),
        "--workers",
        "0",
        env={"PDP_CACHE__REDIS_MODE": "ring", "PDP_LOG_FORMAT": "xml"},
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "pdp: invalid configuration: 6 error(s)"
    for expected in (
        "setting workers: Input should be greater than or equal to 1, got 0 (from --workers)",
        "setting log_format: Input should be 'text' or 'json', got 'xml' (from PDP_LOG_FORMAT)",
        "setting cache.redis_mode: Input should be 'standalone', 'sentinel' or 'cluster', "
        "got 'ring' (from PDP_CACHE__REDIS_MODE)",
        f"setting audit.when_full: Input should be 'block' or 'drop', got 'wait' (from {config})",
        "setting audit.sinks: unknown sink(s) kafka; choose from file, redis, stdout, "
        f"got 'file,kafka' (from {config})",
        f"setting bogus: unknown setting (from {config})",
    ):
        assert f"  {expected}" in lines, done.stderr


def test_a_file_that_cannot_be_read_as_one_mapping_is_an_error_with_its_line(
    tmp_path: Path,
) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("workers: 1\nworkers: 2\n")
    done = _pdp("config", "check", "--config", str(config))
    assert done.returncode == 2
    assert "pdp.yaml:2: duplicate key 'workers' at lines 1 and 2" in done.stderr


def test_pdp_serve_refuses_the_same_settings_before_serving(tmp_path: Path) -> None:
    env = {"PDP_AUDIT__WHEN_FULL": "wait", "PDP_METRICS_ADDRESS": ""}
    done = _pdp("serve", "--policies", str(tmp_path), env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("pdp: error: setting audit.when_full: Input should be 'block'")
    assert "Traceback" not in done.stderr
    done = _pdp("serve", "--policies", str(tmp_path), "--threads", "0", env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "pdp: invalid configuration: 2 error(s)",
        "  setting threads: Input should be greater than or equal to 1, got 0 (from --threads)",
        "  setting audit.when_full: Input should be 'block' or 'drop', got 'wait' "
        "(from PDP_AUDIT__WHEN_FULL)",
    ]


def test_an_unusable_caller_jwks_file_is_refused_by_the_check_as_by_serve(tmp_path: Path) -> None:
    """`pdp config check` reads the caller JWKS file the server's bearer check needs: a missing
    or malformed one was reported only when `pdp serve` built its interceptor."""
    malformed = tmp_path / "callers.jwks"
    malformed.write_text('{"keys": 5}')
    auth = {"PDP_CALLER_AUTH__AUDIENCE": "pdp", "PDP_CALLER_AUTH__ISSUER": "https://idp.test"}
    for path, what in (
        (tmp_path / "missing.jwks", "cannot read JWKS file"),
        (malformed, "invalid JWKS"),
    ):
        env = {**auth, "PDP_CALLER_AUTH__JWKS_FILE": str(path), "PDP_METRICS_ADDRESS": ""}
        done = _pdp("config", "check", "--policies", str(tmp_path), env=env)
        assert done.returncode == 2, done.stdout
        assert f"  setting caller_auth.jwks_file: {what}" in done.stderr
        assert "Traceback" not in done.stderr
