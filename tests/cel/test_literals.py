"""Literals: numbers, strings with every escape, bytes, bool, null, lists and maps."""

from __future__ import annotations

import math
from types import MappingProxyType

import pytest

from policy_engine.cel.values import UInt
from tests.cel.support import compile_error, ev, ev_error


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("0", 0),
        ("42", 42),
        ("-42", -42),
        ("007", 7),
        ("0x1F", 31),
        ("0xfF", 255),
        ("-0x10", -16),
        ("9223372036854775807", 2**63 - 1),
        ("-9223372036854775808", -(2**63)),
        ("1u", UInt(1)),
        ("0x10u", UInt(16)),
        ("18446744073709551615u", UInt(2**64 - 1)),
        ("1.5", 1.5),
        ("1.", 1.0),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("2.5E-1", 0.25),
        ("-1.5", -1.5),
    ],
)
def test_numbers(source: str, expected: float) -> None:
    result = ev(source)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("9223372036854775808", "int literal out of range: 9223372036854775808"),
        ("-9223372036854775809", "int literal out of range: -9223372036854775809"),
        ("18446744073709551616u", "uint literal out of range: 18446744073709551616u"),
        ("-1u", "uint literal cannot be negative: -1u"),
    ],
)
def test_number_literal_errors(source: str, message: str) -> None:
    error = compile_error(f"1 + {source}")
    assert error.message == message
    assert (error.line, error.column) == (1, 5)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('"abc"', "abc"),
        ("'abc'", "abc"),
        ("'say \"hi\"'", 'say "hi"'),
        ('"it\'s"', "it's"),
        ('"""multi\nline"""', "multi\nline"),
        ("'''x''x'''", "x''x"),
        (r'"\a\b\f\n\r\t\v"', "\a\b\f\n\r\t\v"),
        (r'"\\ \? \" \' \`"', "\\ ? \" ' `"),
        (r'"\x41\X42"', "AB"),
        (r'"\101\060"', "A0"),
        (r'"\u00e9"', "é"),
        (r'"\U0001F600"', "\U0001f600"),
        (r'"\ud83d\ude00"', "\U0001f600"),
        (r'"\303\277"', "Ã¿"),
        (r'"\377"', "ÿ"),
        ('"é"', "é"),
        (r'r"\d+\n"', r"\d+\n"),
        (r"R'\t'", r"\t"),
        (r'r"""a\b"""', r"a\b"),
        ('""', ""),
    ],
)
def test_strings(source: str, expected: str) -> None:
    assert ev(source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('b"abc"', b"abc"),
        ("B'abc'", b"abc"),
        ('b"ÿ"', b"\xc3\xbf"),
        (r'b"\303\277"', b"\xc3\xbf"),
        (r'b"\377"', b"\xff"),
        (r'b"\xFF"', b"\xff"),
        (r'b"\n"', b"\n"),
        (r'br"\n"', b"\\n"),
        ('b"""x"""', b"x"),
    ],
)
def test_bytes(source: str, expected: bytes) -> None:
    assert ev(source) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (r'"\q"', r"invalid escape sequence: \q"),
        (r'"\x4"', r"invalid \x escape: expected two hex digits"),
        (r'"\u12"', r"invalid \u escape: expected 4 hex digits"),
        (r'"\U0011FFFF"', "invalid code point in escape"),
        (r'"\ud83d"', r"unpaired surrogate in \u escape"),
        (r'"\ude00x"', r"unpaired surrogate in \u escape"),
        (r'"\400"', r"invalid escape sequence: \4"),
        (r'"\19"', "invalid octal escape: expected three octal digits"),
        (r'b"\u0041"', r"\u escapes are not allowed in bytes literals"),
    ],
)
def test_string_literal_errors(source: str, message: str) -> None:
    error = compile_error(f"s ==\n  {source}")
    assert error.message == message
    assert (error.line, error.column) == (2, 3)


def test_bool_and_null() -> None:
    assert ev("true") is True
    assert ev("false") is False
    assert ev("null") is None


def test_lists() -> None:
    assert list(ev("[]")) == []
    assert list(ev("[1, 'a', [true], null]")) == [1, "a", (True,), None]
    assert ev("[i, s]") == [7, "hello"]
    assert ev("[1, 2][1]") == 2


def test_constant_containers_are_immutable() -> None:
    # Constants are shared by every evaluation, so they must not be mutable by callers.
    assert isinstance(ev("[1, 2]"), tuple)
    assert isinstance(ev('{"a": 1}'), MappingProxyType)


def test_maps() -> None:
    assert dict(ev('{"a": 1, "b": [2]}')) == {"a": 1, "b": (2,)}
    assert ev("{s: i, 1: true, false: n}") == {"hello": 7, 1: True, False: None}
    assert ev('{"a": {"b": 2}}.a.b') == 2
    assert dict(ev("{}")) == {}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('{"a": 1, "a": 2}', "duplicate map key: 'a'"),
        ("{s: 1, s: 2}", "duplicate map key: 'hello'"),
        ("{1: 1, 1.0: 2}", "unsupported map key type: double"),
        ("{f: 1}", "unsupported map key type: double"),
        ("{n: 1}", "unsupported map key type: null_type"),
        ("{l: 1}", "unsupported map key type: list"),
        ("{1: 'a', true: 'b'}", "map key True collides with a bool/int key"),
    ],
)
def test_map_literal_errors(source: str, message: str) -> None:
    assert ev_error(source) == message


def test_float_literal_overflow_is_infinity() -> None:
    assert ev("1e400") == math.inf
