"""The `pdp` command as operators run it: a real subprocess, real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policy_engine.cli.main import main
from tests.scenarios import EXAMPLE_POLICIES, SCENARIOS, Scenario, pdp, token_for


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


# flags -> (the flag and request path the error names, words of the message)
REFUSED_FLAGS: dict[str, tuple[list[str], str, str]] = {
    "2^53+1": (
        ["--subject-attr", "account=9007199254740993"],
        "--subject-attr: subject.attributes.account",
        "would arrive as 9007199254740992.0",
    ),
    "-(2^53+1) nested in context": (
        ["--context", 'ticket=[1, {"n": -9007199254740993}]'],
        "--context: context.attributes.ticket[1].n",
        "beyond +-(2^53 - 1)",
    ),
    "2^64 in a list": (
        ["--application-attr", "ids=[18446744073709551616]"],
        "--application-attr: application.attributes.ids[0]",
        "1.8446744073709552e+19",
    ),
    "NaN": (["--subject-attr", "f=NaN"], "subject.attributes.f", "not a finite number"),
    "Infinity": (["--subject-attr", "f=Infinity"], "subject.attributes.f", "not a finite"),
    "1e400": (["--integration-attr", "f=-1e400"], "integration.attributes.f", "-inf"),
    "lone surrogate in JSON": (
        ["--subject-attr", 's="\\ud800"'],
        "subject.attributes.s",
        "lone surrogate",
    ),
    "undecodable argv": (["--subject", "\udcffalice"], "--subject: subject.id", "surrogate"),
    "duplicate JSON key": (
        ["--subject-attr", 'm={"a": 1, "a": 2}'],
        "--subject-attr m",
        "the key 'a' appears twice",
    ),
    "KEY given twice": (
        ["--subject-attr", "a=1", "--subject-attr", "a=2"],
        "--subject-attr a",
        "given twice",
    ),
    "deeper than the builder's bound": (
        ["--subject-attr", "d=" + "[" * 40 + "]" * 40],
        "subject.attributes.d[0][0]",
        "nested deeper than 30 levels",
    ),
    "deeper than JSON parses": (
        ["--subject-attr", "d=" + "[" * 100_000 + "]" * 100_000],
        "--subject-attr d",
        "nested too deeply",
    ),
    "5000 digits": (["--subject-attr", "n=1" + "0" * 4999], "--subject-attr n", "digits"),
    "time beyond year 9999": (
        ["--context", "time=9999-12-31T23:00:00-02:00"],
        "--context: context.time",
        "outside years 1-9999",
    ),
}


@pytest.mark.parametrize("name", REFUSED_FLAGS)
def test_eval_refuses_values_the_wire_cannot_carry(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, where, words = REFUSED_FLAGS[name]
    required = {
        "--policies": str(EXAMPLE_POLICIES),
        "--org": "acme",
        "--subject": "alice",
        "--application": "pr-reviewer",
        "--integration": "github",
        "--scope": "repo",
    }
    argv = ["eval", *flags, "--json"]
    for flag, value in required.items():
        if flag not in flags:
            argv += [flag, value]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("pdp: error: ") and err.count("\n") == 1
    assert where in err and words in err
