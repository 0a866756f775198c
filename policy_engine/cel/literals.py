"""Decoding of CEL literal tokens into Python values, once, at compile time.

The lark grammar only delimits literals; their meaning (escapes, raw strings, bytes, int64
range, ``u`` suffixes) is decoded here. Every function raises ``ValueError`` with a short
message; the compiler turns that into a positioned ``CelCompileError``.
"""

from __future__ import annotations

from policy_engine.cel.values import INT64_MAX, INT64_MIN, UINT64_MAX, UInt

_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "?": "?",
    '"': '"',
    "'": "'",
    "`": "`",
}
_HEX = frozenset("0123456789abcdefABCDEF")
_OCTAL = frozenset("01234567")


def parse_int(text: str) -> int:
    """An ``INT_LIT`` (decimal or hex, optionally negative), range-checked to int64."""
    body = text.lstrip("-")
    value = int(body, 16) if body[:2].lower() == "0x" else int(body, 10)
    if text.startswith("-"):
        value = -value
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"int literal out of range: {text}")
    return value


def parse_uint(text: str) -> UInt:
    """A ``UINT_LIT`` such as ``42u``: a :class:`~policy_engine.cel.values.UInt`."""
    if text.startswith("-"):
        raise ValueError(f"uint literal cannot be negative: {text}")
    body = text[:-1]
    value = int(body, 16) if body[:2].lower() == "0x" else int(body, 10)
    if value > UINT64_MAX:
        raise ValueError(f"uint literal out of range: {text}")
    return UInt(value)


def parse_string(text: str) -> str | bytes:
    """A quoted string or bytes literal: ``"a"``, ``'a'``, ``'''a'''``, ``r"\\d"``, ``b"\\xff"``.

    >>> parse_string(r'"caf\\u00e9\\n"'), parse_string(r"b'\\377'"), parse_string(r'r"\\d+"')
    ('café\\n', b'\\xff', '\\\\d+')
    """
    is_bytes = text[:1] in ("b", "B")
    if is_bytes:
        text = text[1:]
    is_raw = text[:1] in ("r", "R")
    if is_raw:
        text = text[1:]
    quote = text[:3] if text[:3] in ('"""', "'''") else text[:1]
    body = text[len(quote) : len(text) - len(quote)]
    if is_raw:
        return body.encode("utf-8") if is_bytes else body
    return _unescape_bytes(body) if is_bytes else _unescape_string(body)


def _escape_at(body: str, i: int, is_bytes: bool) -> tuple[int, int, bool]:
    """Decode the escape starting at ``body[i] == '\\'``.

    Returns ``(value, next_index, is_code_point)``: ``is_code_point`` is False when the value
    is an octet of a bytes literal (``\\xff``, ``\\377``) rather than a Unicode code point.
    """
    if i + 1 >= len(body):
        raise ValueError("incomplete escape sequence at end of string")
    char = body[i + 1]
    if char in _SIMPLE_ESCAPES:
        return ord(_SIMPLE_ESCAPES[char]), i + 2, True
    if char in "xX":
        digits = body[i + 2 : i + 4]
        if len(digits) != 2 or not set(digits) <= _HEX:
            raise ValueError("invalid \\x escape: expected two hex digits")
        return int(digits, 16), i + 4, not is_bytes
    if char in "uU":
        if is_bytes:
            raise ValueError(f"\\{char} escapes are not allowed in bytes literals")
        width = 4 if char == "u" else 8
        digits = body[i + 2 : i + 2 + width]
        if len(digits) != width or not set(digits) <= _HEX:
            raise ValueError(f"invalid \\{char} escape: expected {width} hex digits")
        return int(digits, 16), i + 2 + width, True
    if char in "0123":
        digits = body[i + 1 : i + 4]
        if len(digits) != 3 or not set(digits) <= _OCTAL:
            raise ValueError("invalid octal escape: expected three octal digits")
        return int(digits, 8), i + 4, not is_bytes
    raise ValueError(f"invalid escape sequence: \\{char}")


def _unescape_string(body: str) -> str:
    out: list[str] = []
    i = 0
    pending_high: int | None = None  # a high surrogate waiting for its low half
    while i < len(body):
        if body[i] != "\\":
            if pending_high is not None:
                raise ValueError("unpaired surrogate in \\u escape")
            out.append(body[i])
            i += 1
            continue
        code, i, _ = _escape_at(body, i, is_bytes=False)
        if 0xD800 <= code <= 0xDBFF:
            if pending_high is not None:
                raise ValueError("unpaired surrogate in \\u escape")
            pending_high = code
            continue
        if 0xDC00 <= code <= 0xDFFF:
            if pending_high is None:
                raise ValueError("unpaired surrogate in \\u escape")
            code = 0x10000 + ((pending_high - 0xD800) << 10) + (code - 0xDC00)
            pending_high = None
        elif pending_high is not None:
            raise ValueError("unpaired surrogate in \\u escape")
        if code > 0x10FFFF:
            raise ValueError("invalid code point in escape")
        out.append(chr(code))
    if pending_high is not None:
        raise ValueError("unpaired surrogate in \\u escape")
    return "".join(out)


def _unescape_bytes(body: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(body):
        if body[i] != "\\":
            out += body[i].encode("utf-8")
            i += 1
            continue
        value, i, is_code_point = _escape_at(body, i, is_bytes=True)
        if is_code_point:
            out += chr(value).encode("utf-8")
        else:
            out.append(value)
    return bytes(out)
