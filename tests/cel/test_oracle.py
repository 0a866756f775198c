"""Differential test against Google's C++ CEL runtime (``cel-expr-python``, dev-only).

Every pair of a set of edge-case numbers under every arithmetic and comparison operator,
every conversion of each, and timestamp/duration arithmetic near the ranges' ends: both
evaluators must agree on error or value, and on the value's CEL type. The runtime is used
without its type checker (``disable_check``), as our evaluator checks types at run time.

One known difference between the reference runtimes is not ours to settle: the C++ runtime
prints a timestamp's or duration's fraction in groups of three digits (``1.500s``), cel-go
without trailing zeros (``1.5s``, what we print); strings of times are compared without them.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import pytest

from policy_engine.cel import CelCompileError, CelEvaluationError, Declarations, compile_expression
from policy_engine.cel.values import kind_of

cel = pytest.importorskip("cel_expr_python.cel")

NUMBERS = [
    "0",
    "1",
    "-1",
    "7",
    "9223372036854775807",
    "-9223372036854775808",
    "0u",
    "1u",
    "7u",
    "9223372036854775808u",
    "18446744073709551615u",
    "0.0",
    "-0.0",
    "1.5",
    "-2.5",
    "9.223372036854775807e18",
    "1e308",
]
OPERATORS = ["+", "-", "*", "/", "%", "<", "<=", ">", "==", "!="]
CONVERSIONS = ["int", "uint", "double", "string", "dyn", "type"]
TIMES = [
    "timestamp('0001-01-01T00:00:00Z')",
    "timestamp('9999-12-31T23:59:59.999999999Z')",
    "timestamp('1970-01-01T00:00:00.000000001Z')",
    "duration('1ns')",
    "duration('-1.5s')",
    "duration('2562047h')",
    "duration('-2562047h')",
]

EXPRESSIONS = [
    *(f"{a} {op} {b}" for a, b in itertools.product(NUMBERS, NUMBERS) for op in OPERATORS),
    *(f"{conversion}({a})" for conversion in CONVERSIONS for a in NUMBERS),
    *(f"string({a} {op} {b})" for a, b in itertools.product(TIMES, TIMES) for op in "+-"),
    *(f"{a} < {b}" for a, b in itertools.product(TIMES, TIMES)),
    *(f"{t}.{getter}()" for t in TIMES for getter in ("getMilliseconds", "getSeconds")),
    *(f"int({t})" for t in TIMES),
]

_TYPE_NAMES = {"null_type": "NULL_TYPE", "list": "LIST", "map": "MAP"}


def _theirs(env: Any, source: str) -> tuple[str, Any]:
    try:
        value = env.compile(source, disable_check=True).eval(data={})
    except Exception:
        return "ERROR", None
    return value.type().name(), value.plain_value()


@pytest.fixture(scope="module")
def env() -> Any:
    return cel.NewEnv(variables={})


@pytest.mark.parametrize("source", EXPRESSIONS)
def test_same_as_the_cpp_runtime(env: Any, source: str) -> None:
    kind, value = _theirs(env, source)
    try:
        ours = compile_expression(source, Declarations({}, checked=False)).evaluate({})
    except (CelCompileError, CelEvaluationError) as exc:
        assert kind == "ERROR", f"we raised {exc}, the C++ runtime gave {kind} {value!r}"
        return
    assert not str(getattr(ours, "message", "")).startswith("evaluation failed")
    assert kind != "ERROR", f"we gave {ours!r}, the C++ runtime an error"
    our_kind = kind_of(ours)
    if our_kind == "type":
        assert ours.name.upper().replace("GOOGLE.PROTOBUF.", "") == value.name()
        return
    assert _TYPE_NAMES.get(our_kind, our_kind.upper()) == kind.split("<")[0]
    if our_kind == "double":
        assert (math.isnan(ours) and math.isnan(value)) or (
            ours == value and math.copysign(1, ours) == math.copysign(1, value)
        )
    elif source.startswith("string(") and our_kind == "string":
        assert ours == _FRACTION_ZEROS.sub(r"\1", value)
    else:
        assert ours == value


_FRACTION_ZEROS = re.compile(r"(\.[0-9]*?)0+(?=[sZ]$)")
