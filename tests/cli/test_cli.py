"""The `pdp` command as operators run it: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scenarios import EXAMPLE_POLICIES, SCENARIOS, Scenario, token_for


def pdp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def eval_args(scenario: Scenario) -> list[str]:
    args = [
        "eval",
        "--policies",
        str(EXAMPLE_POLICIES),
        "--org",
        scenario.organization,
        "--subject",
        scenario.subject,
        "--subject-kind",
        scenario.subject_kind,
        "--application",
        scenario.application,
        "--integration",
        scenario.integration,
        "--scope",
        scenario.scope,
        "--context",
        f"connection={scenario.connection}",
    ]
    for key, value in scenario.subject_attributes.items():
        args += ["--subject-attr", f"{key}={json.dumps(value)}"]
    if scenario.token:
        args += ["--token", token_for(scenario)]
    return args


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_eval_json_answers_every_scenario(scenario: Scenario) -> None:
    result = pdp(*eval_args(scenario), "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["decision"] == scenario.decision
    if scenario.code:
        assert output["reasons"][0]["code"] == scenario.code
        assert output["reasons"][0]["layer"] == scenario.layer
        assert {"code", "layer", "policy", "rule", "message"} <= set(output["reasons"][0])
    else:
        assert output["reasons"] == []


def test_eval_human_output_with_explain() -> None:
    result = pdp(*eval_args(SCENARIOS[2]), "--explain")  # admin:org, denied by alice's policy
    assert result.returncode == 0, result.stderr
    assert "decision: DENY" in result.stdout
    assert "kontext_policy_denied" in result.stdout and "layer=user" in result.stdout
    assert "alice-personal/never-org-admin [deny] matched" in result.stdout
    for layer in ("org", "user", "application"):
        assert f"  {layer}" in result.stdout


def test_eval_json_values_become_lists() -> None:
    result = pdp(
        "eval",
        "--policies",
        str(EXAMPLE_POLICIES),
        "--org",
        "acme",
        "--subject",
        "alice",
        "--application",
        "pr-reviewer",
        "--integration",
        "github",
        "--scope",
        "repo",
        "--subject-attr",
        'groups=["engineering"]',
        "--json",
        "--explain",
    )
    output = json.loads(result.stdout)
    assert output["decision"] == "ALLOW"
    assert [layer["layer"] for layer in output["explain"]] == ["org", "user", "application"]


def test_eval_bad_flag_exits_non_zero() -> None:
    result = pdp(
        "eval",
        "--policies",
        str(EXAMPLE_POLICIES),
        "--org",
        "acme",
        "--subject",
        "a",
        "--application",
        "pr-reviewer",
        "--integration",
        "github",
        "--scope",
        "repo",
        "--subject-attr",
        "no-equals-sign",
    )
    assert result.returncode == 2
    assert "KEY=VALUE" in result.stderr


def test_validate_example_policies() -> None:
    result = pdp("validate", str(EXAMPLE_POLICIES))
    assert result.returncode == 0, result.stderr
    assert "acme" in result.stdout and "globex" in result.stdout


def test_validate_lists_every_error_with_file_and_line(tmp_path: Path) -> None:
    org = tmp_path / "acme"
    org.mkdir()
    (org / "organization.yaml").write_text(
        "kind: Organization\ncatalog:\n  integrations: [github]\n  applications: [app]\n"
    )
    (org / "broken.yaml").write_text(
        "kind: Policy\nname: broken\nlayer: org\nrules:\n"
        "  - name: typo\n    effect: allow\n    condition: sbject.id == 'x'\n"
        "  - name: bad-effect\n    effect: perhaps\n"
    )
    (org / "syntax.yaml").write_text("kind: Policy\nname: [unclosed\n")
    result = pdp("validate", str(tmp_path))
    assert result.returncode == 1
    assert f"{org / 'broken.yaml'}:7:" in result.stderr  # the condition's line
    assert "sbject" in result.stderr and "typo" in result.stderr
    assert f"{org / 'broken.yaml'}:9:" in result.stderr  # effect: perhaps
    assert f"{org / 'syntax.yaml'}:" in result.stderr


def test_eval_with_invalid_policies_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "x.yaml").write_text("kind: Nonsense\n")
    result = pdp(
        "eval",
        "--policies",
        str(tmp_path),
        "--org",
        "acme",
        "--subject",
        "a",
        "--application",
        "b",
        "--integration",
        "c",
        "--scope",
        "d",
    )
    assert result.returncode == 1
    assert "kind" in result.stderr
