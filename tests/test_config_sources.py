"""What a config file may be, and what happens when the settings check itself fails.

Real files, FIFOs and processes: a FIFO or device as the config file is refused unread (it could
block or never end), and a settings-checking child that dies is an error, never a second read of
a source that may already be used up (a pipe) and so a start with default settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from policy_engine.config import MAX_CONFIG_BYTES, ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]
PDP = [sys.executable, "-m", "policy_engine.cli.main"]


def _pdp(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PDP, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("PDP_")},
    )


@pytest.mark.parametrize("command", [["config", "check"], ["serve", "--policies", "policies"]])
def test_a_fifo_as_config_file_is_refused_not_waited_on(tmp_path: Path, command: list[str]) -> None:
    fifo = tmp_path / "settings.fifo"
    os.mkfifo(fifo)
    run = _pdp(*command, "--config", str(fifo))
    assert run.returncode == 2
    assert f"config file {fifo}: not a regular file" in run.stderr + run.stdout


@pytest.mark.parametrize("command", [["config", "check"], ["serve", "--policies", "policies"]])
def test_an_endless_device_as_config_file_is_refused_unread(command: list[str]) -> None:
    run = _pdp(*command, "--config", "/dev/zero")
    assert run.returncode == 2
    assert "config file /dev/zero: not a regular file" in run.stderr + run.stdout


def test_a_config_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1) + "workers: 1\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_settings(big, environ={})


# The child is really forked and really killed (SIGKILL, as the OOM killer would): the parent must
# not fall back to reading the config again and starting with what it finds.
KILLED_CHILD = r"""
import os, signal, sys
from pathlib import Path
from policy_engine.config import ConfigError, load_settings_apart
os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGKILL))
try:
    settings = load_settings_apart(Path(sys.argv[1]))
except ConfigError as exc:
    print("ConfigError:", exc)
else:
    print("started with jwks_file", repr(settings.caller_auth.jwks_file))
"""


def test_a_settings_check_that_dies_is_an_error_not_a_start_with_other_settings(
    tmp_path: Path,
) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("caller_auth:\n  jwks_file: /etc/pdp/callers.jwks\n")
    run = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PDP_")},
             "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.stdout.strip() == (
        "ConfigError: settings could not be checked: the checking process was killed by signal 9"
    ), run.stdout + run.stderr


@pytest.mark.parametrize("value", ["0.001", "1e-300", "0.5"])
def test_a_resync_interval_under_a_second_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"reload\.resync_seconds"):
        load_settings(environ={"PDP_RELOAD__RESYNC_SECONDS": value})


@pytest.mark.parametrize("value", ["0", "1", "30"])
def test_a_resync_interval_of_zero_or_a_second_and_more_is_taken(value: str) -> None:
    settings = load_settings(environ={"PDP_RELOAD__RESYNC_SECONDS": value})
    assert settings.reload.resync_seconds == float(value)
