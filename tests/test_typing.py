"""mypy over policy_engine/ with the project's settings ([tool.mypy] in pyproject.toml), so a
type regression fails `make test` as well as `make lint` (tests/packaging checks that the
wheel ships `py.typed`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_error_in_the_package() -> None:
    pytest.importorskip("mypy", reason="mypy is in the dev extra (make install)")
    done = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The settings name the package: a bare `mypy` that checked nothing would also exit 0.
    assert "Success: no issues found in" in done.stdout, done.stdout
    checked = int(done.stdout.split(" in ")[1].split()[0])
    assert checked > 100, done.stdout
