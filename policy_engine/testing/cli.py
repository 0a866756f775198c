"""`pdp test [DIR]`: run the policy test suites below DIR against the policies in DIR.

Exit codes: 0 every case passed (and coverage reached --coverage-min); 1 a case failed;
2 bad flags (a --run that selects no case too); 3 invalid policies or suites (every problem
listed as file:line), or no suite found; 4 every case passed but rule coverage is below
--coverage-min.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.testing.report import (
    format_coverage,
    format_failure,
    junit_xml,
    outcome_dict,
    summary_line,
)
from policy_engine.testing.runner import find_suites, run_suites
from policy_engine.testing.suite import SuiteError

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INVALID = 3
EXIT_COVERAGE = 4


def cmd_test(args: argparse.Namespace) -> int:
    from policy_engine.cli.main import UsageError

    directory = Path(args.directory)
    try:
        select = re.compile(args.run) if args.run is not None else None
    except re.error as exc:
        raise UsageError(f"--run {args.run!r} is not a regular expression: {exc}") from None
    if args.coverage_min is not None and not 0 <= args.coverage_min <= 100:
        raise UsageError("--coverage-min is a percentage from 0 to 100")
    try:
        policies = load_policy_set(directory)
        suites = find_suites(directory)
    except (PolicyLoadError, SuiteError) as exc:
        what = "policies" if isinstance(exc, PolicyLoadError) else "test suites"
        print(f"invalid {what}: {len(exc.issues)} error(s)", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID
    if not suites:
        print(f"no test suites (*.test.yaml) below {directory}", file=sys.stderr)
        return EXIT_INVALID
    outcome = run_suites(policies, suites, select=select)
    if not outcome.results:  # a CI job whose regex matches nothing must not pass silently
        raise UsageError(f"--run {args.run!r} selects no case")
    coverage = args.coverage or args.coverage_min is not None
    if args.junit:
        try:
            Path(args.junit).write_bytes(junit_xml(outcome, directory))
        except OSError as exc:
            raise UsageError(f"--junit {args.junit}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(outcome_dict(outcome, directory, coverage), indent=2))
    else:
        for result in outcome.failed:
            print(format_failure(result, directory))
        if coverage:
            print(format_coverage(outcome.coverage))
        print(summary_line(outcome, coverage))
    if outcome.failed:
        return EXIT_FAILED
    if args.coverage_min is not None and outcome.coverage.percent() < args.coverage_min:
        print(
            f"coverage {outcome.coverage.percent():.1f}% is below --coverage-min "
            f"{args.coverage_min:g}%",
            file=sys.stderr,
        )
        return EXIT_COVERAGE
    return EXIT_PASSED


def add_test_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    test = commands.add_parser(
        "test",
        help="run the policy test suites (*.test.yaml) beside the policies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    test.add_argument("directory", nargs="?", default="policies", help="default: policies")
    test.add_argument("--run", metavar="REGEX", help="only cases whose org/suite/case it finds")
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    test.add_argument(
        "--coverage", action="store_true", help="report each rule: matched, not, error"
    )
    test.add_argument(
        "--coverage-min",
        type=float,
        metavar="PCT",
        help="exit 4 when fewer than PCT%% of rules were matched (implies --coverage)",
    )
    test.set_defaults(handler=cmd_test)
