"""Quotas in `pdp test`: a suite's cases share one in-process counter whose clock is each
case's time; `quota_used` tops a bucket up first, so a suite shows a quota exhausted and, at a
time in the next window, freed. Bad `quota_used` values are refused with file:line (parser
and editor schema agree), or fail the case naming the quota."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from policy_engine.cli.main import main
from policy_engine.testing.cli import EXIT_FAILED, EXIT_INVALID, EXIT_PASSED
from tests.testing.test_suite_schema import SUITE, _errors, _parses

ORGANIZATION = """\
kind: Organization
defaults: {org: deny, user: allow, application: allow}
catalog:
  integrations: [github, slack]
  applications: [bot]
"""
POLICY = """\
kind: Policy
name: everyone
layer: org
rules:
  - name: may
    effect: allow
"""
QUOTAS = """\
kind: Quota
name: hourly
target: {integrations: [github]}
limit: 3
window: 1h
per: [subject]
---
kind: Quota
name: daily-sliding
target: {integrations: [slack]}
limit: 2
window: 1d
algorithm: sliding
"""


def _case(name: str, subject: str = "alice", integration: str = "github", **extra: str) -> str:
    lines = [
        f"  - name: {name}",
        f"    subject: {subject}",
        "    application: bot",
        f"    integration: {integration}",
        "    scope: repo",
    ]
    lines += [f"    {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], cases: str) -> tuple[int, str]:
    folder = tmp_path / "acme"
    (folder / "tests").mkdir(parents=True)
    (folder / "organization.yaml").write_text(ORGANIZATION)
    (folder / "policy.yaml").write_text(POLICY)
    (folder / "quotas.yaml").write_text(QUOTAS)
    suite = 'kind: TestSuite\nname: quotas\ntime: "2026-03-02T15:20:00Z"\ncases:\n' + cases
    (folder / "tests" / "quotas.test.yaml").write_text(suite)
    code = main(["test", str(tmp_path)])
    out = capsys.readouterr()
    return code, out.out + out.err


ALLOW = "{decision: allow}"
LIMITED = "{decision: deny, code: kontext_rate_limited, layer: system, policy: hourly}"


def test_a_quota_is_exhausted_then_freed_by_the_next_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = (
        _case("first", expect=ALLOW)
        + _case("used-up", quota_used="{hourly: 3}", expect=LIMITED)
        + _case("still-used-up", time='"2026-03-02T15:59:59Z"', expect=LIMITED)
        + _case("bob-counts-apart", subject="bob", expect=ALLOW)
        + _case("next-hour", time='"2026-03-02T16:00:00Z"', expect=ALLOW)
    )
    code, output = _run(tmp_path, capsys, cases)
    assert code == EXIT_PASSED, output


def test_the_suite_counts_its_own_allows_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No quota_used: the cases' own ALLOWs fill the quota (limit 3), at the case's clock."""
    cases = "".join(_case(f"allowed-{n}", expect=ALLOW) for n in range(3))
    cases += _case("fourth", expect=LIMITED)
    code, output = _run(tmp_path, capsys, cases)
    assert code == EXIT_PASSED, output


def test_a_sliding_window_frees_a_window_after_each_allow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limited = "{decision: deny, code: kontext_rate_limited, policy: daily-sliding}"
    cases = (
        _case("at-15", integration="slack", expect=ALLOW)
        + _case("at-18", integration="slack", time='"2026-03-02T18:00:00Z"', expect=ALLOW)
        + _case("full", integration="slack", time='"2026-03-03T15:00:00Z"', expect=limited)
        + _case("first-aged-out", integration="slack", time='"2026-03-03T15:20:00Z"', expect=ALLOW)
    )
    code, output = _run(tmp_path, capsys, cases)
    assert code == EXIT_PASSED, output


def test_the_message_names_the_quota_and_when_it_frees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = _case("used-up", quota_used="{hourly: 3}", expect=ALLOW)
    code, output = _run(tmp_path, capsys, cases)
    assert code == EXIT_FAILED
    assert "kontext_rate_limited" in output
    assert "quota hourly allows 3 per 1 h (fixed window) per subject" in output
    assert "it frees in 40 min" in output  # 15:20 in a window ending at 16:00


@pytest.mark.parametrize(
    ("quota_used", "words"),
    [
        ("{nothing: 1}", "quota_used: quota 'nothing' is not declared"),
        ("{daily-sliding: 1}", "quota 'daily-sliding' does not count this request's answer"),
    ],
)
def test_quota_used_naming_no_matching_quota_fails_the_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quota_used: str, words: str
) -> None:
    code, output = _run(tmp_path, capsys, _case("x", quota_used=quota_used, expect=ALLOW))
    assert code == EXIT_FAILED
    assert words in output


@pytest.mark.parametrize(
    ("quota_used", "words"),
    [
        ("{hourly: -1}", "quota_used.hourly must be a whole number from 0 to 100,000"),
        ("{hourly: 100001}", "must be a whole number from 0 to 100,000"),
        ("{hourly: true}", "must be a whole number"),
        ("{hourly: '3'}", "must be a whole number"),
        ('{"a b": 1}', "is not a quota name"),
        ("[hourly]", "'quota_used' (quota name: ALLOWs counted) must be a mapping"),
    ],
)
def test_a_bad_quota_used_is_refused_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quota_used: str, words: str
) -> None:
    code, output = _run(tmp_path, capsys, _case("x", quota_used=quota_used, expect=ALLOW))
    assert code == EXIT_INVALID
    assert "quotas.test.yaml:10:" in output and words in output, output


def _with_quota_used(value: Any) -> dict[str, Any]:
    suite = copy.deepcopy(SUITE)
    suite["cases"][0]["quota_used"] = value
    return suite


def test_the_schema_and_the_parser_agree_on_quota_used() -> None:
    good = _with_quota_used({"github-per-person-hourly": 100, "x": 0})
    assert _errors(good) == [] and _parses(good)
    for bad in (-1, 100_001, True, "3", [1]):
        suite = _with_quota_used({"hourly": bad})
        assert _errors(suite) and not _parses(suite), bad
    for bad_name in ("a b", "-x", "x" * 129):
        suite = _with_quota_used({bad_name: 1})
        assert _errors(suite) and not _parses(suite), bad_name
    suite = _with_quota_used(["hourly"])
    assert _errors(suite) and not _parses(suite)


# --- pdp eval --quota-used -------------------------------------------------------------------


def _eval(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    policies = Path(__file__).resolve().parents[2] / "policies"
    erin = [
        "eval", "--policies", str(policies), "--org", "globex", "--subject", "erin",
        "--subject-attr", 'groups=["engineering"]', "--application", "release-bot",
        "--integration", "github", "--scope", "repo",
    ]  # fmt: skip
    try:
        code = main([*erin, *flags])
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_pdp_eval_counts_the_allow_in_the_quotas_it_matches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, output = _eval(capsys)
    assert code == 0 and "decision: ALLOW" in output
    code, output = _eval(capsys, "--quota-used", "github-per-person-hourly=99")
    assert code == 0 and "decision: ALLOW" in output  # the 100th
    code, output = _eval(capsys, "--quota-used", "github-per-person-hourly=100")
    assert code == 0 and "decision: DENY" in output
    assert "kontext_rate_limited" in output and "policy=github-per-person-hourly" in output
    code, output = _eval(capsys, "--quota-used", "release-bot-daily=1000", "--json")
    assert code == 0 and '"code": "kontext_rate_limited"' in output
    assert '"policy": "release-bot-daily"' in output


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ("nothing=1", "--quota-used: quota 'nothing' is not declared"),
        ("github-per-person-hourly=-1", "expected NAME=N"),
        ("github-per-person-hourly=1e3", "expected NAME=N"),
        ("github-per-person-hourly", "expected NAME=N"),
        ("github-per-person-hourly=100001", "from 0 to 100,000"),
        ("github-per-person-hourly=\u00b2", "expected NAME=N"),  # a digit int() refuses
        ("github-per-person-hourly=\u0663", "expected NAME=N"),  # Arabic-Indic three
    ],
)
def test_pdp_eval_refuses_a_bad_quota_used(
    capsys: pytest.CaptureFixture[str], flag: str, words: str
) -> None:
    code, output = _eval(capsys, "--quota-used", flag)
    assert code == 2 and words in output, output
