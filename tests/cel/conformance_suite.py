"""The official CEL conformance cases (tests/cel/conformance/) run through the project's CEL.

Each case is compiled with :func:`policy_engine.cel.compile_expression` (its ``names``
declared as free-form variables, its ``container`` as the declarations' container) and
evaluated against its bindings, converted from the suite's typed JSON to the values the
evaluator works on. A value expectation passes when the result has the expected CEL type
and value, recursively (``1`` is no ``1u`` or ``1.0`` here, NaN matches NaN and ``-0.0``
only ``-0.0``); an error expectation passes when compiling or evaluating raises the
project's CEL error, and never for an internal fault (a Python exception wrapped as
"evaluation failed: ...").

Cases the project does not support are listed in ``conformance/skips.toml`` with their
reason. ``python -m tests.cel.conformance_suite`` prints the per-file table that README's
CEL section shows.
"""

from __future__ import annotations

import base64
import json
import math
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_engine.cel import CelCompileError, CelEvaluationError, Declarations, compile_expression
from policy_engine.cel.values import (
    CelType,
    duration_from_nanos,
    kind_of,
    map_lookup,
    timestamp_from_nanos,
    type_named,
    uint,
)

DATA = Path(__file__).parent / "conformance"
SKIPS = DATA / "skips.toml"

#: The suite's core files: what a CEL evaluator for policies must get right.
CORE_FILES = (
    "basic",
    "comparisons",
    "conversions",
    "fields",
    "fp_math",
    "integer_math",
    "lists",
    "logic",
    "macros",
    "namespace",
    "plumbing",
    "string",
    "timestamps",
    "parse",
)

#: The extension libraries' files (cel-go's ``ext`` packages) the project supports.
EXTENSION_FILES = (
    "optionals",
    "string_ext",
    "math_ext",
    "encoders_ext",
    "network_ext",
    "bindings_ext",
    "macros2",
)
ALL_FILES = CORE_FILES + EXTENSION_FILES

#: What an internal fault looks like once the evaluator has wrapped it (values.as_cel_error).
_INTERNAL_FAULT = "evaluation failed:"


class Unsupported(Exception):
    """A typed value the project has no representation for (a protobuf message)."""


@dataclass(frozen=True)
class Case:
    """One conformance case, as read from its JSON line."""

    file: str
    section: str
    name: str
    expr: str
    container: str
    bindings: Mapping[str, Any]
    names: tuple[str, ...]
    expected: Mapping[str, Any]
    #: The case runs unchecked (the spec's checker would refuse it; a runtime need not).
    disable_check: bool = False
    #: 2, 3, ... for a later case of a file with the same section and name (string_ext has
    #: a few): its id ends in ``#2``.
    ordinal: int = 1

    @property
    def id(self) -> str:
        suffix = f"#{self.ordinal}" if self.ordinal > 1 else ""
        return f"{self.file}/{self.section}/{self.name}{suffix}"


def load_cases(files: tuple[str, ...] = ALL_FILES) -> list[Case]:
    """Every case of ``files``, in file order."""
    cases = []
    seen: dict[tuple[str, str, str], int] = {}
    for file in files:
        with (DATA / f"{file}.jsonl").open(encoding="utf-8") as lines:
            for line in lines:
                raw = json.loads(line)
                key = (raw["file"], raw["section"], raw["name"])
                seen[key] = seen.get(key, 0) + 1
                cases.append(
                    Case(
                        file=raw["file"],
                        section=raw["section"],
                        name=raw["name"],
                        expr=raw["expr"],
                        container=raw["container"],
                        bindings=raw["bindings"],
                        names=tuple(raw["names"]),
                        expected=raw["expected"],
                        disable_check=raw["disable_check"],
                        ordinal=seen[key],
                    )
                )
    return cases


def load_skips() -> dict[str, str]:
    """The skip list: case id -> the reason's text."""
    with SKIPS.open("rb") as handle:
        data = tomllib.load(handle)
    reasons: dict[str, str] = data["reasons"]
    return {case_id: reasons[key] for case_id, key in data["cases"].items()}


def skip_reason_keys() -> dict[str, str]:
    """The skip list: case id -> the reason's key (as the table groups them)."""
    with SKIPS.open("rb") as handle:
        return dict(tomllib.load(handle)["cases"])


# --------------------------------------------------------------------------------------------
# Typed JSON values


def _double(value: Any) -> float:
    if isinstance(value, str):  # "NaN", "Infinity", "-Infinity"
        return float(value.replace("Infinity", "inf"))
    return float(value)


def from_typed(typed: Mapping[str, Any]) -> Any:
    """The evaluator's value for a typed JSON value; raises :class:`Unsupported`."""
    kind, value = typed["type"], typed.get("value")
    if kind == "null":
        return None
    if kind in ("bool", "string"):
        return value
    if kind == "int":
        return int(value)
    if kind == "uint":
        return uint(int(value))
    if kind == "double":
        return _double(value)
    if kind == "bytes":
        return base64.b64decode(value)
    if kind == "timestamp":
        return timestamp_from_nanos(int(value))
    if kind == "duration":
        return duration_from_nanos(int(value))
    if kind == "list":
        return [from_typed(item) for item in value]
    if kind == "map":
        return {from_typed(k): from_typed(v) for k, v in value}
    if kind == "type":
        found = type_named(value)
        if found is None:
            raise Unsupported(f"type {value}")
        return found
    raise Unsupported(kind)


def matches_typed(typed: Mapping[str, Any], actual: Any) -> bool:
    """Whether ``actual`` is the typed JSON value: same CEL type and value, recursively."""
    kind = typed["type"]
    value = typed.get("value")
    if kind == "message":
        return False
    want_kind = "null_type" if kind == "null" else kind
    if kind_of(actual) != want_kind:
        return False
    if kind == "double":
        expected = _double(value)
        if math.isnan(expected):
            return math.isnan(actual)
        return bool(expected == actual) and math.copysign(1, expected) == math.copysign(1, actual)
    if kind == "list":
        return len(value) == len(actual) and all(
            matches_typed(item, got) for item, got in zip(value, actual, strict=True)
        )
    if kind == "map":
        if len(value) != len(actual):
            return False
        for key, item in value:
            try:
                want_key = from_typed(key)
            except Unsupported:
                return False
            found = map_lookup(actual, want_key)
            if found is None or not matches_typed(item, found):
                return False
            if not any(matches_typed(key, k) for k in actual):
                return False
        return True
    if kind == "type":
        return isinstance(actual, CelType) and actual.name == value
    try:
        return bool(from_typed(typed) == actual)
    except Unsupported:
        return False


# --------------------------------------------------------------------------------------------
# Running a case


@dataclass(frozen=True)
class Outcome:
    """A case's result: ``passed``, and what happened (for a failure's message)."""

    passed: bool
    detail: str


def run_case(case: Case) -> Outcome:
    """Compile and evaluate ``case``; never raises."""
    expect_error = case.expected["kind"] == "error"
    try:
        activation = {name: from_typed(value) for name, value in case.bindings.items()}
    except Unsupported as exc:
        return Outcome(False, f"binding of unsupported type: {exc}")
    names = dict.fromkeys((*case.names, *case.bindings), None)
    try:
        declarations = Declarations(names, container=case.container, checked=not case.disable_check)
        compiled = compile_expression(case.expr, declarations)
    except CelCompileError as exc:
        return Outcome(expect_error, f"compile error: {exc}")
    except Exception as exc:
        return Outcome(False, f"compiler fault: {type(exc).__name__}: {exc}")
    try:
        result = compiled.evaluate(activation)
    except CelEvaluationError as exc:
        if exc.message.startswith(_INTERNAL_FAULT):
            return Outcome(False, f"internal fault: {exc.message}")
        return Outcome(expect_error, f"evaluation error: {exc.message}")
    except Exception as exc:
        return Outcome(False, f"evaluator fault: {type(exc).__name__}: {exc}")
    if expect_error:
        return Outcome(False, f"expected an error, got {result!r} ({kind_of(result)})")
    expected = case.expected["value"]
    if matches_typed(expected, result):
        return Outcome(True, "")
    return Outcome(False, f"expected {json.dumps(expected)}, got {result!r} ({kind_of(result)})")


# --------------------------------------------------------------------------------------------
# The README table


@dataclass
class FileCounts:
    cases: int = 0
    passed: int = 0
    skipped: dict[str, int] | None = None


def tally(cases: list[Case]) -> Iterator[tuple[str, FileCounts]]:
    """Per file: cases, passed, and skip-listed cases by reason key."""
    keys = skip_reason_keys()
    counts: dict[str, FileCounts] = {}
    for case in cases:
        entry = counts.setdefault(case.file, FileCounts(skipped={}))
        entry.cases += 1
        if case.id in keys:
            assert entry.skipped is not None
            entry.skipped[keys[case.id]] = entry.skipped.get(keys[case.id], 0) + 1
        elif run_case(case).passed:
            entry.passed += 1
    yield from counts.items()


def table(cases: list[Case]) -> str:
    """The Markdown table README's CEL section shows (the test checks it is current)."""
    with SKIPS.open("rb") as handle:
        reasons: dict[str, str] = tomllib.load(handle)["reasons"]
    rows = ["| file | cases | passed | skipped (reason: count) |", "|---|---:|---:|---|"]
    total = FileCounts(skipped={})
    for file, counts in tally(cases):
        skipped = counts.skipped or {}
        listed = ", ".join(f"{key}: {n}" for key, n in sorted(skipped.items())) or "-"
        rows.append(f"| {file} | {counts.cases} | {counts.passed} | {listed} |")
        total.cases += counts.cases
        total.passed += counts.passed
        for key, n in skipped.items():
            total.skipped[key] = total.skipped.get(key, 0) + n  # type: ignore[index]
    listed = ", ".join(f"{key}: {n}" for key, n in sorted((total.skipped or {}).items()))
    rows.append(f"| **all** | {total.cases} | {total.passed} | {listed or '-'} |")
    legend = [f"- `{key}`: {text}" for key, text in reasons.items()]
    return "\n".join([*rows, "", *legend]) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table(load_cases()))
