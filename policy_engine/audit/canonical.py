"""Canonical JSON, and records pre-serialized in pieces so each chain adds its fields cheaply.

canonical(r) = json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

A record goes to several sinks, each with its own chain fields (`prev_hash`, `seq`, `stream`).
Rather than serialize the whole record once per sink, it is serialized once as `Parts`: the
canonical text of its keys that sort before `prev_hash`, between `prev_hash` and `seq`, between
`seq` and `stream`, and after `stream`. A chain then builds the exact canonical text of the full
record by concatenation (`assemble`). Tests check `assemble` against `canonical` itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# json's own C encoder, built once: JSONEncoder.encode builds one per call (about half the
# cost for a small map). No circular-reference check: records are trees built here or
# converted from protobuf values, whose depth request validation bounds.
# (Not in typeshed's json.encoder: an implementation detail, None without the C accelerator.)
_c_make_encoder: Callable[..., Callable[[Any, int], tuple[str, ...]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
_c_encoder = (
    _c_make_encoder(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )
    if _c_make_encoder is not None
    else None
)


def _encode(value: Any) -> str:
    if _c_encoder is None or isinstance(value, str):
        return _ENCODER.encode(value)
    return "".join(_c_encoder(value, 0))


CHAIN_KEYS = ("prev_hash", "seq", "stream")


def canonical(record: Mapping[str, Any]) -> str:
    return _encode(record)


def _clean_text(text: str) -> str:
    # Lone surrogates cannot be UTF-8 encoded: replace them (U+FFFD) rather than fail.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def sanitize(value: Any) -> Any:
    """A JSON-safe copy: string keys, finite numbers, encodable text, nothing else exotic.

    Only used when a record fails to serialize, so the common path pays nothing for it.
    """
    if isinstance(value, Mapping):
        return {_clean_text(str(k)): sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [sanitize(v) for v in value]
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return _clean_text(str(value))


def to_bytes(text: str) -> tuple[str, bytes]:
    """UTF-8 bytes of serialized text; lone surrogates become U+FFFD (text and bytes agree)."""
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:
        text = _clean_text(text)
        return text, text.encode("utf-8")


class Parts(NamedTuple):
    """A record serialized around the chain keys; each piece is `"k":v,...` without braces."""

    before_prev_hash: str
    before_seq: str
    before_stream: str
    after_stream: str
    kind: str  # the record's `type`


def split(record: Mapping[str, Any]) -> Parts:
    """Any record (without chain keys) as Parts."""
    groups: list[dict[str, Any]] = [{}, {}, {}, {}]
    for key, value in record.items():
        k = str(key)
        if k in CHAIN_KEYS or k == "hash":
            raise ValueError(f"record already has chain field {k!r}")
        index = 0 if k < "prev_hash" else 1 if k < "seq" else 2 if k < "stream" else 3
        groups[index][k] = value
    try:
        texts = [_encode(g)[1:-1] for g in groups]
    except (ValueError, TypeError):  # NaN, a non-JSON value: store a cleaned copy
        texts = [_encode(sanitize(g))[1:-1] for g in groups]
    return Parts(texts[0], texts[1], texts[2], texts[3], str(record.get("type", "")))


def assemble(parts: Parts, stream: str, seq: int, prev_hash: str) -> str:
    """The canonical text of the record plus its chain fields (stream and hash are hex)."""
    a, b, c, d, _ = parts
    text = f'"prev_hash":"{prev_hash}"'
    if a:
        text = f"{a},{text}"
    if b:
        text = f"{text},{b}"
    text = f'{text},"seq":{seq}'
    if c:
        text = f"{text},{c}"
    text = f'{text},"stream":"{stream}"'
    if d:
        text = f"{text},{d}"
    return "{" + text + "}"
