"""Property tests: evaluation only ever raises CelEvaluationError; compilation only
CelCompileError; results are plain Python values."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.cel import (
    CelCompileError,
    CelEvaluationError,
    CompiledExpression,
    Declarations,
    compile_expression,
)
from policy_engine.cel.values import CelType, Duration, Timestamp


class Hostile:
    """A value whose every dunder fails: nothing but CelEvaluationError may escape."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __lt__(self, other: object) -> bool:
        raise RuntimeError("lt")

    def __len__(self) -> int:
        raise RuntimeError("len")


class HostileMapping(Mapping[str, Any]):
    """A mapping whose lookups fail with unexpected exceptions."""

    def __getitem__(self, key: str) -> Any:
        raise ValueError("getitem")

    def __iter__(self) -> Any:
        raise OSError("iter")

    def __len__(self) -> int:
        return 1


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["10.0.0.1", "::1", "a:b/c", "09:30", "UTC", "1h", "2024-01-01T00:00:00Z"]),
    st.binary(max_size=4),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(),  # naive
    st.timedeltas(),
    st.builds(Hostile),
    st.builds(HostileMapping),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), children, max_size=4),
        st.dictionaries(st.integers(-2, 2) | st.booleans(), children, max_size=3),
    ),
    max_leaves=10,
)

NAMES = ("a", "b", "c")
DECLARATIONS = Declarations(dict.fromkeys(NAMES, None))

EXPRESSIONS = [
    "a + b",
    "a - b",
    "a * b",
    "a / b",
    "a % b",
    "-a",
    "!a",
    "a == b",
    "a != b",
    "a < b",
    "a <= b",
    "a > b",
    "a >= b",
    "a in b",
    "a && b || c",
    "a ? b : c",
    "a[b]",
    "a.x",
    "has(a.x)",
    "a.x.y == 'z'",
    "a == 'lit' && b in ['x', 'y'] && c in [1, 2]",
    "a.all(x, x == b)",
    "a.exists(x, x > b)",
    "a.exists_one(x, x)",
    "a.map(x, x + b)",
    "a.map(x, x != b, x)",
    "a.filter(x, a.exists(y, y == x))",
    "size(a)",
    "a.size()",
    "a.startsWith(b)",
    "a.endsWith(b)",
    "a.contains(b)",
    "a.matches(b)",
    "a.matches('^[a-z]+$')",
    "a.lowerAscii() + b.upperAscii()",
    "int(a)",
    "uint(a)",
    "double(a)",
    "string(a)",
    "bool(a)",
    "bytes(a)",
    "timestamp(a)",
    "duration(a)",
    "a.getHours(b)",
    "a.getDayOfWeek()",
    "a.getMinutes()",
    "a.glob(b)",
    "globMatch(a, 'a*:?')",
    "a.startsWithAny(b)",
    "a.inCidr(b)",
    "inCidr(a, '10.0.0.0/8')",
    "a.timeOfDay(b)",
    "a.betweenHours(b, c, 'UTC')",
    "a.betweenHours('22:00', '06:00', b)",
    "{a: b}",
    "[a, b] == [b, a]",
    "{'k': a} == {'k': b}",
    "a + duration('1h')",
    "a - b < duration('1h')",
]
COMPILED = [compile_expression(source, DECLARATIONS) for source in EXPRESSIONS]
# The evaluator's own value types: uint, nanosecond timestamps and durations, type values.
PLAIN = (
    type(None),
    bool,
    int,
    float,
    str,
    bytes,
    datetime,
    timedelta,
    Timestamp,
    Duration,
    CelType,
)


def assert_plain(value: Any, depth: int = 0) -> None:
    assert depth < 50
    if isinstance(value, (*PLAIN, Hostile, HostileMapping)):
        return  # activation values may be returned as they are
    if isinstance(value, list | tuple):
        for item in value:
            assert_plain(item, depth + 1)
        return
    assert isinstance(value, Mapping), type(value)
    for key, item in value.items():
        assert_plain(key, depth + 1)
        assert_plain(item, depth + 1)


def evaluate_all(activation: dict[str, Any]) -> None:
    for expression in COMPILED:
        try:
            result = expression.evaluate(activation)
        except CelEvaluationError as exc:
            assert isinstance(exc.message, str) and exc.message
        else:
            assert_plain(result)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({name: values for name in NAMES}))
def test_evaluate_raises_only_cel_evaluation_error(activation: dict[str, Any]) -> None:
    evaluate_all(activation)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), values, max_size=2))
def test_missing_variables_are_evaluation_errors(activation: dict[str, Any]) -> None:
    evaluate_all(activation)


def test_non_mapping_activations() -> None:
    for activation in (None, 1, "abc", [], HostileMapping()):
        evaluate_all(activation)  # type: ignore[arg-type]


TOKENS = [
    "a", "b", "x", "1", "0x1", "1u", "1.5", "'s'", '"t"', "b'y'", "true", "null", "+", "-", "*",
    "/", "%", "==", "!=", "<", ">=", "in", "&&", "||", "!", "?", ":", "(", ")", "[", "]", "{",
    "}", ",", ".", "size", "all", "exists", "map", "has", "matches", "glob", "inCidr", "\n",
    " ", "#", "\\", "'", '"', "Foo", "r'", "9223372036854775808", "betweenHours", "timeOfDay",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=25).map("".join) | st.text(max_size=40))
def test_compile_raises_only_cel_compile_error(source: str) -> None:
    try:
        expression = compile_expression(source, DECLARATIONS)
    except CelCompileError as exc:
        assert exc.line >= 1 and exc.column >= 1
        assert exc.message
        return
    assert isinstance(expression, CompiledExpression)
    with contextlib.suppress(CelEvaluationError):
        expression.evaluate({"a": 1, "b": "x", "c": [1]})


@settings(max_examples=200, deadline=None)
@given(st.integers(), st.integers())
def test_int_arithmetic_matches_int64_semantics(x: int, y: int) -> None:
    bound = 2**63
    activation = {"a": x, "b": y}
    for source, exact in (("a + b", x + y), ("a - b", x - y), ("a * b", x * y)):
        expression = compile_expression(source, DECLARATIONS)
        if -bound <= exact < bound:
            assert expression.evaluate(activation) == exact
        else:
            try:
                expression.evaluate(activation)
            except CelEvaluationError as exc:
                assert "overflow" in exc.message
            else:
                raise AssertionError(f"{source} should overflow for {x}, {y}")
    if y != 0:
        quotient = compile_expression("a / b", DECLARATIONS)
        remainder = compile_expression("a % b", DECLARATIONS)
        if -bound <= x < bound and -bound <= y < bound and not (x == -bound and y == -1):
            q = quotient.evaluate(activation)
            r = remainder.evaluate(activation)
            # These three properties define truncated (Go/CEL) division uniquely.
            assert q * y + r == x
            assert abs(r) < abs(y)
            assert r == 0 or (r > 0) == (x > 0)


def test_concurrent_compilation_and_runtime_caches() -> None:
    """Compiling and evaluating from many threads (parser, bounded regex/zone caches)."""
    from concurrent.futures import ThreadPoolExecutor

    def work(k: int) -> tuple[bool, bool, int]:
        expression = compile_expression(
            f"a.matches(b) && c.glob('x{k}*') && a.size() == {len(f'x{k}y')}", DECLARATIONS
        )
        matched = expression.evaluate({"a": f"x{k}y", "b": f"^x{k}y$", "c": f"x{k}-tail"})
        hours = compile_expression("a.getHours(b)", DECLARATIONS).evaluate(
            {"a": datetime(2024, 1, 1, 12, tzinfo=UTC), "b": f"+{k % 12:02d}:00"}
        )
        return matched, expression.variables == frozenset(NAMES), hours

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(600)))
    for k, (matched, variables_ok, hours) in enumerate(results):
        assert matched and variables_ok
        assert hours == 12 + k % 12
