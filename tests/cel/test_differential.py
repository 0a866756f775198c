"""Differential test against cel-python's InterpretedRunner on simple values.

Excluded, because celpy 0.5 is known to disagree with the CEL spec / our brief there:

* ``1 == 1.0``, ``[1, 2] == [1, 2.0]``, ``1 < 1.5`` - celpy implements the old homogeneous
  equality/ordering and raises; current CEL compares numbers across int/double.
* ``true == 1`` (celpy: true) and ``1 + true`` (celpy: 2) - celpy's BoolType subclasses int.
* ``string(true)`` - celpy returns ``"True"`` (Python's str), CEL says ``"true"``.
* ``l.map(x, p, t)`` (the three-argument map) - unsupported by celpy.
* ``lowerAscii``/``upperAscii`` and our policy helpers - not in celpy.
* ``string(double)`` - celpy uses Python's repr (``"2.0"``), CEL Go's ``%g`` (``"2"``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import celpy
import pytest
from celpy import celtypes
from celpy.adapter import json_to_cel

from policy_engine.cel import CelEvaluationError, Declarations, compile_expression
from policy_engine.cel.values import Duration, Timestamp, UInt, duration_nanos, timestamp_nanos

ACTIVATION: dict[str, Any] = {
    "i": 7,
    "j": -3,
    "f": 2.5,
    "s": "hello",
    "b": True,
    "l": [1, 2, 3],
    "m": {"a": 1, "b": "x"},
    "n": None,
    "e": [],
    "names": ["alice", "bob"],
}
# Unchecked: the evaluators are compared on what they do with these values at run time.
DECLARATIONS = Declarations(dict.fromkeys(ACTIVATION, None), checked=False)

EXPRESSIONS = [
    "1 + 2 * 3 - 4",
    "i / 2",
    "j / 2",
    "j % 2",
    "i % -2",
    "f * 2.0",
    "f / 0.0",
    "i / 0",
    "i % 0",
    "9223372036854775807 + 1",
    "-9223372036854775808 - 1",
    "9223372036854775807 * 2",
    "1 + 1.0",
    "[1, 2] == [1, 2]",
    "{'a': 1} == {'a': 1}",
    '"abc" < "abd"',
    'b"ab" < b"b"',
    "false < true",
    '"a" < 1',
    's + " world"',
    "s.size()",
    "size(l)",
    "size(m)",
    '"é".size()',
    's.startsWith("he") && s.endsWith("lo")',
    's.contains("ll")',
    's.matches("^h.*o$")',
    "2 in l",
    '"a" in m',
    '"z" in m',
    "s in names",
    "l + [4]",
    "l[1]",
    "l[5]",
    "m.a",
    "m.zz",
    'm["b"]',
    "has(m.a)",
    "has(m.zz)",
    "l.all(x, x > 0)",
    "l.exists(x, x == 2)",
    "l.exists_one(x, x > 1)",
    "l.map(x, x * x)",
    "l.filter(x, x % 2 == 1)",
    "m.all(k, k.size() == 1)",
    "b ? 1 : 2",
    'i > 5 ? "big" : "small"',
    "!b",
    "-i",
    'int("42")',
    "int(2.9)",
    "int(-2.9)",
    "double(i)",
    "string(i)",
    "uint(3)",
    'bool("true")',
    'bytes("abc")',
    "b && (1 / 0 == 1)",
    "false && (1 / 0 == 1)",
    "(1 / 0 == 1) && false",
    "(1 / 0 == 1) || true",
    "true || (1 / 0 == 1)",
    "n == null",
    'timestamp("2024-01-01T10:00:00Z").getHours()',
    'timestamp("2024-03-15T10:00:00Z").getMonth()',
    'timestamp("2024-03-15T10:00:00Z").getDayOfMonth()',
    'timestamp("2024-03-15T10:00:00Z").getDate()',
    'timestamp("2024-03-15T10:00:00Z").getDayOfWeek()',
    'timestamp("2024-03-15T10:00:00Z").getDayOfYear()',
    'timestamp("2024-01-01T10:00:00Z").getHours("America/New_York")',
    'duration("1h30m").getMinutes()',
    'duration("90s").getSeconds()',
    'timestamp("2024-01-01T10:00:00Z") + duration("1h")',
    'timestamp("2024-01-02T00:00:00Z") - timestamp("2024-01-01T00:00:00Z")',
    "0x10 + 1",
    "'single' + \"double\"",
    '"\\x41\\u0042\\101"',
    'r"\\d"',
    '"""triple"""',
    "[1, [2, 3]] == [1, [2, 3]]",
    '{1: "a", 2: "b"}[2]',
    "e.all(x, false)",
    "e.exists(x, true)",
    "[0, 1].all(x, 1 / x > 0)",
    "[0, 1].exists(x, 1 / x > 0)",
]

ERROR = "<error>"


def from_celpy(value: Any) -> Any:
    """celpy result -> plain Python (celpy sometimes returns plain Python values itself)."""
    if isinstance(value, Exception):
        return ERROR
    if isinstance(value, celtypes.BoolType | bool):
        return bool(value)
    if isinstance(value, celtypes.TimestampType):
        return Timestamp(timestamp_nanos(datetime.fromtimestamp(value.timestamp(), UTC)))
    if isinstance(value, celtypes.DurationType):
        return Duration(duration_nanos(timedelta(seconds=value.total_seconds())))
    if isinstance(value, celtypes.UintType):
        return UInt(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, list):
        return [from_celpy(item) for item in value]
    if isinstance(value, dict):
        return {from_celpy(k): from_celpy(v) for k, v in value.items()}
    assert value is None, type(value)
    return None


def normalise(value: Any) -> Any:
    """Our constant results may be tuples / read-only mappings; compare them as lists/dicts."""
    if isinstance(value, list | tuple):
        return [normalise(item) for item in value]
    if hasattr(value, "items") and not isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def celpy_environment() -> celpy.Environment:
    return celpy.Environment()


@pytest.mark.parametrize("source", EXPRESSIONS)
def test_same_result_as_celpy(source: str, celpy_environment: celpy.Environment) -> None:
    try:
        ours = normalise(compile_expression(source, DECLARATIONS).evaluate(ACTIVATION))
    except CelEvaluationError:
        ours = ERROR
    activation = {name: json_to_cel(value) for name, value in ACTIVATION.items()}
    try:
        program = celpy_environment.program(celpy_environment.compile(source))
        theirs = from_celpy(program.evaluate(activation))
    except Exception:
        theirs = ERROR
    assert ours == theirs
    assert type(ours) is type(theirs)
