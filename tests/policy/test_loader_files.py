"""Which files make up a policy set: symlinked folders count, cycles and hidden files do not."""

from __future__ import annotations

import os
from pathlib import Path

from policy_engine.policy import load_policy_set
from policy_engine.policy.loader import policy_files
from tests.policy_builder import allow_all, write_organization


def test_symlinked_folders_are_followed_and_cycles_are_safe(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write_organization(real, "acme", policies=[allow_all("org")])
    root = tmp_path / "policies"
    root.mkdir()
    os.symlink(real / "acme", root / "acme")  # how Kubernetes projects volume items
    os.symlink(root, real / "acme" / "loop")  # a cycle must not hang the walk
    (real / "acme" / ".editor-backup.yaml").write_text("kind: Nonsense\n")
    files = policy_files(root)
    assert [f.name for f in files] == ["organization.yaml", "policy-000.yaml"]
    assert "acme" in load_policy_set(root).organizations
