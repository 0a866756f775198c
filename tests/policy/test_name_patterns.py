"""Names are matched whole: Python's `$` also matches before a final newline, so `.match`
with a `$`-anchored pattern would take 'acme' followed by a newline as a valid name. Every
check of a name against NAME_PATTERN uses fullmatch; an organization folder is one of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from policy_engine.policy import PolicyLoadError, load_policy_set

REPO = Path(__file__).resolve().parents[2]


def test_an_organization_folder_whose_name_ends_in_a_newline_is_refused(tmp_path: Path) -> None:
    shutil.copytree(REPO / "policies" / "acme", tmp_path / "acme\n")
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_set(tmp_path)
    assert any("organization folder name" in str(issue) for issue in caught.value.issues)


def test_no_name_check_uses_match_with_a_dollar_anchored_pattern() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in (REPO / "policy_engine").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "NAME_PATTERN.match(" in line or "TARGET_PATTERN.match(" in line
    ]
    assert offenders == []
