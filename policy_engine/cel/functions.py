"""CEL standard functions and the policy helpers operators use, over plain Python values.

Each function takes already-evaluated arguments (receiver first for the method form) and
either returns a plain value or raises :class:`CelEvaluationError`.

Some arguments are *prepared* before the function sees them: a regular expression is
compiled, a glob is split into segments, a CIDR is parsed, a time zone is resolved, an
``"HH:MM"`` string becomes minutes after midnight. The per-argument preparers live in
:data:`FUNCTIONS` next to each function. When the argument is a literal, the compiler runs the
preparer once at compile time - so a bad regex, glob, CIDR, zone or time of day in a policy is
a compile error - and the function is then called with the prepared object on every request.
When the argument is computed at run time, the preparer runs per call, backed by a small
bounded cache (the only mutable module-level state; it is lock-protected).
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import ROUND_DOWN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import re2

from policy_engine.cel.errors import CelEvaluationError
from policy_engine.cel.types import (
    BOOL,
    BYTES,
    DOUBLE,
    DURATION,
    DYN,
    INT,
    STRING,
    TIMESTAMP,
    TYPE,
    UINT,
    CelT,
    Signature,
    list_of,
    map_of,
    optional_of,
    param,
)
from policy_engine.cel.values import (
    FREE_TEXT_SCAN,
    INT64_MAX,
    INT64_MIN,
    NANOS_PER_SECOND,
    UINT64_MAX,
    Duration,
    Timestamp,
    as_utc,
    charged,
    duration_from_nanos,
    duration_nanos,
    kind_of,
    no_overload,
    scan_text,
    timestamp_from_nanos,
    timestamp_nanos,
    trunc_div,
    type_of,
    uint,
)

Converter = Callable[[Any], Any]
_UTC = UTC
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)


# --------------------------------------------------------------------------------------------
# Bounded cache for arguments prepared at run time


class _BoundedCache:
    """A small FIFO-bounded map from (kind, text) to a prepared object.

    Reads are plain dict lookups (atomic under the GIL); inserts and evictions take a lock.
    Failures are not cached, so a bad runtime pattern costs a compile attempt per call.
    """

    def __init__(self, max_entries: int) -> None:
        self._entries: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        try:
            return self._entries[key]
        except KeyError:
            pass
        value = build()
        with self._lock:
            while len(self._entries) >= self._max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = value
        return value


_PREPARED = _BoundedCache(max_entries=256)


def _require_string(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    raise CelEvaluationError(f"expected a string {what}, got {kind_of(value)}")


# --------------------------------------------------------------------------------------------
# Argument preparers (run at compile time for literals, per call otherwise)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def prepare_regex(pattern: Any) -> Any:
    """Compile a ``matches`` pattern with RE2, as the CEL spec prescribes.

    RE2 runs in time linear in the input, so no pattern an operator writes can hang the server
    on a hostile string (Python's backtracking ``re`` can, e.g. ``(a+)+$``). RE2 has no
    backreferences or lookaround; such patterns are refused at policy load.
    """
    text = _require_string(pattern, "regular expression")

    def build() -> Any:
        try:
            return re2.compile(text, _RE2_OPTIONS)
        except (re2.error, OverflowError, RecursionError) as exc:
            detail = exc.args[0] if exc.args else exc
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            raise CelEvaluationError(f"invalid regular expression {text!r}: {detail}") from None

    return _PREPARED.get(("regex", text), build)


class GlobPattern:
    """A shell-style glob: ``*`` matches any run (including ``:`` and ``/``), ``?`` one char.

    Everything else is literal, including ``[`` and ``]``. Matching splits the pattern at the
    stars and places each fixed-length segment leftmost-first, which is O(len(s) * len(pattern))
    in the worst case - unlike a backtracking ``.*`` regex, which is exponential in the
    number of stars on adversarial input.
    """

    __slots__ = ("_head", "_middle", "_min_length", "_tail", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        segments = [_Segment(part) for part in pattern.split("*")]
        self._head = segments[0]
        self._tail = segments[-1] if len(segments) > 1 else None
        self._middle = tuple(segments[1:-1])
        self._min_length = len(pattern) - pattern.count("*")

    def match(self, text: str) -> bool:
        """True when the whole of ``text`` matches the glob."""
        if self._tail is None:
            return self._head.fullmatch(text) is not None
        if len(text) < self._min_length or self._head.match(text) is None:
            return False
        position = self._head.pattern_length
        tail_start = len(text) - self._tail.pattern_length
        if self._tail.match(text, tail_start) is None:
            return False
        for segment in self._middle:
            found = segment.search(text, position, tail_start)
            if found is None:
                return False
            position = found.end()
        return position <= tail_start


class _Segment:
    """One star-free glob segment: a fixed-length regex where ``?`` is any character."""

    __slots__ = ("_regex", "pattern_length")

    def __init__(self, part: str) -> None:
        self._regex = re.compile("".join("." if c == "?" else re.escape(c) for c in part), re.S)
        self.pattern_length = len(part)

    def match(self, text: str, position: int = 0) -> re.Match[str] | None:
        return self._regex.match(text, position)

    def fullmatch(self, text: str) -> re.Match[str] | None:
        return self._regex.fullmatch(text)

    def search(self, text: str, start: int, end: int) -> re.Match[str] | None:
        return self._regex.search(text, start, end)


def prepare_glob(pattern: Any) -> GlobPattern:
    """Turn a glob string into a :class:`GlobPattern` (cached)."""
    text = _require_string(pattern, "glob pattern")
    return _PREPARED.get(("glob", text), lambda: GlobPattern(text))


def prepare_prefixes(prefixes: Any) -> tuple[str, ...]:
    """The list argument of ``startsWithAny``: every element must be a string."""
    if kind_of(prefixes) != "list":
        raise CelEvaluationError(f"expected a list of string prefixes, got {kind_of(prefixes)}")
    for prefix in prefixes:
        _require_string(prefix, "prefix")
    return tuple(prefixes)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def prepare_cidr(cidr: Any) -> IPNetwork:
    """Parse an IPv4 or IPv6 CIDR such as ``10.0.0.0/8`` (host bits may be set)."""
    text = _require_string(cidr, "CIDR")

    def build() -> IPNetwork:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise CelEvaluationError(f"invalid CIDR: {text!r}") from None

    return _PREPARED.get(("cidr", text), build)


# The sign may be left out (``"02:00"``), as cel-go and the conformance cases accept.
_FIXED_OFFSET = re.compile(r"([+-]?)([0-9]{2}):([0-9]{2})", re.ASCII)


def prepare_zone(name: Any) -> tzinfo:
    """An IANA time zone name (``Europe/Berlin``, ``UTC``) or a fixed offset (``+05:30``)."""
    text = _require_string(name, "time zone")

    def build() -> tzinfo:
        fixed = _FIXED_OFFSET.fullmatch(text)
        if fixed:
            sign, hours, minutes = fixed.groups()
            offset = timedelta(hours=int(hours), minutes=int(minutes))
            if offset >= timedelta(hours=24):
                raise CelEvaluationError(f"invalid time zone offset: {text!r}")
            return timezone(-offset if sign == "-" else offset)
        try:
            return ZoneInfo(text)
        except Exception:  # ZoneInfoNotFoundError, ValueError, IsADirectoryError, ...
            raise CelEvaluationError(f"unknown time zone: {text!r}") from None

    return _PREPARED.get(("zone", text), build)


_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])", re.ASCII)


def prepare_hhmm(value: Any) -> int:
    """An ``"HH:MM"`` time of day (00:00-23:59) as minutes after midnight."""
    text = _require_string(value, "time of day")
    parsed = _HHMM.fullmatch(text)
    if parsed is None:
        raise CelEvaluationError(f"invalid time of day {text!r}: expected HH:MM, 00:00-23:59")
    return int(parsed.group(1)) * 60 + int(parsed.group(2))


# --------------------------------------------------------------------------------------------
# Policy helpers (one small function each)


def glob_match(text: Any, glob: GlobPattern) -> bool:
    """``s.glob(pattern)`` / ``globMatch(s, pattern)``: whole-string shell-style match.

    ``*`` matches any run of characters including ``:`` and ``/``; ``?`` matches exactly one
    character; ``[`` and ``]`` are ordinary characters.

    Example: ``"repo:acme/api:read".glob("repo:acme/*:read")`` is ``true``.
    """
    if not isinstance(text, str):
        raise no_overload("glob", text, glob.pattern)
    scan_text(text, "glob")
    return glob.match(text)


def starts_with_any(text: Any, prefixes: tuple[str, ...]) -> bool:
    """``s.startsWithAny(["repo", "read:"])``: true when ``s`` starts with any prefix.

    Example: ``"read:issues".startsWithAny(["repo", "read:"])`` is ``true``; with an empty
    list it is always ``false``.
    """
    if not isinstance(text, str):
        raise no_overload("startsWithAny", text, list(prefixes))
    return text.startswith(prefixes)


def in_cidr(address: Any, network: IPNetwork) -> bool:
    """``ip.inCidr(cidr)`` / ``inCidr(ip, cidr)``: true when the address lies in the network.

    IPv4 and IPv6 are both supported; an IPv4 address is never inside an IPv6 network (except
    in its IPv4-mapped form ``::ffff:a.b.c.d``). An unparseable address is an error.

    Example: ``"10.1.2.3".inCidr("10.0.0.0/8")`` is ``true``.
    """
    if not isinstance(address, str):
        raise no_overload("inCidr", address, str(network))
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise CelEvaluationError(f"invalid IP address: {address!r}") from None
    if parsed.version != network.version:
        mapped = getattr(parsed, "ipv4_mapped", None)
        if mapped is None or network.version != 4:
            return False
        parsed = mapped
    return parsed in network


def _local_time(value: Any, zone: tzinfo | None, function: str) -> datetime:
    if type(value) is Timestamp:
        value = value.to_datetime()
    elif not isinstance(value, datetime):
        raise no_overload(function, value)
    try:
        return as_utc(value).astimezone(zone or _UTC)
    except (OverflowError, ValueError) as exc:
        raise CelEvaluationError(f"{function}: cannot convert timestamp: {exc}") from None


def time_of_day(timestamp: Any, zone: tzinfo) -> str:
    """``t.timeOfDay(tz)``: the local wall-clock time of ``t`` in ``tz`` as ``"HH:MM"``.

    Example: ``timestamp("2024-07-01T20:30:00Z").timeOfDay("Europe/Berlin")`` is ``"22:30"``.
    """
    local = _local_time(timestamp, zone, "timeOfDay")
    return f"{local.hour:02d}:{local.minute:02d}"


def between_hours(timestamp: Any, start: int, end: int, zone: tzinfo) -> bool:
    """``t.betweenHours(start, end, tz)``: local time of ``t`` in ``tz`` is in [start, end).

    ``start``/``end`` are ``"HH:MM"`` strings (the compiler hands them in as minutes after
    midnight). A window whose end is before its start wraps midnight: ``"22:00"`` to
    ``"06:00"`` covers 22:00-05:59. Equal bounds make an empty window.

    Example: ``now.betweenHours("09:00", "17:00", "America/New_York")``.
    """
    local = _local_time(timestamp, zone, "betweenHours")
    minute = local.hour * 60 + local.minute
    if start <= end:
        return start <= minute < end
    return minute >= start or minute < end


# --------------------------------------------------------------------------------------------
# Standard functions


def size(value: Any) -> int:
    """``size(x)`` / ``x.size()``: code points of a string, bytes, list or map entries."""
    kind = kind_of(value)
    if kind in ("string", "bytes", "list", "map"):
        return len(value)
    raise no_overload("size", value)


def _string_predicate(
    name: str, test: Callable[[str, str], bool], searches: bool = False
) -> Callable[[Any, Any], bool]:
    """``startsWith``/``endsWith``/``contains``: (string, string) -> bool; one that
    ``searches`` the whole text charges a long one (:func:`scan_text`)."""

    def predicate(text: Any, other: Any, searches: bool = searches) -> bool:
        if isinstance(text, str) and isinstance(other, str):
            if searches and len(text) > FREE_TEXT_SCAN:
                scan_text(text, name)
            return test(text, other)
        raise no_overload(name, text, other)

    predicate.__name__ = name
    predicate.__doc__ = f"``s.{name}(t)`` on strings."
    return predicate


starts_with = _string_predicate("startsWith", str.startswith)
ends_with = _string_predicate("endsWith", str.endswith)
contains = _string_predicate("contains", str.__contains__, searches=True)


def matches(text: Any, regex: Any) -> bool:
    """``s.matches(re)`` / ``matches(s, re)``: ``re.search`` semantics (anchor explicitly)."""
    if not isinstance(text, str):
        raise no_overload("matches", text, regex.pattern)
    scan_text(text, "matches")
    return regex.search(text) is not None


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _ascii_case(name: str, table: dict[int, int]) -> Callable[[Any], str]:
    """``lowerAscii``/``upperAscii``: change only ASCII letters (no locale, no Unicode)."""

    def convert(text: Any) -> str:
        if isinstance(text, str):
            return text.translate(table)
        raise no_overload(name, text)

    convert.__name__ = name
    return convert


lower_ascii = _ascii_case("lowerAscii", _LOWER)
upper_ascii = _ascii_case("upperAscii", _UPPER)

_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_UINT_TEXT = re.compile(r"\+?[0-9]+", re.ASCII)
_DOUBLE_TEXT = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)",
    re.ASCII | re.IGNORECASE,
)


def _double_to_int(value: float, low: int, high: int, name: str) -> int:
    """Truncate toward zero; the double must lie strictly inside (low - 1, high + 1), where
    the bounds themselves, rounded to doubles, are out of range (cel-go's rule: 2^63 and
    -2^63 as doubles are no int64)."""
    if value != value or not low < value < high:
        raise CelEvaluationError(f"{name}() out of range: {value!r}")
    return int(value)


def to_int(value: Any) -> int:
    """``int(x)`` from int, uint, double (truncated), decimal string or timestamp (epoch s)."""
    kind = kind_of(value)
    if kind == "int" or kind == "uint":
        if INT64_MIN <= value <= INT64_MAX:
            return int(value)
        raise CelEvaluationError(f"int() out of range: {value}")
    if kind == "double":
        return _double_to_int(value, INT64_MIN, INT64_MAX + 1, "int")
    if kind == "string":
        if _INT_TEXT.fullmatch(value):
            return to_int(int(value))
        raise CelEvaluationError(f"cannot convert {value!r} to int")
    if kind == "timestamp":
        return timestamp_nanos(value) // NANOS_PER_SECOND
    raise no_overload("int", value)


def to_uint(value: Any) -> int:
    """``uint(x)`` from int, uint, double (truncated) or a decimal string: 0..2^64-1."""
    kind = kind_of(value)
    if kind == "int" or kind == "uint":
        if 0 <= value <= UINT64_MAX:
            return uint(int(value))
        raise CelEvaluationError(f"uint() out of range: {value}")
    if kind == "double":
        # cel-go refuses any negative double (uint(-0.5) is an error, not 0); -0.0 is 0.
        if value < 0:
            raise CelEvaluationError(f"uint() out of range: {value!r}")
        return uint(_double_to_int(value, -1, UINT64_MAX + 1, "uint"))
    if kind == "string":
        if _UINT_TEXT.fullmatch(value):
            return to_uint(int(value))
        raise CelEvaluationError(f"cannot convert {value!r} to uint")
    raise no_overload("uint", value)


def to_double(value: Any) -> float:
    """``double(x)`` from int, uint, double or a decimal string (``"1.5"``, ``"1e3"``)."""
    kind = kind_of(value)
    if kind in ("int", "uint", "double"):
        return float(value)
    if kind == "string":
        if _DOUBLE_TEXT.fullmatch(value):
            return float(value)
        raise CelEvaluationError(f"cannot convert {value!r} to double")
    raise no_overload("double", value)


def format_double(value: float) -> str:
    """Format a double like Go's ``%g`` (what CEL's ``string(double)`` produces).

    >>> [format_double(v) for v in (1.5, 2.0, 1e6, 123456.0, 1e-5, 0.0001)]
    ['1.5', '2', '1e+06', '123456', '1e-05', '0.0001']
    """
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if str(value).startswith("-") else "0"
    sign, digit_tuple, exponent = Decimal(repr(value)).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + int(exponent)  # digits before the decimal point
    prefix = "-" if sign else ""
    if point - 1 < -4 or point - 1 >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        exp = point - 1
        return f"{prefix}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return prefix + digits + "0" * (point - len(digits))
    return f"{prefix}{digits[:point]}.{digits[point:]}"


def format_timestamp(value: Any) -> str:
    """RFC 3339 in UTC, fractional seconds to the nanosecond without trailing zeros, e.g.
    ``2024-01-02T03:04:05Z``, ``9999-12-31T23:59:59.999999999Z``."""
    nanos = timestamp_nanos(value)
    seconds, fraction = divmod(nanos, NANOS_PER_SECOND)
    text = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if len(text) < 19:  # strftime drops leading zeros of years before 1000 on some libcs
        text = text.zfill(19)
    if fraction:
        text += f".{fraction:09d}".rstrip("0")
    return text + "Z"


def format_duration(value: Any) -> str:
    """Seconds with a trailing ``s``, as CEL prints durations: ``90s``, ``1.5s``, ``-0.001s``."""
    seconds = Decimal(duration_nanos(value)).scaleb(-9).normalize()
    return f"{seconds:f}s"


def to_string(value: Any) -> str:
    """``string(x)`` from string, int, uint, double, bool, bytes (UTF-8), timestamp, duration."""
    kind = kind_of(value)
    if kind == "string":
        return str(value)
    if kind == "int" or kind == "uint":
        return str(int(value))
    if kind == "double":
        return format_double(value)
    if kind == "bool":
        return "true" if value else "false"
    if kind == "bytes":
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise CelEvaluationError("bytes are not valid UTF-8") from None
    if kind == "timestamp":
        return format_timestamp(value)
    if kind == "duration":
        return format_duration(value)
    raise no_overload("string", value)


_BOOL_TEXT = {
    **dict.fromkeys(("1", "t", "T", "true", "TRUE", "True"), True),
    **dict.fromkeys(("0", "f", "F", "false", "FALSE", "False"), False),
}


def to_bool(value: Any) -> bool:
    """``bool(x)`` from bool or one of the strings ``true``/``false``/``t``/``f``/``1``/``0``."""
    kind = kind_of(value)
    if kind == "bool":
        return bool(value)
    if kind == "string":
        parsed = _BOOL_TEXT.get(value)
        if parsed is not None:
            return parsed
        raise CelEvaluationError(f"cannot convert {value!r} to bool")
    raise no_overload("bool", value)


def to_bytes(value: Any) -> bytes:
    """``bytes(x)`` from bytes or a string (UTF-8 encoded)."""
    kind = kind_of(value)
    if kind == "bytes":
        return bytes(value)
    if kind == "string":
        return str(value).encode("utf-8")
    raise no_overload("bytes", value)


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    # RFC 3339's offset is 00:00..23:59, as the reference runtimes parse it (+24:00 or
    # +99:00 would move the instant by days).
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([01][0-9]|2[0-3]):([0-5][0-9]))",
    re.ASCII,
)


def parse_timestamp(text: str) -> Timestamp:
    """Parse RFC 3339 (``2024-01-02T03:04:05.5+01:00``), to the nanosecond; the instant must
    lie in 0001-01-01T00:00:00Z..9999-12-31T23:59:59.999999999Z."""
    parsed = _RFC3339.fullmatch(text)
    if parsed is None:
        raise CelEvaluationError(f"invalid timestamp {text!r}: expected RFC 3339")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = parsed.groups()
    try:
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=_UTC
        )
    except ValueError as exc:
        raise CelEvaluationError(f"invalid timestamp {text!r}: {exc}") from None
    offset = 0
    if not zulu:
        offset = (int(off_h) * 60 + int(off_m)) * 60 * (-1 if sign == "-" else 1)
    seconds = (local - _EPOCH) // timedelta(seconds=1) - offset
    nanos = seconds * NANOS_PER_SECOND + int((fraction or "0").ljust(9, "0"))
    return timestamp_from_nanos(nanos)


def to_timestamp(value: Any) -> Timestamp:
    """``timestamp(x)`` from an RFC 3339 string, a timestamp, or int seconds since the epoch."""
    kind = kind_of(value)
    if kind == "string":
        return parse_timestamp(value)
    if kind == "timestamp":
        return Timestamp(timestamp_nanos(value))
    if kind == "int":
        return timestamp_from_nanos(value * NANOS_PER_SECOND)
    raise no_overload("timestamp", value)


_DURATION_UNITS_NS = {
    "h": 3_600_000_000_000,
    "m": 60_000_000_000,
    "s": 1_000_000_000,
    "ms": 1_000_000,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ns": 1,
}
_DURATION_PART = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:h|ms|m|s|us|µs|μs|ns)"
_DURATION_TEXT = re.compile(rf"([+-]?)((?:{_DURATION_PART})+|0)", re.ASCII)
_DURATION_PARTS = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(h|ms|m|s|us|µs|μs|ns)")


def parse_duration(text: str) -> Duration:
    """Parse a Go-style duration: ``"1h30m"``, ``"90s"``, ``"1.5h"``, ``"-2m"``, ``"250ms"``,
    to the nanosecond (finer fractions are truncated); at most int64 nanoseconds."""
    parsed = _DURATION_TEXT.fullmatch(text)
    if parsed is None:
        raise CelEvaluationError(f"invalid duration {text!r}")
    nanos = sum(
        (Decimal(number) * _DURATION_UNITS_NS[unit])
        for number, unit in _DURATION_PARTS.findall(parsed.group(2))
    )
    whole = int(Decimal(nanos).to_integral_value(rounding=ROUND_DOWN))
    try:
        return duration_from_nanos(-whole if parsed.group(1) == "-" else whole)
    except CelEvaluationError:
        raise CelEvaluationError(f"duration out of range: {text!r}") from None


def to_duration(value: Any) -> Duration:
    """``duration(x)`` from a duration string or a duration."""
    kind = kind_of(value)
    if kind == "string":
        return parse_duration(value)
    if kind == "duration":
        return Duration(duration_nanos(value))
    raise no_overload("duration", value)


def dyn(value: Any) -> Any:
    """``dyn(x)``: x itself (it only tells a type checker to treat x as dynamic)."""
    return value


def _timestamp_getter(
    name: str, extract: Callable[[datetime], int], duration_unit_ns: int | None
) -> Callable[..., int]:
    """A ``t.getX([tz])`` accessor; some (hours, minutes, ...) also apply to durations.

    On a duration the result is the total in that unit, truncated toward zero (as CEL does),
    except ``getMilliseconds``: the 0-999 milliseconds part, as the spec says.
    """

    def getter(value: Any, zone: tzinfo | None = None) -> int:
        if isinstance(value, (datetime, Timestamp)):
            if name == "getMilliseconds":  # a zone shifts whole minutes: no effect on this
                _local_time(value, zone, name)
                return (timestamp_nanos(value) // 1_000_000) % 1000
            return extract(_local_time(value, zone, name))
        if duration_unit_ns is not None and kind_of(value) == "duration" and zone is None:
            total = trunc_div(duration_nanos(value), duration_unit_ns)
            if name == "getMilliseconds":
                return total - trunc_div(total, 1000) * 1000
            return total
        raise no_overload(name, value) if zone is None else no_overload(name, value, "string")

    getter.__name__ = name
    getter.__doc__ = f"``t.{name}()`` / ``t.{name}(tz)``."
    return getter


_TIMESTAMP_FIELDS: dict[str, tuple[Callable[[datetime], int], int | None]] = {
    "getFullYear": (lambda d: d.year, None),
    "getMonth": (lambda d: d.month - 1, None),
    "getDayOfMonth": (lambda d: d.day - 1, None),
    "getDate": (lambda d: d.day, None),
    "getDayOfWeek": (lambda d: (d.weekday() + 1) % 7, None),
    "getDayOfYear": (lambda d: d.timetuple().tm_yday - 1, None),
    "getHours": (lambda d: d.hour, 3_600 * NANOS_PER_SECOND),
    "getMinutes": (lambda d: d.minute, 60 * NANOS_PER_SECOND),
    "getSeconds": (lambda d: d.second, NANOS_PER_SECOND),
    "getMilliseconds": (lambda d: d.microsecond // 1000, 1_000_000),
}
_TIMESTAMP_GETTERS = {
    name: _timestamp_getter(name, extract, unit)
    for name, (extract, unit) in _TIMESTAMP_FIELDS.items()
}


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Function:
    """How a CEL function may be called and what implements it.

    ``arities`` count every positional argument including the receiver of a method call;
    ``preparers[i]`` (when not None) converts argument ``i`` before ``impl`` sees it;
    ``signatures`` are its overloads (receiver first) as the load-time check knows them;
    a ``lazy`` function gets its last argument as a thunk to call only if it needs it
    (cel-go's short-circuiting ``or``/``orValue``); ``check``, when set, types a call in
    place of ``signatures`` (argument types -> result type, None when refused: variadic
    functions such as ``math.greatest``).
    """

    name: str
    impl: Callable[..., Any]
    arities: frozenset[int]
    as_method: bool
    as_global: bool
    preparers: tuple[Converter | None, ...] = ()
    signatures: tuple[Signature, ...] = ()
    lazy: bool = False
    check: Callable[[Sequence[CelT]], CelT | None] | None = None


def function(
    name: str,
    impl: Callable[..., Any],
    arities: tuple[int, ...],
    style: str,
    preparers: tuple[Converter | None, ...] = (),
    signatures: tuple[Signature, ...] = (),
    lazy: bool = False,
) -> Function:
    """A :class:`Function`; ``style`` is ``method``, ``global`` or ``both``. One that can
    build a string, bytes or list charges its result to the evaluation's allocation budget
    (:func:`policy_engine.cel.values.allocate`)."""
    if any(result.kind in _BUILT_KINDS for _, result in signatures):
        impl = charged(impl, name)
    return Function(
        name=name,
        impl=impl,
        arities=frozenset(arities),
        as_method=style in ("method", "both"),
        as_global=style in ("global", "both"),
        preparers=preparers,
        signatures=signatures,
        lazy=lazy,
    )


_BUILT_KINDS = frozenset({"string", "bytes", "list"})


def sig(*types: CelT) -> Signature:
    """An overload: argument types, then the result type (``sig(STRING, INT)``)."""
    return tuple(types[:-1]), types[-1]


A, K, V = param("A"), param("K"), param("V")
_A, _K, _V = A, K, V


def _from(result: CelT, *arguments: CelT) -> tuple[Signature, ...]:
    """One-argument overloads from each of ``arguments`` to ``result`` (conversions)."""
    return tuple(sig(argument, result) for argument in arguments)


_NUMBERS = (INT, UINT, DOUBLE)
_ORDERED = (BOOL, INT, UINT, DOUBLE, STRING, BYTES, TIMESTAMP, DURATION)
_ORDERING = (
    *(sig(t, t, BOOL) for t in _ORDERED),
    *(sig(a, b, BOOL) for a in _NUMBERS for b in _NUMBERS if a != b),
)
#: The operators' overloads, by CEL symbol (unary minus is ``-_``, not ``!_``).
OPERATOR_SIGNATURES: Mapping[str, tuple[Signature, ...]] = {
    "+": (
        *(sig(t, t, t) for t in (INT, UINT, DOUBLE, STRING, BYTES, DURATION)),
        sig(list_of(_A), list_of(_A), list_of(_A)),
        sig(TIMESTAMP, DURATION, TIMESTAMP),
        sig(DURATION, TIMESTAMP, TIMESTAMP),
    ),
    "-": (
        *(sig(t, t, t) for t in (INT, UINT, DOUBLE, DURATION)),
        sig(TIMESTAMP, TIMESTAMP, DURATION),
        sig(TIMESTAMP, DURATION, TIMESTAMP),
    ),
    "*": tuple(sig(t, t, t) for t in _NUMBERS),
    "/": tuple(sig(t, t, t) for t in _NUMBERS),
    "%": (sig(INT, INT, INT), sig(UINT, UINT, UINT)),
    "<": _ORDERING,
    "<=": _ORDERING,
    ">": _ORDERING,
    ">=": _ORDERING,
    "==": (sig(_A, _A, BOOL),),
    "!=": (sig(_A, _A, BOOL),),
    "in": (sig(_A, list_of(_A), BOOL), sig(_A, map_of(_A, _V), BOOL)),
    "!_": (sig(BOOL, BOOL),),
    "-_": (sig(INT, INT), sig(DOUBLE, DOUBLE)),
    "_[_]": (
        sig(list_of(_A), INT, _A),
        sig(list_of(_A), UINT, _A),
        sig(list_of(_A), DOUBLE, _A),
        sig(map_of(_K, _V), _K, _V),
        # An optional container indexes to an optional (cel-go's optionals library).
        sig(optional_of(list_of(_A)), INT, optional_of(_A)),
        sig(optional_of(map_of(_K, _V)), _K, optional_of(_V)),
    ),
    "_?_:_": (sig(BOOL, _A, _A, _A),),
    "&&": (sig(BOOL, BOOL, BOOL),),
    "||": (sig(BOOL, BOOL, BOOL),),
}


FUNCTIONS: Mapping[str, Function] = {
    f.name: f
    for f in (
        function(
            "size",
            size,
            (1,),
            "both",
            (),
            (sig(STRING, INT), sig(BYTES, INT), sig(list_of(_A), INT), sig(map_of(_K, _V), INT)),
        ),
        function("startsWith", starts_with, (2,), "method", (), (sig(STRING, STRING, BOOL),)),
        function("endsWith", ends_with, (2,), "method", (), (sig(STRING, STRING, BOOL),)),
        function("contains", contains, (2,), "method", (), (sig(STRING, STRING, BOOL),)),
        function(
            "matches", matches, (2,), "both", (None, prepare_regex), (sig(STRING, STRING, BOOL),)
        ),
        function("lowerAscii", lower_ascii, (1,), "method", (), (sig(STRING, STRING),)),
        function("upperAscii", upper_ascii, (1,), "method", (), (sig(STRING, STRING),)),
        function(
            "int", to_int, (1,), "global", (), _from(INT, INT, UINT, DOUBLE, STRING, TIMESTAMP)
        ),
        function("uint", to_uint, (1,), "global", (), _from(UINT, INT, UINT, DOUBLE, STRING)),
        function("double", to_double, (1,), "global", (), _from(DOUBLE, INT, UINT, DOUBLE, STRING)),
        function("string", to_string, (1,), "global", (), _from(STRING, *_ORDERED)),
        function("bool", to_bool, (1,), "global", (), _from(BOOL, BOOL, STRING)),
        function("bytes", to_bytes, (1,), "global", (), _from(BYTES, BYTES, STRING)),
        function(
            "timestamp", to_timestamp, (1,), "global", (), _from(TIMESTAMP, STRING, TIMESTAMP, INT)
        ),
        function("duration", to_duration, (1,), "global", (), _from(DURATION, STRING, DURATION)),
        function("dyn", dyn, (1,), "global", (), (sig(_A, DYN),)),
        function("type", type_of, (1,), "global", (), (sig(_A, TYPE),)),
        *(
            function(
                name,
                getter,
                (1, 2),
                "method",
                (None, prepare_zone),
                (
                    sig(TIMESTAMP, INT),
                    sig(TIMESTAMP, STRING, INT),
                    *((sig(DURATION, INT),) if _TIMESTAMP_FIELDS[name][1] else ()),
                ),
            )
            for name, getter in _TIMESTAMP_GETTERS.items()
        ),
        function(
            "glob", glob_match, (2,), "method", (None, prepare_glob), (sig(STRING, STRING, BOOL),)
        ),
        function(
            "globMatch",
            glob_match,
            (2,),
            "global",
            (None, prepare_glob),
            (sig(STRING, STRING, BOOL),),
        ),
        function(
            "startsWithAny",
            starts_with_any,
            (2,),
            "method",
            (None, prepare_prefixes),
            (sig(STRING, list_of(STRING), BOOL),),
        ),
        function(
            "inCidr", in_cidr, (2,), "both", (None, prepare_cidr), (sig(STRING, STRING, BOOL),)
        ),
        function(
            "timeOfDay",
            time_of_day,
            (2,),
            "method",
            (None, prepare_zone),
            (sig(TIMESTAMP, STRING, STRING),),
        ),
        function(
            "betweenHours",
            between_hours,
            (4,),
            "method",
            (None, prepare_hhmm, prepare_hhmm, prepare_zone),
            (sig(TIMESTAMP, STRING, STRING, STRING, BOOL),),
        ),
    )
}

#: Macros: expanded by the compiler rather than called. ``has`` is global, the rest methods.
MACRO_ARITIES: Mapping[str, tuple[int, ...]] = {
    "has": (1,),
    "all": (2,),
    "exists": (2,),
    "exists_one": (2,),
    "map": (2, 3),
    "filter": (2,),
}

FUNCTION_NAMES: frozenset[str] = frozenset(FUNCTIONS) | frozenset(MACRO_ARITIES)

HELPERS_DOC: str = """\
| Helper | Example | Meaning |
|---|---|---|
| `glob` / `globMatch` | `scope.glob("repo:*:read")`, `globMatch(scope, "repo:?")` | \
Whole-string shell-style match: `*` is any run of characters (including `:` and `/`), \
`?` one character; `[` and `]` are literal. |
| `startsWithAny` | `scope.startsWithAny(["repo", "read:"])` | \
True if the string starts with any of the prefixes. |
| `inCidr` | `context.client_ip.inCidr("10.0.0.0/8")`, `inCidr(ip, "2001:db8::/32")` | \
True if the IPv4/IPv6 address is inside the network; a malformed address is an error. |
| `timeOfDay` | `now.timeOfDay("Europe/Berlin") >= "09:00"` | \
Local wall-clock time in the IANA zone (or `+HH:MM` offset) as `"HH:MM"`. |
| `betweenHours` | `now.betweenHours("22:00", "06:00", "Europe/Berlin")` | \
True if local time is in [start, end); a window ending before it starts wraps midnight. |
| `getHours` etc. | `now.getDayOfWeek("America/New_York") in [1, 2, 3, 4, 5]` | \
Standard CEL timestamp accessors with an optional zone (`getDayOfWeek`: 0 = Sunday). |
"""
