"""What a cache entry holds, and how it travels through Redis.

An entry is the serialized `CheckResponse` *template* of a decision (effect, reasons, policy
revision; no decision ID, request ID or cache flags), plus what a hit needs without parsing
it: the absolute instant it stops being valid, the effect and the first reason's code (for
the decisions metric).

In Redis the value is `version | expires_at (float64, unix seconds) | effect | code length |
code | template`. The expiry travels with the value because Redis' own TTL cannot be read back
by MGET: a Redis hit that fills the local level must not outlive a subject token's validity.
"""

from __future__ import annotations

import struct

_FORMAT_VERSION = 1
_HEADER = struct.Struct(">BdBB")  # version, expires_at, effect, len(code)


class Entry:
    """One cached decision: immutable once built, shared between threads."""

    __slots__ = ("code", "effect", "expires_at", "template")

    def __init__(self, template: bytes, expires_at: float, effect: int, code: str) -> None:
        self.template = template
        self.expires_at = expires_at  # unix seconds, by the servicer's clock
        self.effect = effect  # the proto Effect number
        self.code = code  # first reason's code, "" for an allow

    def with_expiry(self, expires_at: float) -> Entry:
        return Entry(self.template, expires_at, self.effect, self.code)

    def __repr__(self) -> str:
        return f"Entry(effect={self.effect}, code={self.code!r}, expires_at={self.expires_at})"


def encode(entry: Entry) -> bytes:
    code = entry.code.encode()
    return (
        _HEADER.pack(_FORMAT_VERSION, entry.expires_at, entry.effect, len(code))
        + code
        + (entry.template)
    )


def decode(value: bytes) -> Entry | None:
    """The entry, or None for anything this version did not write (treated as a miss)."""
    try:
        version, expires_at, effect, code_len = _HEADER.unpack_from(value)
        if version != _FORMAT_VERSION:
            return None
        start = _HEADER.size
        code = value[start : start + code_len].decode()
        return Entry(value[start + code_len :], expires_at, effect, code)
    except (struct.error, UnicodeDecodeError, TypeError):
        return None
