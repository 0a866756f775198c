"""Tamper evidence: a hash chain per stream, with Ed25519-signed checkpoints.

Every record written to a stream (one sink's output) gets `stream` (the segment's random id),
`seq` (1, 2, 3, ...), `prev_hash` (the previous record's `hash`) and its own `hash`:

    hash = sha256(canonical(record without "hash"))
    canonical(r) = json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

encoded as UTF-8. A `checkpoint` record's `signature` is Ed25519 over the canonical JSON of the
checkpoint without `signature` and `hash`; since the checkpoint holds `prev_hash`, it vouches
for every record before it in its segment.

Segments: each writer start is a new segment, opened by a `stream_start` record (seq 1, a new
random stream id). When the sink still holds the previous segment's last record, the start
links to it (`previous` = its stream and seq, `prev_hash` = its hash), so records cut from the
end of the previous segment show up as a broken link. A file sink continues the chain across
rotated files: it seals the old file with a checkpoint and opens each new file with a
`file_start` record (the chain goes on; seq does not restart).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from policy_engine.audit.canonical import Parts, assemble, canonical, sanitize, to_bytes
from policy_engine.audit.record import SCHEMA_VERSION, dropped_record, format_time

if TYPE_CHECKING:
    from policy_engine.audit.keys import Signer  # cryptography: only with a signing key

ZERO_HASH = "0" * 64
HASH_LENGTH = 64
STREAM_ID_BYTES = 16


def content_hash(record_without_hash: Mapping[str, Any]) -> str:
    return hashlib.sha256(to_bytes(canonical(record_without_hash))[1]).hexdigest()


def signed_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """What a checkpoint's signature covers: its canonical JSON less `signature` and `hash`."""
    body = {k: v for k, v in checkpoint.items() if k not in ("signature", "hash")}
    return to_bytes(canonical(body))[1]


def _is_hex(value: Any, length: int) -> bool:
    """`value` is `length` lowercase hex digits (a stream id or a sha256 as written here)."""
    return (
        isinstance(value, str)
        and len(value) == length
        and all(c in "0123456789abcdef" for c in value)
    )


def new_stream_id() -> str:
    return os.urandom(STREAM_ID_BYTES).hex()


class Sealed(NamedTuple):
    """One record as written: its place in the chain and its JSON line (no newline)."""

    seq: int
    line: str
    kind: str


class Chain:
    """The chain state of one stream. Not thread-safe: one sink worker owns it."""

    def __init__(self, *, signer: Signer | None, instance: str, sink: str) -> None:
        self.signer = signer
        self.instance = instance
        self.sink = sink
        self.stream = new_stream_id()
        self.seq = 0
        self.head = ZERO_HASH
        self.since_checkpoint = 0  # records sealed since the last checkpoint
        self.started = False

    # --- sealing -------------------------------------------------------------------------------

    def _finish(self, body: str, kind: str) -> Sealed:
        body, data = to_bytes(body)
        digest = hashlib.sha256(data).hexdigest()
        self.seq += 1
        self.head = digest
        self.since_checkpoint += 1
        # Appending "hash" last keeps one serialization; readers re-canonicalize to check it.
        return Sealed(self.seq, f'{body[:-1]},"hash":"{digest}"}}', kind)

    def seal(self, parts: Parts) -> Sealed:
        """A record serialized as Parts (the same Parts may go to several chains)."""
        return self._finish(assemble(parts, self.stream, self.seq + 1, self.head), parts.kind)

    def _seal_dict(self, record: dict[str, Any]) -> Sealed:
        """The chain's own records (start, checkpoint, ...): fields set here, then hashed."""
        record["stream"] = self.stream
        record["seq"] = self.seq + 1
        record["prev_hash"] = self.head
        try:
            body = canonical(record)
        except (ValueError, TypeError):
            body = canonical(sanitize(record))
        return self._finish(body, str(record["type"]))

    def start(self, previous: Mapping[str, Any] | None, now: float) -> Sealed:
        """The segment's first record; links to `previous` (the sink's last record) if usable.

        `previous` is read from the sink, where others may have written it (a Redis Stream):
        it is linked to only when its stream id, seq and hash have the forms this module
        writes, so a planted entry can make the link point at itself (which verify then
        reports), never make this record malformed.
        """
        link = None
        prev_hash = ZERO_HASH
        if (
            previous
            and _is_hex(previous.get("stream"), 2 * STREAM_ID_BYTES)
            and isinstance(previous.get("seq"), int)
            and not isinstance(previous.get("seq"), bool)
            and previous["seq"] >= 1
            and _is_hex(previous.get("hash"), HASH_LENGTH)
        ):
            link = {"stream": previous["stream"], "seq": previous["seq"]}
            prev_hash = previous["hash"]
        self.head = prev_hash
        self.started = True
        record = {
            "schema_version": SCHEMA_VERSION,
            "type": "stream_start",
            "time": format_time(now),
            "instance": self.instance,
            "sink": self.sink,
            "key_id": self.signer.key_id if self.signer else None,
            "previous": link,
        }
        return self._seal_dict(record)

    def file_start(self, now: float) -> Sealed:
        """The first record of a new file after rotation: the chain simply goes on."""
        record = {
            "schema_version": SCHEMA_VERSION,
            "type": "file_start",
            "time": format_time(now),
            "instance": self.instance,
        }
        return self._seal_dict(record)

    def dropped(
        self,
        count: int,
        reason: str,
        since: float,
        until: float,
        now: float,
        *,
        removed_through_seq: int | None = None,
    ) -> Sealed:
        """Says in the chain itself that records are missing from this stream (see
        `dropped_record` for the reasons)."""
        record = dropped_record(
            count, reason, since, until, now, removed_through_seq=removed_through_seq
        )
        return self._seal_dict(record)

    def checkpoint(self, now: float, *, final: bool = False) -> Sealed:
        """A signed statement: "records up to seq N of this stream hash to prev_hash"."""
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "type": "checkpoint",
            "time": format_time(now),
            "stream": self.stream,
            "seq": self.seq + 1,
            "prev_hash": self.head,
            "covered_seq": self.seq,
            "count": self.since_checkpoint,
            "key_id": self.signer.key_id if self.signer else None,
            "final": final,
        }
        record["signature"] = self.signer.sign(signed_bytes(record)) if self.signer else None
        sealed = self._seal_dict(record)
        self.since_checkpoint = 0
        return sealed
