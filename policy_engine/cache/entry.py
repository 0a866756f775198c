"""What a cache entry holds, and how it travels through Redis.

An entry is the serialized `CheckResponse` *template* of a decision (effect, reasons, policy
revision; no decision ID, request ID or cache flags), plus what a hit needs without parsing
it: the absolute instant it stops being valid, the effect and the first reason's code (for
the decisions metric).

In Redis the value is `version | expires_at (float64, unix seconds) | effect | code length |
tag (16 bytes) | code | template`. The expiry travels with the value because Redis' own TTL
cannot be read back by MGET: a Redis hit that fills the local level must not outlive a subject
token's validity. The tag is a BLAKE2b digest of the cache key and everything after the tag,
keyed with `redis_signing_key` when one is set: a value that is corrupted, written under
another key, or (with a key) forged by anyone who can write to Redis, fails the check and is
a miss, never an answer.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

_FORMAT_VERSION = 2
_HEADER = struct.Struct(">BdBB")  # version, expires_at, effect, len(code)
_TAG_BYTES = 16


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


class Codec:
    """Encodes entries for Redis and checks them on the way back."""

    __slots__ = ("_secret",)

    def __init__(self, signing_key: str = "") -> None:
        # BLAKE2b takes a key of up to 64 bytes; a longer secret is hashed down first.
        secret = signing_key.encode()
        self._secret = secret if len(secret) <= 64 else hashlib.blake2b(secret).digest()

    def _tag(self, key: str, header: bytes, body: bytes) -> bytes:
        mac = hashlib.blake2b(digest_size=_TAG_BYTES, key=self._secret)
        mac.update(key.encode())
        mac.update(b"\0")
        mac.update(header)
        mac.update(body)
        return mac.digest()

    def encode(self, key: str, entry: Entry) -> bytes:
        code = entry.code.encode()
        header = _HEADER.pack(_FORMAT_VERSION, entry.expires_at, entry.effect, len(code))
        body = code + entry.template
        return header + self._tag(key, header, body) + body

    def decode(self, key: str, value: bytes) -> Entry | None:
        """The entry, or None for anything this codec did not write under this key."""
        try:
            version, expires_at, effect, code_len = _HEADER.unpack_from(value)
            if version != _FORMAT_VERSION:
                return None
            start = _HEADER.size + _TAG_BYTES
            header, tag, body = value[: _HEADER.size], value[_HEADER.size : start], value[start:]
            if not hmac.compare_digest(tag, self._tag(key, header, body)):
                return None
            code = body[:code_len].decode()
            return Entry(body[code_len:], expires_at, effect, code)
        except (struct.error, UnicodeDecodeError, TypeError):
            return None
