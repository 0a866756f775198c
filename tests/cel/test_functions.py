"""Standard functions: size, string predicates, matches, case, conversions, time accessors."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from policy_engine.cel.functions import format_double, format_duration
from policy_engine.cel.values import Duration, Timestamp, UInt
from tests.cel.support import compile_error, ev, ev_error

T = datetime(2024, 3, 10, 6, 30, 45, 123456, tzinfo=UTC)  # a Sunday; US DST starts that day


class TestSize:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("size(s)", 5),
            ("s.size()", 5),
            ('"héllo😀".size()', 6),  # code points, not bytes
            ('size(b"h\\303\\251")', 3),
            ("size(l)", 3),
            ("l.size()", 3),
            ("size(m)", 2),
            ("size([])", 0),
            ("size({})", 0),
        ],
    )
    def test_size(self, source: str, expected: int) -> None:
        assert ev(source) == expected

    @pytest.mark.parametrize("arg", ["i", "n", "b", "now"])
    def test_size_errors(self, arg: str) -> None:
        assert ev_error(f"size({arg})").startswith("no matching overload for 'size'")


class TestStrings:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ('s.startsWith("he")', True),
            ('s.startsWith("lo")', False),
            ('s.startsWith("")', True),
            ('s.endsWith("lo")', True),
            ('s.endsWith("he")', False),
            ('s.contains("ll")', True),
            ('s.contains("x")', False),
            ('"ÀbC".lowerAscii()', "Àbc"),
            ('"àbc".upperAscii()', "àBC"),
            ('s.matches("^h.*o$")', True),
            ('s.matches("ell")', True),  # search, not full match
            ('matches(s, "^ell")', False),
            ("s.matches(p)", True),
        ],
    )
    def test_string_functions(self, source: str, expected: object) -> None:
        assert ev(source, p="l+") == expected

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("i.startsWith('a')", "no matching overload for 'startsWith' on (int, string)"),
            ("s.endsWith(1)", "no matching overload for 'endsWith' on (string, int)"),
            ("s.contains(n)", "no matching overload for 'contains' on (string, null_type)"),
            ("i.lowerAscii()", "no matching overload for 'lowerAscii' on (int)"),
            ("l.upperAscii()", "no matching overload for 'upperAscii' on (list)"),
            ("i.matches('a')", "no matching overload for 'matches' on (int, string)"),
        ],
    )
    def test_string_function_errors(self, source: str, message: str) -> None:
        assert ev_error(source) == message

    def test_runtime_regex_errors(self) -> None:
        assert ev_error("s.matches(p)", p="(").startswith("invalid regular expression '('")
        assert ev_error("s.matches(p)", p=1) == "expected a string regular expression, got int"

    def test_runtime_regexes_are_cached_but_bounded(self) -> None:
        expression = "s.matches(p)"
        for k in range(600):
            assert ev(expression, s=f"x{k}y", p=f"^x{k}y$") is True


class TestConversions:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("int(42)", 42),
            ("int(2.9)", 2),
            ("int(-2.9)", -2),
            ('int("-17")', -17),
            ('int("+5")', 5),
            ("int(1u)", 1),
            ('int(timestamp("1970-01-01T00:01:40Z"))', 100),
            ('int(timestamp("1969-12-31T23:59:59.5Z"))', -1),
            ("uint(3)", UInt(3)),
            ("uint(3.7)", UInt(3)),
            ('uint("18446744073709551615")', UInt(2**64 - 1)),
            ("double(7)", 7.0),
            ("double(1.5)", 1.5),
            ('double("1e3")', 1000.0),
            ('double("-.5")', -0.5),
            ('double("inf")', math.inf),
            ("string(7)", "7"),
            ("string(-7)", "-7"),
            ("string(1.5)", "1.5"),
            ("string(2.0)", "2"),
            ("string(true)", "true"),
            ("string(false)", "false"),
            ('string(b"abc")', "abc"),
            ('string("x")', "x"),
            ('string(timestamp("2024-01-02T03:04:05.500Z"))', "2024-01-02T03:04:05.5Z"),
            ('string(duration("1m30s"))', "90s"),
            ('string(duration("1.5s"))', "1.5s"),
            ('bool("true")', True),
            ('bool("FALSE")', False),
            ('bool("t")', True),
            ('bool("0")', False),
            ("bool(true)", True),
            ('bytes("é")', b"\xc3\xa9"),
            ('bytes(b"a")', b"a"),
        ],
    )
    def test_conversions(self, source: str, expected: object) -> None:
        result = ev(source)
        assert result == expected
        assert type(result) is type(expected)

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ('int("1.5")', "cannot convert '1.5' to int"),
            ('int(" 1")', "cannot convert ' 1' to int"),
            ('int("1_000")', "cannot convert '1_000' to int"),
            ('int("9223372036854775808")', "int() out of range: 9223372036854775808"),
            ("int(1e19)", "int() out of range: 1e+19"),
            ('int(double("nan"))', "int() out of range: nan"),
            ("int(true)", "no matching overload for 'int' on (bool)"),
            ("int(n)", "no matching overload for 'int' on (null_type)"),
            ("uint(-1)", "uint() out of range: -1"),
            ("uint(-1.5)", "uint() out of range: -1.5"),
            ('uint("-1")', "cannot convert '-1' to uint"),
            ('double("abc")', "cannot convert 'abc' to double"),
            ("double(true)", "no matching overload for 'double' on (bool)"),
            ('string(b"\\377")', "bytes are not valid UTF-8"),
            ("string(n)", "no matching overload for 'string' on (null_type)"),
            ("string(l)", "no matching overload for 'string' on (list)"),
            ('bool("yes")', "cannot convert 'yes' to bool"),
            ("bool(1)", "no matching overload for 'bool' on (int)"),
            ("bytes(1)", "no matching overload for 'bytes' on (int)"),
        ],
    )
    def test_conversion_errors(self, source: str, message: str) -> None:
        assert ev_error(source) == message

    @pytest.mark.parametrize(
        ("value", "text"),
        [
            (1.5, "1.5"),
            (100.0, "100"),
            (1e6, "1e+06"),
            (123456.0, "123456"),
            (1234567.0, "1.234567e+06"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5e-7, "-2.5e-07"),
            (1e100, "1e+100"),
            (0.1 + 0.2, "0.30000000000000004"),
            (0.0, "0"),
            (-0.0, "-0"),
            (math.inf, "+Inf"),
            (-math.inf, "-Inf"),
            (math.nan, "NaN"),
        ],
    )
    def test_double_formatting_matches_go(self, value: float, text: str) -> None:
        assert format_double(value) == text

    def test_duration_formatting(self) -> None:
        assert format_duration(timedelta(milliseconds=-1)) == "-0.001s"
        assert format_duration(timedelta(0)) == "0s"
        assert format_duration(timedelta(hours=2)) == "7200s"


class TestTimestamps:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("2024-03-10T06:30:45Z", datetime(2024, 3, 10, 6, 30, 45, tzinfo=UTC)),
            ("2024-03-10t06:30:45z", datetime(2024, 3, 10, 6, 30, 45, tzinfo=UTC)),
            ("2024-03-10T06:30:45.123456789Z", Timestamp(1_710_052_245_123_456_789)),
            ("2024-03-10T08:30:45+02:00", datetime(2024, 3, 10, 6, 30, 45, tzinfo=UTC)),
            ("2024-03-10T00:00:00-05:30", datetime(2024, 3, 10, 5, 30, tzinfo=UTC)),
        ],
    )
    def test_timestamp_parsing(self, text: str, expected: datetime) -> None:
        result = ev(f'timestamp("{text}")')
        assert type(result) is Timestamp
        assert result == expected

    @pytest.mark.parametrize(
        "text", ["2024-03-10", "2024-03-10T06:30:45", "2024-02-30T00:00:00Z", "yesterday"]
    )
    def test_invalid_timestamps(self, text: str) -> None:
        assert ev_error("timestamp(x)", x=text).startswith(f"invalid timestamp {text!r}")

    def test_timestamp_from_int_and_identity(self) -> None:
        assert ev("timestamp(0)") == datetime(1970, 1, 1, tzinfo=UTC)
        assert ev("timestamp(now) == now") is True
        assert ev_error("timestamp(true)") == "no matching overload for 'timestamp' on (bool)"

    @pytest.mark.parametrize(
        ("method", "utc", "new_york"),
        [
            ("getFullYear", 2024, 2024),
            ("getMonth", 2, 2),
            ("getDayOfMonth", 9, 9),
            ("getDate", 10, 10),
            ("getDayOfWeek", 0, 0),
            ("getDayOfYear", 69, 69),
            ("getHours", 6, 1),  # 06:30 UTC is 01:30 EST (DST starts at 02:00 local)
            ("getMinutes", 30, 30),
            ("getSeconds", 45, 45),
            ("getMilliseconds", 123, 123),
        ],
    )
    def test_accessors(self, method: str, utc: int, new_york: int) -> None:
        assert ev(f"t.{method}()", t=T) == utc
        assert ev(f't.{method}("UTC")', t=T) == utc
        assert ev(f't.{method}("America/New_York")', t=T) == new_york
        assert ev(f"t.{method}(z)", t=T, z="America/New_York") == new_york

    def test_accessors_across_a_dst_change_and_fixed_offsets(self) -> None:
        after_dst = T + timedelta(hours=2)  # 08:30 UTC = 04:30 EDT
        assert ev('t.getHours("America/New_York")', t=after_dst) == 4
        assert ev('t.getHours("+05:30")', t=T) == 12
        assert ev('t.getMinutes("-00:45")', t=T) == 45
        assert ev('t.getDayOfWeek("Pacific/Kiritimati")', t=T) == 0
        assert ev('t.getDate("Pacific/Pago_Pago")', t=T) == 9

    def test_naive_timestamps_are_read_as_utc(self) -> None:
        assert ev('t.getHours("Europe/Berlin")', t=datetime(2024, 1, 1, 12)) == 13

    def test_accessor_errors(self) -> None:
        assert ev_error("s.getHours()") == "no matching overload for 'getHours' on (string)"
        assert ev_error("t.getHours(z)", t=T, z="Mars/Olympus") == (
            "unknown time zone: 'Mars/Olympus'"
        )
        assert ev_error('duration("1h").getHours("UTC")') == (
            "no matching overload for 'getHours' on (duration, string)"
        )
        assert ev_error('duration("1h").getFullYear()') == (
            "no matching overload for 'getFullYear' on (duration)"
        )

    def test_invalid_zone_literal_is_a_compile_error(self) -> None:
        error = compile_error('now.getHours("Europe/Nowhere")')
        assert error.message == "unknown time zone: 'Europe/Nowhere'"
        assert (error.line, error.column) == (1, 14)


class TestDurations:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("1h30m", timedelta(hours=1, minutes=30)),
            ("90s", timedelta(seconds=90)),
            ("1.5h", timedelta(minutes=90)),
            ("-2m", timedelta(minutes=-2)),
            ("+3s", timedelta(seconds=3)),
            ("250ms", timedelta(milliseconds=250)),
            ("10us", timedelta(microseconds=10)),
            ("10µs", timedelta(microseconds=10)),
            ("1500ns", Duration(1500)),  # to the nanosecond
            ("0", timedelta(0)),
            (".5s", timedelta(milliseconds=500)),
            ("1h1m1s1ms", timedelta(hours=1, minutes=1, seconds=1, milliseconds=1)),
        ],
    )
    def test_duration_parsing(self, text: str, expected: timedelta) -> None:
        assert ev(f'duration("{text}")') == expected

    @pytest.mark.parametrize("text", ["", "1", "1d", "h", "1h 30m", "--1s", "1.2.3s"])
    def test_invalid_durations(self, text: str) -> None:
        assert ev_error("duration(x)", x=text) == f"invalid duration {text!r}"

    def test_duration_range(self) -> None:
        assert ev_error('duration("87660001h")') == "duration out of range: '87660001h'"
        # int64 nanoseconds (about 292 years): 2562047h fits, twice that does not.
        assert ev_error('duration("2562047h") + duration("2562047h")') == "duration out of range"

    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ('duration("1h30m").getHours()', 1),
            ('duration("1h30m").getMinutes()', 90),
            ('duration("1h30m").getSeconds()', 5400),
            ('duration("1.5s").getMilliseconds()', 500),  # the 0-999 part, as the spec says
            ('duration("-90m").getHours()', -1),  # truncated toward zero
            ('duration("-1s").getMinutes()', 0),
        ],
    )
    def test_duration_accessors(self, source: str, expected: int) -> None:
        assert ev(source) == expected

    def test_duration_identity_and_errors(self) -> None:
        assert ev("duration(d)", d=timedelta(seconds=3)) == timedelta(seconds=3)
        assert ev_error("duration(1)") == "no matching overload for 'duration' on (int)"


def test_matches_is_linear_time_re2() -> None:
    """A pattern that makes a backtracking engine take exponential time returns at once."""
    from policy_engine.cel import CelCompileError, Declarations, compile_expression

    declarations = Declarations(variables={"s": None})
    catastrophic = compile_expression('s.matches("^(a+)+$")', declarations)
    assert catastrophic.evaluate({"s": "a" * 4096 + "!"}) is False
    assert catastrophic.evaluate({"s": "aaaa"}) is True
    with pytest.raises(CelCompileError, match="invalid regular expression"):
        compile_expression(r's.matches("(a)\\1")', declarations)  # no backreferences in RE2
