"""Policy helpers: glob, startsWithAny, inCidr, timeOfDay, betweenHours; exported names/doc."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from policy_engine.cel import FUNCTION_NAMES, HELPERS_DOC
from policy_engine.cel.functions import FUNCTIONS, GlobPattern
from policy_engine.cel.library import EXTENSION_FUNCTIONS, EXTENSION_MACRO_ARITIES
from tests.cel.support import compile_error, ev, ev_error


class TestGlob:
    @pytest.mark.parametrize(
        ("text", "pattern", "expected"),
        [
            ("repo:read", "repo:*", True),
            ("repo:acme/api:read", "repo:*:read", True),  # * crosses ':' and '/'
            ("repo:acme/api:read", "repo:acme/*", True),
            ("repo:read", "repo:?ead", True),
            ("repo:read", "repo:?", False),
            ("repo:read", "*", True),
            ("", "*", True),
            ("", "", True),
            ("a", "", False),
            ("repo:read", "repo:read", True),
            ("repo:read", "repo", False),  # whole-string match
            ("repo:read", "*read", True),
            ("repo:read", "*write", False),
            ("scope[1]", "scope[1]", True),  # brackets are literal
            ("scope1", "scope[1]", False),
            ("scope[1]", "scope[?]", True),
            ("a.b", "a?b", True),
            ("a+b", "a+b", True),
            ("aab", "a*b", True),
            ("ab", "a**b", True),
            ("abc", "a*b*c", True),
            ("acb", "a*b*c", False),
            ("a\nb", "a?b", True),
            ("a\nb", "a*", True),
            ("abab", "*ab*ab*", True),
            ("aba", "*ab*ab*", False),
            ("ab", "a*?b", False),
            ("axb", "a*?b", True),
        ],
    )
    def test_glob(self, text: str, pattern: str, expected: bool) -> None:
        assert ev(f"x.glob({pattern!r})", x=text) is expected
        assert ev(f"globMatch(x, {pattern!r})", x=text) is expected
        assert ev("x.glob(p)", x=text, p=pattern) is expected  # runtime pattern

    def test_glob_is_not_exponential(self) -> None:
        pattern = GlobPattern("*a*a*a*a*a*a*a*a*b")
        started = time.perf_counter()
        assert pattern.match("a" * 5000) is False
        assert time.perf_counter() - started < 1.0

    def test_glob_errors(self) -> None:
        assert ev_error("i.glob('*')") == "no matching overload for 'glob' on (int, string)"
        assert ev_error("s.glob(p)", p=1) == "expected a string glob pattern, got int"
        error = compile_error("s.glob(1)")
        assert error.message == "expected a string glob pattern, got int"


class TestStartsWithAny:
    @pytest.mark.parametrize(
        ("text", "prefixes", "expected"),
        [
            ("read:issues", '["repo", "read:"]', True),
            ("repo:x", '["repo", "read:"]', True),
            ("write:x", '["repo", "read:"]', False),
            ("x", "[]", False),
            ("", '[""]', True),
        ],
    )
    def test_starts_with_any(self, text: str, prefixes: str, expected: bool) -> None:
        assert ev(f"x.startsWithAny({prefixes})", x=text) is expected

    def test_runtime_prefix_list(self) -> None:
        assert ev("s.startsWithAny(p)", p=["x", "he"]) is True
        assert ev("s.startsWithAny(p)", p=("x",)) is False

    def test_errors(self) -> None:
        assert ev_error("s.startsWithAny(p)", p=["a", 1]) == "expected a string prefix, got int"
        assert ev_error("s.startsWithAny(p)", p="he") == (
            "expected a list of string prefixes, got string"
        )
        assert ev_error("i.startsWithAny(['a'])") == (
            "no matching overload for 'startsWithAny' on (int, list)"
        )
        assert compile_error("s.startsWithAny([1])").message == "expected a string prefix, got int"


class TestInCidr:
    @pytest.mark.parametrize(
        ("address", "cidr", "expected"),
        [
            ("10.1.2.3", "10.0.0.0/8", True),
            ("11.1.2.3", "10.0.0.0/8", False),
            ("192.168.1.255", "192.168.1.0/24", True),
            ("192.168.2.0", "192.168.1.0/24", False),
            ("10.1.2.3", "10.1.2.3/32", True),
            ("10.1.2.3", "10.1.2.3", True),
            ("10.1.2.3", "10.1.2.99/24", True),  # host bits set in the network are accepted
            ("2001:db8::1", "2001:db8::/32", True),
            ("2001:db9::1", "2001:db8::/32", False),
            ("::1", "::1/128", True),
            ("10.1.2.3", "2001:db8::/32", False),  # version mismatch is simply false
            ("2001:db8::1", "10.0.0.0/8", False),
            ("::ffff:10.1.2.3", "10.0.0.0/8", True),  # IPv4-mapped IPv6
        ],
    )
    def test_in_cidr(self, address: str, cidr: str, expected: bool) -> None:
        assert ev(f"x.inCidr({cidr!r})", x=address) is expected
        assert ev(f"inCidr(x, {cidr!r})", x=address) is expected
        assert ev("inCidr(x, c)", x=address, c=cidr) is expected

    @pytest.mark.parametrize("address", ["10.1.2", "10.1.2.256", "not an ip", "", "10.1.2.3/8"])
    def test_bad_address_is_an_evaluation_error(self, address: str) -> None:
        assert ev_error('x.inCidr("10.0.0.0/8")', x=address) == f"invalid IP address: {address!r}"

    @pytest.mark.parametrize("cidr", ["10.0.0.0/33", "10.0.0/8", "2001:db8::/129", "x", ""])
    def test_bad_cidr(self, cidr: str) -> None:
        assert ev_error("ip.inCidr(c)", c=cidr) == f"invalid CIDR: {cidr!r}"
        error = compile_error(f"ip.inCidr({cidr!r})")
        assert (error.message, error.line, error.column) == (f"invalid CIDR: {cidr!r}", 1, 11)

    def test_non_string_address(self) -> None:
        assert ev_error('i.inCidr("10.0.0.0/8")') == (
            "no matching overload for 'inCidr' on (int, string)"
        )


class TestTimeOfDay:
    @pytest.mark.parametrize(
        ("instant", "zone", "expected"),
        [
            (datetime(2024, 7, 1, 20, 30, tzinfo=UTC), "UTC", "20:30"),
            (datetime(2024, 7, 1, 20, 30, tzinfo=UTC), "Europe/Berlin", "22:30"),  # CEST
            (datetime(2024, 1, 1, 20, 30, tzinfo=UTC), "Europe/Berlin", "21:30"),  # CET
            (datetime(2024, 7, 1, 2, 5, tzinfo=UTC), "America/Los_Angeles", "19:05"),
            (datetime(2024, 7, 1, 20, 30, tzinfo=UTC), "+05:30", "02:00"),
        ],
    )
    def test_time_of_day(self, instant: datetime, zone: str, expected: str) -> None:
        assert ev(f"t.timeOfDay({zone!r})", t=instant) == expected
        assert ev("t.timeOfDay(z)", t=instant, z=zone) == expected

    def test_time_of_day_compares_as_a_string(self) -> None:
        assert ev('now.timeOfDay("Europe/Berlin") >= "09:00"') is True

    def test_errors(self) -> None:
        assert ev_error('s.timeOfDay("UTC")') == "no matching overload for 'timeOfDay' on (string)"
        assert ev_error("now.timeOfDay(z)", z="Nowhere/Land") == "unknown time zone: 'Nowhere/Land'"
        error = compile_error('now.timeOfDay("Nowhere/Land")')
        assert (error.message, error.column) == ("unknown time zone: 'Nowhere/Land'", 15)
        assert compile_error("now.timeOfDay()").message == (
            "wrong number of arguments to 'timeOfDay': expected 1, got 0"
        )


class TestBetweenHours:
    @pytest.mark.parametrize(
        ("hour", "minute", "start", "end", "expected"),
        [
            (9, 0, "09:00", "17:00", True),  # start is inclusive
            (16, 59, "09:00", "17:00", True),
            (17, 0, "09:00", "17:00", False),  # end is exclusive
            (8, 59, "09:00", "17:00", False),
            (23, 0, "22:00", "06:00", True),  # wraps midnight
            (0, 0, "22:00", "06:00", True),
            (5, 59, "22:00", "06:00", True),
            (6, 0, "22:00", "06:00", False),
            (12, 0, "22:00", "06:00", False),
            (21, 59, "22:00", "06:00", False),
            (10, 0, "10:00", "10:00", False),  # empty window
            (23, 59, "00:00", "23:59", False),
            (0, 0, "00:00", "23:59", True),
        ],
    )
    def test_utc_windows(
        self, hour: int, minute: int, start: str, end: str, expected: bool
    ) -> None:
        instant = datetime(2024, 7, 1, hour, minute, 30, tzinfo=UTC)
        assert ev(f"t.betweenHours({start!r}, {end!r}, 'UTC')", t=instant) is expected
        assert ev("t.betweenHours(a, z, 'UTC')", t=instant, a=start, z=end) is expected

    def test_dst_zone(self) -> None:
        # 07:30 UTC is 07:30 in London in winter (GMT) but 08:30 in summer (BST, UTC+1).
        winter = datetime(2024, 1, 15, 7, 30, tzinfo=UTC)
        summer = datetime(2024, 7, 15, 7, 30, tzinfo=UTC)
        source = 't.betweenHours("08:00", "17:00", "Europe/London")'
        assert ev(source, t=winter) is False
        assert ev(source, t=summer) is True

    def test_dst_transition_day(self) -> None:
        # Europe/Berlin springs forward at 01:00 UTC on 2024-03-31 (02:00 -> 03:00 local).
        source = 't.betweenHours("22:00", "03:00", "Europe/Berlin")'
        assert ev(source, t=datetime(2024, 3, 31, 0, 59, tzinfo=UTC)) is True  # 01:59 CET
        assert ev(source, t=datetime(2024, 3, 31, 1, 0, tzinfo=UTC)) is False  # 03:00 CEST

    @pytest.mark.parametrize(
        ("arguments", "message", "column"),
        [
            (
                '"9:00", "17:00", "UTC"',
                "invalid time of day '9:00': expected HH:MM, 00:00-23:59",
                18,
            ),
            (
                '"09:00", "24:00", "UTC"',
                "invalid time of day '24:00': expected HH:MM, 00:00-23:59",
                27,
            ),
            (
                '"09:00", "17:60", "UTC"',
                "invalid time of day '17:60': expected HH:MM, 00:00-23:59",
                27,
            ),
            ('"09:00", "17:00", "Moon/Base"', "unknown time zone: 'Moon/Base'", 36),
            ('"09:00", 17, "UTC"', "expected a string time of day, got int", 27),
        ],
    )
    def test_compile_errors(self, arguments: str, message: str, column: int) -> None:
        error = compile_error(f"now.betweenHours({arguments})")
        assert (error.message, error.line, error.column) == (message, 1, column)

    def test_runtime_errors(self) -> None:
        assert ev_error("now.betweenHours(a, '10:00', 'UTC')", a="7am") == (
            "invalid time of day '7am': expected HH:MM, 00:00-23:59"
        )
        assert ev_error("now.betweenHours('09:00', '10:00', z)", z="") == "unknown time zone: ''"
        assert ev_error("s.betweenHours('09:00', '10:00', 'UTC')") == (
            "no matching overload for 'betweenHours' on (string)"
        )


def test_function_names_cover_the_registry_and_macros() -> None:
    assert set(FUNCTIONS) <= FUNCTION_NAMES
    expected = {
        "size", "startsWith", "endsWith", "contains", "matches", "lowerAscii", "upperAscii",
        "int", "uint", "double", "string", "bool", "bytes", "timestamp", "duration",
        "dyn", "type",
        "getFullYear", "getMonth", "getDayOfMonth", "getDate", "getDayOfWeek", "getDayOfYear",
        "getHours", "getMinutes", "getSeconds", "getMilliseconds",
        "glob", "globMatch", "startsWithAny", "inCidr", "timeOfDay", "betweenHours",
        "has", "all", "exists", "exists_one", "map", "filter",
    }  # fmt: skip
    extensions = set(EXTENSION_FUNCTIONS) | set(EXTENSION_MACRO_ARITIES)
    assert expected & extensions == {"string"}  # string(net.IP) extends the standard one
    assert expected | extensions == FUNCTION_NAMES


def test_helpers_doc_is_a_markdown_table_naming_every_helper() -> None:
    lines = HELPERS_DOC.strip().splitlines()
    assert lines[0].startswith("| Helper | Example | Meaning |")
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    for name in ("glob", "globMatch", "startsWithAny", "inCidr", "timeOfDay", "betweenHours"):
        assert f"`{name}" in HELPERS_DOC


def test_every_helper_has_a_docstring_with_an_example() -> None:
    for name in ("glob", "startsWithAny", "inCidr", "timeOfDay", "betweenHours"):
        doc = FUNCTIONS[name].impl.__doc__ or ""
        assert "Example" in doc, name
