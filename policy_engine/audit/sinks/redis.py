"""Redis Stream sink: one XADD per record, trimmed with `MAXLEN ~`.

Each entry has a single field, `record`, holding the record's JSON line. The sink never creates
or needs a consumer group: consumers create their own (`XGROUP CREATE <stream> <group> 0
MKSTREAM`) and read with XREADGROUP. Several writers (server processes) may share one stream:
each record names its own chain segment (`stream`), which is how `verify` separates them.

Records removed under the writer are noticed while writing: every batch's MULTI/EXEC begins
with XINFO STREAM (Redis 7), so the sink sees, atomically with its own XADDs, whether the
stream was deleted or replaced since its last batch (the key is gone, `entries-added` went
back, or `last-generated-id` is below this writer's last entry) or trimmed past this writer's
last entry (`first-entry` is newer than it). About once a second it also compares each
consumer group's `entries-read` with the entries trimmed from the stream's head, to see
records trimmed (by MAXLEN or XTRIM) before a group read them.

Nothing read back from Redis can make the sink skip a record. Anyone who can write to the
server can add entries (any `stream`, any `seq`), so after a write whose outcome is unknown
the sink decides whether that batch landed only from evidence an outsider cannot forge: the
batch's own records, byte for byte, as the contiguous run of entries one MULTI/EXEC makes.
Each record holds its chain hash (random stream id, the previous record's hash, the decision's
own id and time), so only the writer, or someone who read the batch, knows those bytes. Anything
else counts as not written and the batch is sent again: at worst a record is in the stream twice,
which `pdp audit verify` reports; it is never missing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from policy_engine.audit.chain import Sealed
from policy_engine.audit.sinks.base import OpenState, Sink, StreamGap, parse_record

if TYPE_CHECKING:  # redis-py's reply types (redis.typing: only recent releases name this one)
    from redis.typing import StreamRangeResponse

RECORD_FIELD = "record"
_LOOK_BACK = 1000  # entries searched, besides the batch's own, after an uncertain write
_MAX_GROUPS = 1000  # consumer groups whose unread count is followed (anyone may add groups)
_GROUP_CHECK_SECONDS = 1.0  # consumer groups are checked for unread trimmed entries this often


def entry_id(value: bytes | str) -> tuple[int, int]:
    """A stream entry ID (`<ms>-<seq>`) as a comparable pair."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


StreamFields = dict[bytes | str, bytes | str]
"""One stream entry's fields, as redis-py returns them (bytes without `decode_responses`)."""


def stream_entries(reply: StreamRangeResponse | None) -> list[tuple[str, StreamFields]]:
    """An XRANGE / XREVRANGE reply (or one stream's entries in an XREAD reply) as (entry ID,
    fields) pairs, the ID as text (`<ms>-<seq>`, for messages and the next page's bound).

    redis-py types the reply, each ID and each field map as optional (the shape XCLAIM gives
    a deleted entry); a range reply holds none of them. An entry without fields is kept with
    none, so readers report it as not an audit record; one without an ID cannot be located or
    resumed from, so it raises redis.ResponseError, as other malformed replies do.
    """
    entries: list[tuple[str, StreamFields]] = []
    for ident, fields in reply or ():
        if ident is None:
            raise redis.ResponseError("a stream entry without an ID")
        text = ident.decode("ascii", "replace") if isinstance(ident, bytes) else str(ident)
        entries.append((text, fields or {}))
    return entries


def _text(value: Any) -> str:
    """A name read from Redis, for a log line: control characters escaped (anyone may name a
    consumer group), at most 200 characters."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = text[:200]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class RedisStreamSink(Sink):
    """Writes a batch in one MULTI/EXEC, so it lands whole or not at all.

    When a batch fails in a way that leaves its outcome unknown (a timeout, or the connection
    dropped after EXEC was sent), the retry first reads the stream back and skips the batch
    only if it finds that batch's exact records there as one contiguous run of entries (see
    `_unwritten`); anything else, whoever wrote it, is not taken as proof and the batch is
    sent again. So no record is ever lost to a forged or copied entry, and none is written
    twice unless the stream changed under the writer.
    """

    name = "redis"

    def __init__(
        self, url: str, stream: str, *, maxlen: int = 0, timeout_seconds: float = 1.0
    ) -> None:
        self.url = url
        self.stream = stream
        self.maxlen = maxlen if maxlen > 0 else None
        self.timeout = timeout_seconds
        self._client: redis.Redis | None = None
        self._uncertain: tuple[Sealed, ...] = ()  # the batch whose outcome is unknown
        self._last_id: tuple[int, int] | None = None  # this writer's newest entry
        self._added = 0  # the stream's entries-added right after this writer's last batch
        self._last_write = 0.0
        self._gaps: list[StreamGap] = []
        self._unread: dict[str, int] = {}  # group -> entries trimmed before it read them
        self._next_group_check = 0.0

    def _connect(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                health_check_interval=0,
            )
        return self._client

    def _last(self) -> dict[str, Any] | None:
        entries = stream_entries(self._connect().xrevrange(self.stream, count=1))
        if not entries:
            return None
        fields = entries[0][1]
        raw = fields.get(RECORD_FIELD.encode()) or fields.get(RECORD_FIELD)
        return parse_record(raw) if raw is not None else None

    def open(self) -> OpenState:
        return OpenState(self._last(), 0)

    def write(self, records: Sequence[Sealed]) -> None:
        if self._uncertain:
            records = self._unwritten(records)
            self._uncertain = ()
            if not records:
                return
        client = self._connect()
        try:
            pipe = client.pipeline(transaction=True)
            pipe.xinfo_stream(self.stream)  # the state just before this batch, atomically
            for record in records:
                pipe.xadd(
                    self.stream,
                    {RECORD_FIELD: record.line},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            results = pipe.execute(raise_on_error=False)
        except Exception:
            self._uncertain = tuple(records)
            raise
        info, ids = results[0], results[1:]
        for result in ids:
            if isinstance(result, Exception):
                raise result  # e.g. the key now holds another type: none of the batch was added
        self._check(info, records[0].seq - 1)
        before = info.get("entries-added") if isinstance(info, dict) else 0
        self._added = (before or 0) + len(ids)
        self._last_id = entry_id(ids[-1])
        self._last_write = time.time()
        if time.monotonic() >= self._next_group_check:
            self._check_groups(client)

    def _check(self, info: Any, through_seq: int) -> None:
        """Compares the stream as found with how this writer left it after its last batch."""
        last = self._last_id
        if last is None or through_seq < 1:
            return
        if not isinstance(info, dict):  # a ResponseError: no such key
            reason, detail = "reset", f"Redis Stream {self.stream} was deleted under the writer"
        elif (info.get("entries-added") or 0) < self._added:
            reason = "reset"
            detail = (
                f"Redis Stream {self.stream} was replaced under the writer (entries-added went "
                f"from {self._added} to {info.get('entries-added')})"
            )
        elif entry_id(info.get("last-generated-id") or b"0-0") < last:
            reason = "reset"
            detail = f"Redis Stream {self.stream} was replaced under the writer (its IDs went back)"
        else:
            first = info.get("first-entry")
            if first is not None and first[0] is not None and entry_id(first[0]) <= last:
                return
            reason = "trimmed"
            detail = f"Redis Stream {self.stream} was trimmed past the writer's last entry"
        self._gaps.append(StreamGap(reason, detail, through_seq, through_seq, self._last_write))

    def _check_groups(self, client: redis.Redis) -> None:
        """Records trimmed from the head before a consumer group read them (Redis 7 counts)."""
        self._next_group_check = time.monotonic() + _GROUP_CHECK_SECONDS
        try:
            pipe = client.pipeline(transaction=True)
            pipe.xinfo_stream(self.stream)
            pipe.xinfo_groups(self.stream)
            info, groups = pipe.execute()
        except Exception:
            return  # only a check: the next write tries again
        removed = (info.get("entries-added") or 0) - (info.get("length") or 0)
        for group in groups:
            read = group.get("entries-read")
            if read is None and entry_id(group.get("last-delivered-id") or b"0-0") == (0, 0):
                read = 0  # a group that has read nothing yet (Redis leaves the count unset)
            if read is None or group.get("lag") is None:
                continue  # Redis cannot tell (entries deleted inside the range)
            name = _text(group.get("name"))
            if name not in self._unread and len(self._unread) >= _MAX_GROUPS:
                continue  # anyone may add groups: memory and log lines stay bounded
            unread = max(removed - read, 0)
            seen = self._unread.setdefault(name, unread)  # what was lost before we looked
            if unread > seen:
                self._unread[name] = unread
                self._gaps.append(
                    StreamGap(
                        "unread",
                        f"Redis Stream {self.stream} was trimmed before consumer group "
                        f"{name} read {unread - seen} of its entries",
                        unread - seen,
                    )
                )

    def take_gaps(self) -> list[StreamGap]:
        gaps, self._gaps = self._gaps, []
        return gaps

    def _unwritten(self, records: Sequence[Sealed]) -> Sequence[Sealed]:
        """`records` less the batch of unknown outcome, if that batch is in the stream.

        The evidence is the batch itself: its records' exact bytes, each in an entry with no
        other field, as one contiguous run (a MULTI/EXEC is never interleaved with another
        client's commands). With MAXLEN, the run may have lost its beginning to trimming in
        the same EXEC: a suffix of the batch that starts at the stream's first entry counts
        too. An entry that merely claims this chain's stream id and a seq (forged), or a copy
        of an earlier record, is no such evidence, so the batch is written again. Raises
        redis.RedisError when the stream cannot be read (the outcome stays unknown).
        """
        sent = self._uncertain
        if not sent:
            return records
        client = self._connect()
        entries = stream_entries(client.xrevrange(self.stream, count=_LOOK_BACK + len(sent)))
        entries.reverse()
        whole_stream = len(entries) < _LOOK_BACK + len(sent)
        wanted = [{RECORD_FIELD.encode(): record.line.encode()} for record in sent]
        found = _find_run(
            [fields for _, fields in entries], wanted, suffix_at_start=bool(self.maxlen)
        )
        if found is None or (found[1] and not whole_stream):
            return records  # a trimmed run must begin at the stream's first entry
        index, missing = found
        self._last_id = entry_id(entries[index + len(wanted) - missing - 1][0])
        landed = {record.line for record in sent}
        return [record for record in records if record.line not in landed]

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None


def _find_run(
    entries: Sequence[Any], wanted: Sequence[dict[bytes, bytes]], *, suffix_at_start: bool
) -> tuple[int, int] | None:
    """Where `wanted` occurs in `entries` as one contiguous run: (index of its first entry,
    how many of its first items are missing), the newest run first; None when it does not.

    With `suffix_at_start`, a run at index 0 may lack up to all but one of its first items
    (trimmed by MAXLEN in the same EXEC). Entries are compared whole: fields and bytes.
    """
    size = len(wanted)
    for index in range(len(entries) - size, -1, -1):
        if all(entries[index + i] == wanted[i] for i in range(size)):
            return index, 0
    if suffix_at_start:
        for missing in range(1, size):
            if len(entries) >= size - missing and all(
                entries[i] == wanted[missing + i] for i in range(size - missing)
            ):
                return 0, missing
    return None
