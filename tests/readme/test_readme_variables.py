"""Every variable README.md names takes effect.

* `PDP_*` names (anywhere in README): each maps, through policy_engine.config, to a real
  setting that reads it: a value given in it is either the loaded setting's value or refused
  in that setting's name (never "unknown setting", never ignored).
* The settings table: each row's environment names are exactly its settings' names
  (`..._SUFFIX` abbreviations resolved against the row's settings, in order).
* `make` variables: every `NAME=` given after `make TARGET` in README, and every backticked
  `NAME` the Makefile defines with `?=`: `make -n NAME=<sentinel> TARGET` (README's target, or
  any README target) prints the sentinel, i.e. the recipe uses it. `make -n` runs nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from policy_engine.config import ConfigError, Settings, load_settings, settings_dict
from tests.readme.readme import README, REPO

TEXT = README.read_text()
MAKEFILE = (REPO / "Makefile").read_text()
PDP_NAME = re.compile(r"\bPDP_[A-Z0-9_]*[A-Z0-9]")
MAKE_CALL = re.compile(r"\bmake ([a-z][a-z-]*)((?: [A-Z][A-Z0-9_]*=\S*)+)")
MAKE_DEFINED = re.compile(r"^([A-Z][A-Z0-9_]*)\s*\?=", re.MULTILINE)
README_TARGETS = sorted(
    {t for t in re.findall(r"\bmake ([a-z][a-z-]*)", TEXT)}
    & set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, re.MULTILINE))
)
VALUE = "readme-probe-value"


def _setting_paths(tree: dict[str, object], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for name, value in tree.items():
        if isinstance(value, dict):
            paths |= _setting_paths(value, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


SETTINGS = _setting_paths(settings_dict(Settings()))


def _env_name(path: str) -> str:
    return "PDP_" + path.upper().replace(".", "__")


def _value(settings: Settings, path: str) -> object:
    value: object = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(set(PDP_NAME.findall(TEXT))))
def test_pdp_variable_is_a_setting_that_reads_it(name: str) -> None:
    path = name.removeprefix("PDP_").lower().replace("__", ".")
    assert path in SETTINGS, f"README names {name}, but there is no setting {path}"
    try:
        loaded = load_settings(environ={name: VALUE})
    except ConfigError as exc:
        message = str(exc)
        assert "unknown setting" not in message, message
        assert f"(from {name})" in message or path in message, message
    else:
        assert str(_value(loaded, path)) == VALUE, f"{name}={VALUE} was not read"


def _table_rows() -> list[tuple[list[str], list[str]]]:
    rows = []
    for line in TEXT.splitlines():
        cells = line.split("|")
        if len(cells) < 4 or "PDP_" not in cells[2]:
            continue
        settings = re.findall(r"`([a-z_.]+)`", cells[1])
        envs = re.findall(r"`((?:PDP_|\.\.\._)[A-Z0-9_]+)`", cells[2])
        rows.append((settings, envs))
    return rows


def test_settings_table_names_each_settings_own_variable() -> None:
    rows = _table_rows()
    assert len(rows) > 40
    wrong = []
    for settings, envs in rows:
        assert len(settings) == len(envs), (settings, envs)
        for setting, env in zip(settings, envs, strict=True):
            assert setting in SETTINGS, f"the table names no setting {setting}"
            full = _env_name(setting)
            if env != full and not (env.startswith("..._") and full.endswith(env[3:])):
                wrong.append((setting, env))
    assert not wrong, wrong


def _make_variables() -> dict[str, set[str]]:
    """{variable: the targets README gives it with (empty: named without one)}."""
    found: dict[str, set[str]] = {}
    for target, assignments in MAKE_CALL.findall(TEXT):
        for name in re.findall(r"([A-Z][A-Z0-9_]*)=", assignments):
            found.setdefault(name, set()).add(target)
    for name in MAKE_DEFINED.findall(MAKEFILE):
        if re.search(rf"`{name}[`=]", TEXT):
            found.setdefault(name, set())
    return found


MAKE_VARIABLES = _make_variables()


def _make_plan(target: str, *assignments: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PDP_", "MAKE"))}
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", target, *assignments],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_readme_names_the_make_variables_it_documents() -> None:
    assert {"REDIS_URL", "SCALE_ARGS", "FUZZ_SECONDS", "BASELINE"} <= set(MAKE_VARIABLES)


@pytest.mark.parametrize("name", sorted(MAKE_VARIABLES))
def test_make_variable_reaches_the_recipe(name: str) -> None:
    sentinel = f"readme-{name.lower()}-probe"
    targets = sorted(MAKE_VARIABLES[name]) or README_TARGETS
    used = [t for t in targets if sentinel in _make_plan(t, f"{name}={sentinel}")]
    assert used, f"make {name}={sentinel} changes none of {targets}"


def test_make_bench_baseline_empty_runs_this_checkout_alone() -> None:
    assert "--baseline" in _make_plan("bench")
    assert "--baseline" not in _make_plan("bench", "BASELINE=")


def test_make_run_serves_on_pdp_address_from_the_environment() -> None:
    plan = _make_plan("run", env={"PDP_ADDRESS": "127.0.0.1:1234"})
    assert "--address 127.0.0.1:1234" in plan


def test_make_run_with_redis_makes_a_key_once_unless_one_is_given(tmp_path: Path) -> None:
    plan = _make_plan("run", "REDIS_URL=redis://127.0.0.1:1/0")
    assert "PDP_CACHE__REDIS_SIGNING_KEY_FILE=.pdp/cache-signing.key" in plan
    given = tmp_path / "cache.key"
    for name, value in [
        ("PDP_CACHE__REDIS_SIGNING_KEY_FILE", str(given)),
        ("PDP_CACHE__REDIS_SIGNING_KEY", "k" * 64),
    ]:
        plan = _make_plan("run", "REDIS_URL=redis://127.0.0.1:1/0", env={name: value})
        assert ".pdp/cache-signing.key" not in plan, (name, plan)
        assert "--redis-url redis://127.0.0.1:1/0" in plan
