"""`pdp bundle keygen`: the key pair README's Signed policies section signs and verifies with."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pdp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keygen_pair_signs_and_verifies_a_policy_directory(tmp_path: Path) -> None:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    made = _pdp("bundle", "keygen", "--out-private", "b.key", "--out-public", "b.pub", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE((tmp_path / "b.key").stat().st_mode) == 0o600
    signed = _pdp("bundle", "sign", "policies", "--key", "b.key", cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    verified = _pdp("bundle", "verify", "policies", "--public-key", "b.pub", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert "exactly as signed" in verified.stdout


def test_keygen_never_overwrites_a_key_unasked(tmp_path: Path) -> None:
    (tmp_path / "b.key").write_text("keep me")
    again = _pdp(
        "bundle", "keygen", "--out-private", "b.key", "--out-public", "b.pub", cwd=tmp_path
    )
    assert again.returncode == 2
    assert "exists" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "b.key").read_text() == "keep me"
