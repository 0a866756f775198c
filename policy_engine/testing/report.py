"""What `pdp test` prints: failures with the explain trace, a summary, coverage, JSON, JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from policy_engine.domain.decision import Layer
from policy_engine.engine.serialize import decision_to_dict
from policy_engine.testing.runner import CaseResult, Coverage, Outcome


def format_failure(result: CaseResult, directory: Path) -> str:
    """One failed case: where it is, what was expected and what came, and the explain trace."""
    from policy_engine.cli.main import format_decision

    where = f"{directory / result.suite.path}:{result.case.line}"
    lines = [f"FAIL {result.full_name} ({where})"]
    lines.append(f"  expected: {result.case.expect.describe()}")
    lines += [f"  {problem}" for problem in result.problems]
    if result.decision is not None:
        lines += ["  " + line for line in format_decision(result.decision).splitlines()]
    return "\n".join(lines)


def summary_line(outcome: Outcome, coverage: bool) -> str:
    failed = len(outcome.failed)
    passed = len(outcome.results) - failed
    suites = len({(r.suite.organization, r.suite.name) for r in outcome.results})
    line = f"{'FAILED' if failed else 'OK'}: {passed} passed, {failed} failed"
    cases = len(outcome.results)
    line += f" ({cases} case{'s' * (cases != 1)} in {suites} suite{'s' * (suites != 1)})"
    if coverage:
        line += f"; rules matched: {outcome.coverage.percent():.1f}%"
    return line


def _state(matched: int, not_matched: int, error: int) -> str:
    states = [
        name
        for name, count in (("matched", matched), ("not_matched", not_matched), ("error", error))
        if count
    ]
    return ",".join(states) or "not reached"


def format_coverage(coverage: Coverage) -> str:
    """Per organization its share of rules matched, then each rule with how often cases made it
    match, not match or error (`not reached`: no case's request fell under its target)."""
    lines = ["coverage:"]
    for organization in coverage.organizations():
        lines.append(f"  {organization}: {coverage.percent(organization):.1f}% of rules matched")
        keys = sorted(k for k in coverage.rules if k[0] == organization)
        for _, layer, policy, rule in keys:
            counts = coverage.rules[(organization, layer, policy, rule)]
            mark = "+" if counts.matched else "-"
            lines.append(
                f"    {mark} {layer.value:<12} {policy}/{rule}: "
                f"{_state(counts.matched, counts.not_matched, counts.error)} "
                f"(matched {counts.matched}, not matched {counts.not_matched}, "
                f"error {counts.error})"
            )
    return "\n".join(lines)


def coverage_dict(coverage: Coverage) -> dict[str, Any]:
    """{"percent": float, "organizations": {org: {"percent", "policies": {policy: {rule:
    {"layer", "matched", "not_matched", "error"}}}}}}: counts are numbers of cases."""
    organizations: dict[str, Any] = {}
    policies: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (organization, layer, policy, rule), counts in sorted(coverage.rules.items()):
        policies[organization].setdefault(policy, {})[rule] = {
            "layer": Layer(layer).value,
            "matched": counts.matched,
            "not_matched": counts.not_matched,
            "error": counts.error,
        }
    for organization in coverage.organizations():
        organizations[organization] = {
            "percent": round(coverage.percent(organization), 2),
            "policies": policies[organization],
        }
    return {"percent": round(coverage.percent(), 2), "organizations": organizations}


def outcome_dict(outcome: Outcome, directory: Path, coverage: bool) -> dict[str, Any]:
    """The whole run as JSON-ready data: `summary` {passed, failed, total}, `cases` (each with
    name, file, line, passed, expected, problems and the decision with its trace), and
    `coverage` (see coverage_dict) when asked."""
    failed = len(outcome.failed)
    data: dict[str, Any] = {
        "summary": {
            "passed": len(outcome.results) - failed,
            "failed": failed,
            "total": len(outcome.results),
        },
        "cases": [
            {
                "name": r.full_name,
                "file": str(directory / r.suite.path),
                "line": r.case.line,
                "passed": r.passed,
                "expected": r.case.expect.describe(),
                "problems": list(r.problems),
                "decision": decision_to_dict(r.decision) if r.decision is not None else None,
            }
            for r in outcome.results
        ],
    }
    if coverage:
        data["coverage"] = coverage_dict(outcome.coverage)
    return data


def junit_xml(outcome: Outcome, directory: Path) -> bytes:
    """JUnit XML (the schema Jenkins, GitLab and GitHub reporters read): one <testsuite> per
    suite file, one <testcase> per case, a <failure> holding the failure report."""
    root = ET.Element("testsuites", name="pdp test")
    by_suite: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for result in outcome.results:
        by_suite[(result.suite.organization, result.suite.name)].append(result)
    total_failed = 0
    for (organization, name), results in by_suite.items():
        failed = sum(1 for r in results if not r.passed)
        total_failed += failed
        element = ET.SubElement(
            root,
            "testsuite",
            name=f"{organization}/{name}",
            tests=str(len(results)),
            failures=str(failed),
            errors="0",
            skipped="0",
            file=str(directory / results[0].suite.path),
        )
        for result in results:
            case = ET.SubElement(
                element,
                "testcase",
                classname=f"{organization}.{name}",
                name=result.case.name,
                file=str(directory / result.suite.path),
                line=str(result.case.line),
            )
            if not result.passed:
                failure = ET.SubElement(
                    case, "failure", message="; ".join(result.problems), type="PolicyTestFailure"
                )
                failure.text = format_failure(result, directory)
    root.set("tests", str(len(outcome.results)))
    root.set("failures", str(total_failed))
    root.set("errors", "0")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
