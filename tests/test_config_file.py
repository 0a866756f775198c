"""The server's config file is read as strictly as policy files: nothing in it is dropped or
overridden silently (a duplicate `bundle:` block would otherwise turn signed policies off)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policy_engine.config import ConfigError, load_settings


def _settings(tmp_path: Path, text: str):
    path = tmp_path / "pdp.yaml"
    path.write_text(text)
    return load_settings(path, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The later, empty block would have switched signature checks off.
        (
            "bundle:\n  public_key_file: /etc/pdp/bundle.pem\nbundle:\n  public_key_file: ''\n",
            "pdp.yaml:3: duplicate key 'bundle' at lines 1 and 3",
        ),
        ("cache:\n  enabled: true\n  enabled: false\n", "pdp.yaml:3: duplicate key 'enabled'"),
        ("a: &x {}\nb: *x\n", "pdp.yaml:1: anchors (&x) are not allowed in config files"),
        ("cache: {<<: {enabled: false}}\n", "merge keys (<<) are not allowed in config files"),
        ("address: !!str 1\n", "tags (tag:yaml.org,2002:str) are not allowed in config files"),
        ("address: a\n---\naddress: b\n", "expected one YAML document"),
        ("- address\n", "expected a mapping at the top level"),
        ("cache: [\n", "pdp.yaml:2:"),
    ],
)
def test_a_config_file_that_could_be_read_two_ways_is_refused(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, text)
    assert expected in str(caught.value)


def test_values_are_typed_by_their_setting_as_environment_values_are(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        "cache:\n  local_ttl_seconds: 2.5\n  enabled: yes\n  key_prefix: 0123\n"
        "reload:\n  debounce_ms: 100\n",
    )
    assert settings.cache.local_ttl_seconds == 2.5
    assert settings.cache.enabled is True
    assert settings.cache.key_prefix == "0123"  # text as written, not the octal 83
    assert settings.reload.debounce_ms == 100
    assert _settings(tmp_path, "").address == load_settings(environ={}).address


def test_pdp_serve_refuses_such_a_file_with_its_line_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("workers: 1\nworkers: 2\n")
    done = subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "pdp.yaml:2: duplicate key 'workers' at lines 1 and 2" in done.stderr
    assert "Traceback" not in done.stderr
