"""What a cache entry holds, and how it travels through Redis.

An entry is the serialized `CheckResponse` *template* of a decision (effect, reasons, policy
revision; no decision ID, request ID or cache flags), plus what a hit needs without parsing
it: the absolute instant it stops being valid, the effect and the first reason's code (for
the decisions metric).

In Redis the value is `version | key id (4 bytes) | expires_at (float64, unix seconds) |
effect | code length | tag (16 bytes) | code | template`. The expiry travels with the value
because Redis' own TTL cannot be read back by MGET: a Redis hit that fills the local level must
not outlive a subject token's validity, and a value written back after it expired is a miss.
The tag is a keyed BLAKE2b MAC (RFC 7693 section 2.5; see `signing.py` for the keys) over the
cache key and everything in the value but the tag; the key id only says which of the verifying
keys to check it with. A value that is corrupted, copied onto another cache key, signed with
a key this process does not hold (another deployment's, a retired one), or written by anyone
who can write to Redis but holds no key, fails the check and is a miss, never an answer.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from policy_engine.cache.signing import MacKey, SigningKeys

_FORMAT_VERSION = 3
_HEADER = struct.Struct(">B4sdBB")  # version, key id, expires_at, effect, len(code)
_KEY_LENGTH = struct.Struct(">I")
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
    """Signs entries for Redis with the signing key; checks them with any verifying key."""

    __slots__ = ("_by_id", "_signing")

    def __init__(self, keys: SigningKeys) -> None:
        self._signing = keys.signing
        # The first key listed wins an (improbable) identifier collision: the signing key.
        self._by_id: dict[bytes, MacKey] = {}
        for key in keys.verifying:
            self._by_id.setdefault(key.key_id, key)

    @staticmethod
    def _tag(mac_key: MacKey, key: str, header: bytes, body: bytes) -> bytes:
        mac = hashlib.blake2b(digest_size=_TAG_BYTES, key=mac_key.secret)
        encoded = key.encode()
        mac.update(_KEY_LENGTH.pack(len(encoded)))  # length-prefixed: no key/header ambiguity
        mac.update(encoded)
        mac.update(header)
        mac.update(body)
        return mac.digest()

    def encode(self, key: str, entry: Entry) -> bytes:
        code = entry.code.encode()
        signing = self._signing
        header = _HEADER.pack(
            _FORMAT_VERSION, signing.key_id, entry.expires_at, entry.effect, len(code)
        )
        body = code + entry.template
        return header + self._tag(signing, key, header, body) + body

    def decode(self, key: str, value: bytes) -> Entry | None:
        """The entry, or None for anything not signed under this cache key by a held key."""
        try:
            version, key_id, expires_at, effect, code_len = _HEADER.unpack_from(value)
            if version != _FORMAT_VERSION:
                return None
            mac_key = self._by_id.get(key_id)
            if mac_key is None:
                return None
            start = _HEADER.size + _TAG_BYTES
            header, tag, body = value[: _HEADER.size], value[_HEADER.size : start], value[start:]
            if not hmac.compare_digest(tag, self._tag(mac_key, key, header, body)):
                return None
            code = body[:code_len].decode()
            return Entry(body[code_len:], expires_at, effect, code)
        except (struct.error, UnicodeDecodeError, TypeError):
            return None
