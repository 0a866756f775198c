"""cel-go's strings library (``ext.Strings``): ``charAt``, ``indexOf``, ``lastIndexOf``,
``join``, ``split``, ``replace``, ``substring``, ``trim``, ``reverse``, ``format`` and
``strings.quote`` (``lowerAscii``/``upperAscii`` are in :mod:`policy_engine.cel.functions`).

Indexes count code points, as cel-go does; an index outside the string is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from policy_engine.cel.errors import CelEvaluationError
from policy_engine.cel.functions import (
    A,
    Function,
    format_double,
    format_duration,
    format_timestamp,
    function,
    sig,
    to_string,
)
from policy_engine.cel.types import INT, STRING, list_of
from policy_engine.cel.values import (
    CelType,
    allocate,
    check_budget,
    kind_of,
    no_overload,
    scan_text,
)


def _string(value: Any, name: str, *others: Any) -> str:
    if kind_of(value) == "string":
        return str(value)
    raise no_overload(name, value, *others)


def _int(value: Any, name: str, *others: Any) -> int:
    if kind_of(value) == "int":
        return int(value)
    raise no_overload(name, *others, value)


def char_at(text: Any, position: Any) -> str:
    """``s.charAt(i)``: the code point at ``i`` as a string; ``""`` at ``i == size(s)``."""
    s = _string(text, "charAt", position)
    i = _int(position, "charAt", s)
    if not 0 <= i <= len(s):
        raise CelEvaluationError(f"charAt: index out of range: {i}")
    return s[i : i + 1]


def index_of(text: Any, sub: Any, start: Any = 0) -> int:
    """``s.indexOf(t[, start])``: the first code point index of ``t`` at or after ``start``,
    or -1."""
    s = _string(text, "indexOf", sub)
    t = _string(sub, "indexOf", s)
    i = _int(start, "indexOf", s, t)
    if not 0 <= i <= len(s):
        raise CelEvaluationError(f"indexOf: index out of range: {i}")
    scan_text(s, "indexOf")
    return s.find(t, i)


def last_index_of(text: Any, sub: Any, *last: Any) -> int:
    """``s.lastIndexOf(t[, last])``: the last code point index of ``t`` starting at or before
    ``last`` (the end by default), or -1."""
    s = _string(text, "lastIndexOf", sub)
    t = _string(sub, "lastIndexOf", s)
    end = len(s) if not last else _int(last[0], "lastIndexOf", s, t)
    if not 0 <= end <= len(s):
        raise CelEvaluationError(f"lastIndexOf: index out of range: {end}")
    scan_text(s, "lastIndexOf")
    return s.rfind(t, 0, end + len(t))


def replace(text: Any, old: Any, new: Any, *limit: Any) -> str:
    """``s.replace(old, new[, n])``: at most ``n`` replacements (all when ``n`` < 0)."""
    s = _string(text, "replace", old, new)
    o = _string(old, "replace", s, new)
    n = _string(new, "replace", s, o)
    count = -1 if not limit else _int(limit[0], "replace", s, o, n)
    if len(n) > len(o):  # the result can be many times the operands: charged before
        found = s.count(o) + 1 if o == "" else s.count(o)
        allocate(len(s) + min(found, count if count >= 0 else found) * (len(n) - len(o)), "replace")
    return s.replace(o, n, count if count >= 0 else -1)


def split(text: Any, separator: Any, *limit: Any) -> list[str]:
    """``s.split(sep[, n])``: Go's ``strings.SplitN``: at most ``n`` parts (all when ``n``
    < 0, none when 0); an empty separator splits into code points."""
    s = _string(text, "split", separator)
    sep = _string(separator, "split", s)
    n = -1 if not limit else _int(limit[0], "split", s, sep)
    if n == 0:
        return []
    if sep == "":
        if 0 < n < len(s):  # only the first n - 1 code points are split off
            return [*s[: n - 1], s[n - 1 :]]
        return list(s)
    return s.split(sep, n - 1 if n > 0 else -1)


def substring(text: Any, start: Any, *end: Any) -> str:
    """``s.substring(start[, end])``: code points ``start`` to ``end`` (exclusive)."""
    s = _string(text, "substring", start, *end)
    begin = _int(start, "substring", s)
    stop = len(s) if not end else _int(end[0], "substring", s, begin)
    if not 0 <= begin <= len(s) or not 0 <= stop <= len(s) or stop < begin:
        raise CelEvaluationError(f"substring: index out of range: [{begin}:{stop}]")
    return s[begin:stop]


# Go's unicode.IsSpace: what cel-go's trim removes (Python's isspace differs: \x1c-\x1f).
_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + ("\u2028\u2029\u202f\u205f\u3000")
)


def trim(text: Any) -> str:
    """``s.trim()``: without leading and trailing Unicode white space."""
    return _string(text, "trim").strip(_SPACE)


def reverse(text: Any) -> str:
    """``s.reverse()``: the code points in reverse order."""
    return _string(text, "reverse")[::-1]


def join(items: Any, *separator: Any) -> str:
    """``list.join([sep])``: the strings of the list joined by ``sep`` (empty by default)."""
    if kind_of(items) != "list":
        raise no_overload("join", items, *separator)
    sep = "" if not separator else _string(separator[0], "join", items)
    check_budget("join")  # the checks below read every element
    for item in items:
        if kind_of(item) != "string":
            raise CelEvaluationError(f"join: the list holds a {kind_of(item)}, not a string")
    # Checked before: a list of one shared string (l.map(x, big)) joins to many copies.
    allocate(sum(map(len, items)) + len(sep) * max(len(items) - 1, 0), "join")
    return sep.join(items)


_QUOTED = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def quote(text: Any) -> str:
    """``strings.quote(s)``: ``s`` as a double-quoted CEL string literal."""
    return '"' + "".join(_QUOTED.get(c, c) for c in _string(text, "strings.quote")) + '"'


# --------------------------------------------------------------------------------------------
# format


_CLAUSE = re.compile(r"%(?:\.([0-9]+))?(.)?", re.S)


def _special_double(value: float) -> str | None:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return None


def _plain_double(value: float) -> str:
    """A double as %s prints it: as ``string(x)`` does, but NaN and Infinity by name."""
    special = _special_double(value)
    return special if special is not None else format_double(value)


def _as_string(value: Any, top: bool = True) -> str:
    kind = kind_of(value)
    if kind == "string":
        return str(value)
    if kind == "bytes":
        # As string(b): invalid UTF-8 is an error (cel-go), not U+FFFD, which would make
        # different bytes print alike.
        return to_string(value)
    if kind == "null_type":
        return "null"
    if kind == "bool":
        return "true" if value else "false"
    if kind in ("int", "uint"):
        return str(int(value))
    if kind == "double":
        return _plain_double(value)
    if kind == "timestamp":
        return format_timestamp(value)
    if kind == "duration":
        return format_duration(value)
    if kind == "type":
        return value.name if isinstance(value, CelType) else str(value)
    if kind == "list":
        return "[" + ", ".join(_charged_string(item) for item in value) + "]"
    if kind == "map":
        entries = sorted((_charged_string(k), _charged_string(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in entries) + "}"
    raise CelEvaluationError(f"format: string clause can only be used on strings, not {kind}")


def _charged_string(value: Any) -> str:
    """An element of a list or map printed by %s, charged as it is printed: the elements can
    all be one shared large value."""
    text = _as_string(value, False)
    allocate(len(text), "format")
    return text


def _integer(value: Any, clause: str, allow_bool: bool = False) -> int:
    kind = kind_of(value)
    if kind in ("int", "uint") or (allow_bool and kind == "bool"):
        return int(value)
    raise CelEvaluationError(f"format: the %{clause} clause cannot format a {kind}")


def _number(value: Any, clause: str) -> float | None:
    kind = kind_of(value)
    if kind in ("int", "uint", "double"):
        return float(value)
    raise CelEvaluationError(f"format: the %{clause} clause cannot format a {kind}")


def _format_one(clause: str, precision: str | None, value: Any) -> str:
    if clause == "s":
        return _as_string(value)
    if clause == "d":
        if kind_of(value) == "double":
            special = _special_double(value)
            if special is not None:
                return special
        return str(_integer(value, clause))
    if clause in ("f", "e"):
        number = _number(value, clause)
        assert number is not None
        special = _special_double(number)
        if special is not None:
            return special
        digits = 6 if precision is None else int(precision)
        allocate(digits, "format")  # before Python builds that many digits
        return format(number, f".{digits}{clause}")
    if clause == "b":
        return format(_integer(value, clause, allow_bool=True), "b")
    if clause == "o":
        return format(_integer(value, clause), "o")
    if clause in ("x", "X"):
        kind = kind_of(value)
        if kind == "string":
            text = str(value).encode("utf-8").hex()
        elif kind == "bytes":
            text = bytes(value).hex()
        else:
            text = format(_integer(value, clause), "x")
        return text.upper() if clause == "X" else text
    raise CelEvaluationError(f"format: unrecognized formatting clause %{clause}")


def format_string(template: Any, arguments: Any) -> str:
    """``s.format(list)``: ``%s`` (any value), ``%d`` (integers), ``%f`` and ``%e``
    (numbers, ``.N`` digits, 6 by default), ``%b``, ``%o``, ``%x``/``%X`` (integers; ``%x``
    also strings and bytes as hex), ``%%``; as cel-go formats them."""
    text = _string(template, "format", arguments)
    if kind_of(arguments) != "list":
        raise no_overload("format", text, arguments)
    out: list[str] = []
    position = 0
    used = 0
    for match in _CLAUSE.finditer(text):
        out.append(text[position : match.start()])
        position = match.end()
        precision, clause = match.groups()
        if clause == "%" and precision is None:
            out.append("%")
            continue
        if clause is None:
            raise CelEvaluationError("format: a formatting clause is missing its verb")
        if precision is not None and clause not in ("f", "e"):
            raise CelEvaluationError(f"format: no precision for the %{clause} clause")
        if used >= len(arguments):
            raise CelEvaluationError(f"format: index {used} out of range")
        out.append(_format_one(clause, precision, arguments[used]))
        used += 1
    out.append(text[position:])
    return "".join(out)


def _methods(
    name: str, impl: Callable[..., Any], signatures: Sequence[tuple[Any, ...]]
) -> Function:
    arities = tuple(sorted({len(arguments) for arguments, _ in signatures}))
    return function(name, impl, arities, "method", (), tuple(signatures))


FUNCTIONS: tuple[Function, ...] = (
    _methods("charAt", char_at, (sig(STRING, INT, STRING),)),
    _methods("indexOf", index_of, (sig(STRING, STRING, INT), sig(STRING, STRING, INT, INT))),
    _methods(
        "lastIndexOf", last_index_of, (sig(STRING, STRING, INT), sig(STRING, STRING, INT, INT))
    ),
    _methods(
        "replace",
        replace,
        (sig(STRING, STRING, STRING, STRING), sig(STRING, STRING, STRING, INT, STRING)),
    ),
    _methods(
        "split",
        split,
        (sig(STRING, STRING, list_of(STRING)), sig(STRING, STRING, INT, list_of(STRING))),
    ),
    _methods("substring", substring, (sig(STRING, INT, STRING), sig(STRING, INT, INT, STRING))),
    _methods("trim", trim, (sig(STRING, STRING),)),
    _methods("reverse", reverse, (sig(STRING, STRING),)),
    _methods("join", join, (sig(list_of(STRING), STRING), sig(list_of(STRING), STRING, STRING))),
    _methods("format", format_string, (sig(STRING, list_of(A), STRING),)),
    function("strings.quote", quote, (1,), "global", (), (sig(STRING, STRING),)),
)
