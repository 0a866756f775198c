"""Operators: arithmetic, comparison, equality, membership, logic, and their error cases."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from tests.cel.support import ev, ev_error

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2 * 3 - 4", 3),
        ("(1 + 2) * 3", 9),
        ("i - j", 10),
        ("f * 2.0", 5.0),
        ("f + 0.5", 3.0),
        ("f - 3.0", -0.5),
        ("7.0 / 2.0", 3.5),
        ("-i", -7),
        ("--i", 7),
        ("-f", -2.5),
        ("1 - -1", 2),
        ("i-1", 6),
    ],
)
def test_arithmetic(source: str, expected: object) -> None:
    result = ev(source)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("7 / 2", 3),
        ("-7 / 2", -3),  # truncation toward zero, not Python's floor (-4)
        ("7 / -2", -3),
        ("-7 / -2", 3),
        ("7 % 3", 1),
        ("-7 % 3", -1),  # sign of the dividend, not Python's (2)
        ("7 % -3", 1),
        ("-7 % -3", -1),
        ("j / 2", -1),
        ("j % 2", -1),
    ],
)
def test_integer_division_truncates_like_go(source: str, expected: int) -> None:
    assert ev(source) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("i / 0", "division by zero"),
        ("i % 0", "modulus by zero"),
        (f"{INT64_MAX} + 1", "integer overflow in '+'"),
        (f"{INT64_MIN} - 1", "integer overflow in '-'"),
        (f"{INT64_MAX} * 2", "integer overflow in '*'"),
        (f"{INT64_MIN} / -1", "integer overflow in '/'"),
        (f"{INT64_MIN} % -1", "integer overflow in '%'"),
        (f"-({INT64_MIN})", "integer overflow in '-'"),
    ],
)
def test_int64_errors(source: str, message: str) -> None:
    assert ev_error(source) == message


def test_int64_bounds_are_inclusive() -> None:
    assert ev(f"{INT64_MAX - 1} + 1") == INT64_MAX
    assert ev(f"{INT64_MIN + 1} - 1") == INT64_MIN
    assert ev(f"{INT64_MIN}") == INT64_MIN


def test_overflow_from_activation_values() -> None:
    assert "overflow" in ev_error("x * x", x=2**40)
    assert ev("x + 0", x=INT64_MAX) == INT64_MAX


def test_double_arithmetic_is_ieee() -> None:
    assert ev("1.0 / 0.0") == math.inf
    assert ev("-1.0 / 0.0") == -math.inf
    assert math.isnan(ev("0.0 / 0.0"))
    assert ev("1e308 * 10.0") == math.inf
    assert ev_error("5.0 % 2.0") == "no matching overload for '%' on (double, double)"


@pytest.mark.parametrize(
    ("source", "kinds"),
    [
        ("1 + 1.0", "'+' on (int, double)"),
        ("1.0 - 1", "'-' on (double, int)"),
        ("i * f", "'*' on (int, double)"),
        ("1 + true", "'+' on (int, bool)"),
        ("true + true", "'+' on (bool, bool)"),
        ('"a" + 1', "'+' on (string, int)"),
        ("s - s", "'-' on (string, string)"),
        ("[1] - [1]", "'-' on (list, list)"),
        ("n + 1", "'+' on (null_type, int)"),
        ("m + m", "'+' on (map, map)"),
        ('b"a" + "a"', "'+' on (bytes, string)"),
        ("-s", "'-_' on (string)"),
        ("-true", "'-_' on (bool)"),
        ("!1", "'!_' on (int)"),
        ("!n", "'!_' on (null_type)"),
    ],
)
def test_no_overload_errors(source: str, kinds: str) -> None:
    assert ev_error(source) == f"no matching overload for {kinds}"


def test_concatenation() -> None:
    assert ev('s + " world"') == "hello world"
    assert ev('b"ab" + b"c"') == b"abc"
    assert list(ev("l + [4]")) == [1, 2, 3, 4]
    assert list(ev("[] + []")) == []
    assert ev("l + e") == [1, 2, 3]
    assert ev("x + y", x=(1,), y=[2]) == [1, 2]


def test_timestamp_and_duration_arithmetic() -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    assert ev('t + duration("1h")', t=t0) == t0 + timedelta(hours=1)
    assert ev('duration("1h") + t', t=t0) == t0 + timedelta(hours=1)
    assert ev('t - duration("90s")', t=t0) == t0 - timedelta(seconds=90)
    assert ev("t - u", t=t0, u=t0 - timedelta(days=2)) == timedelta(days=2)
    assert ev('duration("1h") + duration("30m")') == timedelta(minutes=90)
    assert ev('duration("1h") - duration("90m")') == timedelta(minutes=-30)
    assert ev('duration("1h") < duration("61m")') is True
    assert ev("t < now", t=t0) is True
    assert ev_error("t + t", t=t0) == "no matching overload for '+' on (timestamp, timestamp)"
    assert (
        ev_error('duration("1h") - t', t=t0)
        == "no matching overload for '-' on (duration, timestamp)"
    )
    assert (
        ev_error('t + duration("87600h")', t=datetime(9999, 1, 1, tzinfo=UTC))
        == "timestamp out of range"
    )


class TestEquality:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("1 == 1.0", True),  # heterogeneous numeric equality
            ("1.5 == 1", False),
            ("1 != 1.0", False),
            ("true == 1", False),  # bool is not a number
            ("false == 0", False),
            ("true != 1", True),
            ('"1" == 1', False),
            ("n == null", True),
            ("null == 0", False),
            ("null == false", False),
            ('null == ""', False),
            ("[1, 2] == [1, 2.0]", True),
            ("[1, 2] == [1, 2, 3]", False),
            ("[true] == [1]", False),
            ("[[1], 2] == [[1.0], 2]", True),
            ("[] == {}", False),
            ('{"a": 1} == {"a": 1.0}', True),
            ('{"a": 1} == {"b": 1}', False),
            ('{"a": 1} == {"a": 1, "b": 2}', False),
            ('m == {"b": "x", "a": 1}', True),
            ("{1: true} == {true: true}", False),
            ('b"a" == "a"', False),
            ('duration("60s") == duration("1m")', True),
        ],
    )
    def test_equality(self, source: str, expected: bool) -> None:
        assert ev(source) is expected

    def test_nan_is_not_equal_to_itself(self) -> None:
        nan = float("nan")
        assert ev("x == x", x=nan) is False
        assert ev("[x] == [x]", x=nan) is False
        assert ev("x in [x]", x=nan) is False

    def test_equality_between_values_of_the_activation(self) -> None:
        assert ev("x == y", x={"k": [1, 2]}, y={"k": (1, 2.0)}) is True
        assert ev("x == y", x=[True], y=[1]) is False
        assert ev("x != y", x={1: "a"}, y={True: "a"}) is True


class TestOrdering:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("1 < 2", True),
            ("2 <= 2", True),
            ("3 > 2.5", True),  # numbers order across int/double
            ("1 >= 1.0", True),
            ('"abc" < "abd"', True),
            ('"Z" < "a"', True),
            ('b"ab" < b"b"', True),
            ("false < true", True),
            ("true <= false", False),
            ('duration("1s") > duration("999ms")', True),
            ("1 < 2 == true", True),
        ],
    )
    def test_ordering(self, source: str, expected: bool) -> None:
        assert ev(source) is expected

    @pytest.mark.parametrize(
        ("source", "kinds"),
        [
            ('"a" < 1', "'<' on (string, int)"),
            ("true < 1", "'<' on (bool, int)"),
            ("1 > true", "'>' on (int, bool)"),
            ("n <= n", "'<=' on (null_type, null_type)"),
            ("[1] < [2]", "'<' on (list, list)"),
            ("m >= m", "'>=' on (map, map)"),
            ("now > 1", "'>' on (timestamp, int)"),
        ],
    )
    def test_ordering_errors(self, source: str, kinds: str) -> None:
        assert ev_error(source) == f"no matching overload for {kinds}"

    def test_naive_and_aware_timestamps_do_not_compare(self) -> None:
        assert "cannot compare" in ev_error("now < t", t=datetime(2024, 1, 1))


class TestMembership:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("2 in l", True),
            ("2.0 in l", True),
            ("5 in l", False),
            ("true in [1]", False),
            ("1 in [true]", False),
            ('"a" in ["a", 1]', True),
            ('"a" in m', True),
            ('"z" in m', False),
            ("1 in m", False),
            ('"x" in e', False),
            ('integration.id in ["github", "linear"]', True),
            ('"gitlab" in ["github", "linear"]', False),
            ('1 in ["github", "linear"]', False),
            ("1.0 in [1, 2]", True),
            ("true in [1, 2]", False),
            ('"1" in [1, 2]', False),
            ("[1] in [[1], [2]]", True),
            ("[1] in [[true]]", False),
            ('{"a": 1} in [{"a": 1.0}]', True),
            ("null in [null]", True),
            ("1.0 in {1: 2}", True),
            ("true in {1: 2}", False),
            ("1 in {true: 2}", False),
            ("true in {true: 2}", True),
            ("[1] in {1: 2}", False),
        ],
    )
    def test_in(self, source: str, expected: bool) -> None:
        assert ev(source) is expected

    def test_in_with_runtime_list(self) -> None:
        assert ev("x in y", x="b", y=("a", "b")) is True
        assert ev("x in y", x=1, y=[True]) is False
        assert ev("x in y", x=True, y={1: "one"}) is False

    @pytest.mark.parametrize("container", ['"abc"', "1", "n", "now"])
    def test_in_requires_list_or_map(self, container: str) -> None:
        assert ev_error(f'"a" in {container}').startswith("no matching overload for 'in'")


class TestLogic:
    ERROR = "(1 / 0 == 1)"
    NOT_BOOL = '"text"'

    @pytest.mark.parametrize(
        ("left", "right", "expected"),
        [
            ("true", "true", True),
            ("true", "false", False),
            ("false", "true", False),
            ("false", "false", False),
            ("false", ERROR, False),
            (ERROR, "false", False),
            ("false", NOT_BOOL, False),
            (NOT_BOOL, "false", False),
            ("true", ERROR, "division by zero"),
            (ERROR, "true", "division by zero"),
            (ERROR, ERROR, "division by zero"),
            ("true", NOT_BOOL, "no matching overload for '&&' on (string)"),
        ],
    )
    def test_and_table(self, left: str, right: str, expected: object) -> None:
        self._check(f"{left} && {right}", expected)

    @pytest.mark.parametrize(
        ("left", "right", "expected"),
        [
            ("true", "true", True),
            ("true", "false", True),
            ("false", "true", True),
            ("false", "false", False),
            ("true", ERROR, True),
            (ERROR, "true", True),
            ("true", NOT_BOOL, True),
            (NOT_BOOL, "true", True),
            ("false", ERROR, "division by zero"),
            (ERROR, "false", "division by zero"),
            (ERROR, ERROR, "division by zero"),
            (NOT_BOOL, "false", "no matching overload for '||' on (string)"),
        ],
    )
    def test_or_table(self, left: str, right: str, expected: object) -> None:
        self._check(f"{left} || {right}", expected)

    @staticmethod
    def _check(source: str, expected: object) -> None:
        # Variables as well as literals, so constant folding is not all that is tested.
        for src in (source, source.replace("true", "t").replace("false", "ff")):
            if isinstance(expected, bool):
                assert ev(src, t=True, ff=False) is expected, src
            else:
                assert ev_error(src, t=True, ff=False) == expected, src

    def test_long_chains(self) -> None:
        assert ev(" && ".join(["b"] * 50)) is True
        assert ev(" && ".join(["b"] * 49 + ["(1/0 == 1)", "false"])) is False
        assert ev_error(" || ".join(["!b"] * 50 + ["missing.x"]), missing={}) == "no such key: 'x'"
        assert ev_error(" || ".join(["!b"] * 10 + ["m.zz"])) == "no such key: 'zz'"
        assert ev("x || m.zz || y", x=False, y=True) is True

    def test_missing_key_absorbed(self) -> None:
        assert ev('has(m.zz) && m.zz == "x"') is False
        assert ev('m.zz == "x" && has(m.zz)') is False
        assert ev('m.zz == "x" || m.a == 1') is True

    def test_not(self) -> None:
        assert ev("!b") is False
        assert ev("!!b") is True
        assert ev("!(i > 3)") is False

    def test_ternary(self) -> None:
        assert ev('i > 5 ? "big" : "small"') == "big"
        assert ev("b ? 1 : 1 / 0") == 1  # only the chosen branch is evaluated
        assert ev("!b ? 1 / 0 : 2") == 2
        assert ev("false ? 1 : true ? 2 : 3") == 2
        assert ev_error("i ? 1 : 2") == "no matching overload for '_?_:_' on (int)"
        assert ev_error("n ? 1 : 2") == "no matching overload for '_?_:_' on (null_type)"
        assert ev_error("(1/0 == 0) ? 1 : 2") == "division by zero"
