"""The official CEL conformance cases (google/cel-spec), core and extension files, through our
compiler.

Every case must pass unless ``conformance/skips.toml`` lists it with a reason; a listed case
that passes fails too (remove it from the list: the list only shrinks). README's CEL section
shows the table ``python -m tests.cel.conformance_suite`` prints, and must stay current.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cel.conformance_suite import (
    CORE_FILES,
    EXTENSION_FILES,
    SKIPS,
    load_cases,
    load_skips,
    run_case,
    table,
)

CASES = load_cases()
SKIP_LIST = load_skips()
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case(case):
    outcome = run_case(case)
    reason = SKIP_LIST.get(case.id)
    if reason is None:
        assert outcome.passed, f"{case.id}: {case.expr!r}: {outcome.detail}"
    elif outcome.passed:
        pytest.fail(f"{case.id} passes now: remove it from {SKIPS.name}")
    else:
        pytest.skip(reason)


def test_skip_list_names_real_cases():
    ids = {case.id for case in CASES}
    assert len(ids) == len(CASES), "case ids must be unique"
    assert set(SKIP_LIST) <= ids, sorted(set(SKIP_LIST) - ids)


def test_every_core_and_extension_file_is_run():
    assert {case.file for case in CASES} == set(CORE_FILES) | set(EXTENSION_FILES)
    assert sum(case.file in CORE_FILES for case in CASES) == 1192


def test_readme_shows_the_current_table():
    text = README.read_text(encoding="utf-8")
    found = re.search(
        r"<!-- conformance table: begin -->\n(.*?)<!-- conformance table: end -->", text, re.S
    )
    assert found, "README's CEL section has no conformance table"
    assert found.group(1) == table(CASES), (
        "README's conformance table is stale: regenerate it with "
        "python -m tests.cel.conformance_suite"
    )
