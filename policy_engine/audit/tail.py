"""`pdp audit tail`: follow an audit file or Redis Stream, filtered, for people or for jq.

Files are followed like `tail -F`: when the writer rotates, the old file is read to its end
and the new file from its start. Redis Streams are followed with XREAD BLOCK from the current
end (or from the beginning with --from-start). `--once` reads what is there and exits;
`--count N` exits after N matching records.

Records missing from what is read are reported on standard error, never passed over in
silence: a stream's seq that jumps (records deleted, or trimmed before they were read), a
stream that begins mid-chain when reading from the start (a trimmed head), the writer's own
`dropped` records (decisions not recorded, a stream reset under the writer), and a Redis
Stream deleted or replaced while it is followed (then read again from its new start).
Entries and lines that are not audit records (anyone who can write to the Redis server can add
them) are reported there too, never passed over in silence.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import redis

from policy_engine.audit.record import decision_codes
from policy_engine.audit.sinks.base import parse_record
from policy_engine.audit.sinks.file import rotated_files
from policy_engine.audit.sinks.redis import RECORD_FIELD, StreamFields, entry_id, stream_entries

_MAX_STREAMS = 10_000  # chain segments whose last seq is remembered for gap reports

_C1 = re.compile("[\x7f-\x9f]")
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


@dataclass(frozen=True, slots=True)
class Filters:
    organization: str | None = None
    subject: str | None = None
    application: str | None = None
    integration: str | None = None
    decision: str | None = None  # ALLOW | DENY
    code: str | None = None  # kontext_policy_denied, or policy_denied
    include_all: bool = False  # also checkpoints, stream starts, ... (when no filter is set)

    def any_set(self) -> bool:
        return any(
            v is not None
            for v in (
                self.organization,
                self.subject,
                self.application,
                self.integration,
                self.decision,
                self.code,
            )
        )

    def matches(self, record: dict[str, Any]) -> bool:
        if record.get("type") != "decision":
            return self.include_all and not self.any_set()

        def id_of(key: str) -> Any:
            value = record.get(key)
            return value.get("id") if isinstance(value, dict) else None

        if self.organization is not None and record.get("organization") != self.organization:
            return False
        if self.subject is not None and id_of("subject") != self.subject:
            return False
        if self.application is not None and id_of("application") != self.application:
            return False
        if self.integration is not None and id_of("integration") != self.integration:
            return False
        if self.decision is not None and record.get("decision") != self.decision.upper():
            return False
        if self.code is not None:
            wanted = {self.code, f"kontext_{self.code}"}
            if not wanted & set(decision_codes(record)):
                return False
        return True


class GapWatch:
    """Notices records missing from what is read and says so through `warn` (one line each)."""

    def __init__(self, warn: Callable[[str], None], *, from_start: bool) -> None:
        self._warn = warn
        self._from_start = from_start
        self._last: dict[str, int] = {}

    def see(self, record: dict[str, Any]) -> None:
        stream, seq, kind = record.get("stream"), record.get("seq"), record.get("type")
        if not isinstance(stream, str) or not isinstance(seq, int) or isinstance(seq, bool):
            return
        name = _safe(stream[:12])
        last = self._last.pop(stream, None)
        if last is None:
            if self._from_start and seq > 1 and kind not in ("stream_start", "file_start"):
                self._warn(
                    f"gap: stream {name} begins at seq {seq}: seq 1-{seq - 1} are not in the "
                    "source (trimmed or removed)"
                )
        elif seq > last + 1:
            missing = f"seq {last + 1}" if seq == last + 2 else f"seq {last + 1}-{seq - 1}"
            self._warn(f"gap: stream {name}: {missing} missing (deleted, or trimmed unread)")
        elif seq <= last:
            self._warn(f"gap: stream {name}: seq {seq} after seq {last} (out of order)")
        self._last[stream] = seq if last is None else max(last, seq)
        if len(self._last) > _MAX_STREAMS:
            del self._last[next(iter(self._last))]
        if kind == "dropped":
            self._warn(_safe(f"gap: stream {stream[:12]} seq {seq}: {_dropped_text(record)}"))


def _dropped_text(record: dict[str, Any]) -> str:
    reason = record.get("reason")
    if reason in ("stream_reset", "stream_trimmed"):
        what = "deleted or replaced" if reason == "stream_reset" else "trimmed"
        return (
            f"the writer found the stream {what} under it: seq 1-"
            f"{record.get('removed_through_seq')} are no longer in it"
        )
    return f"{record.get('count')} decision(s) not recorded ({reason})"


def _safe(value: Any) -> str:
    """Text for a terminal: control characters from requests are shown escaped, never run."""
    return str(value).translate(_CONTROL)


def _json_line(line: str, record: dict[str, Any]) -> str:
    """The stored line; re-encoded as ASCII JSON if it holds C1 control characters."""
    if _C1.search(line):
        return json.dumps(record, ensure_ascii=True, separators=(",", ":"))
    return line


def format_human(record: dict[str, Any]) -> str:
    kind = record.get("type")
    seq = record.get("seq")
    when = record.get("time", "")
    if kind != "decision":
        detail = ""
        if kind == "checkpoint":
            detail = (
                f" covers seq {record.get('covered_seq')} ({record.get('count')} records)"
                f" key {record.get('key_id')}{' final' if record.get('final') else ''}"
            )
        elif kind == "dropped":
            detail = f" {_dropped_text(record)}"
        elif kind == "stream_start":
            detail = f" stream {str(record.get('stream'))[:12]} by {record.get('instance')}"
        return _safe(f"{when} -- {kind} #{seq}{detail}")

    def part(key: str) -> dict[str, Any]:
        value = record.get(key)
        return value if isinstance(value, dict) else {}

    subject = part("subject")
    line = (
        f"{when} {record.get('decision', '?'):<5} {record.get('organization')} "
        f"{subject.get('id')}({subject.get('kind')}) {part('application').get('id')} -> "
        f"{part('integration').get('id')} {record.get('scope')}"
    )
    reasons = record.get("reasons") or []
    if reasons and isinstance(reasons[0], dict):
        first = reasons[0]
        where = f"{first.get('policy')}/{first.get('rule')}" if first.get("rule") else "default"
        more = f" (+{len(reasons) - 1})" if len(reasons) > 1 else ""
        line += f"  {first.get('code')} {first.get('layer')} {where}{more}"
    line += f"  [{record.get('cache_level')} {record.get('latency_ms')}ms] #{seq}"
    return _safe(line)


def follow_file(path: Path, *, from_start: bool, once: bool, poll: float = 0.2) -> Iterator[str]:
    """Lines of the file as they are written; follows rotation and truncation.

    When the file being read is no longer the live one, it is read to its end and the reader
    moves to its successor: the next rotated file by name (several rotations may have happened
    between two polls), else the live file.
    """
    handle = _open_when_present(path, poll)
    inode = os.fstat(handle.fileno()).st_ino
    if not from_start and not once:
        handle.seek(0, os.SEEK_END)
    pending = b""
    try:
        while True:
            chunk = handle.read(64 * 1024)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield line.decode("utf-8", "replace")
                continue
            if once:
                return
            try:
                live = os.stat(path)
            except FileNotFoundError:
                live = None
            if live is not None and live.st_ino == inode:
                if live.st_size < handle.tell():  # truncated in place: start over
                    handle.seek(0)
                    pending = b""
                    continue
                time.sleep(poll)
                continue
            if live is None and _successor(path, inode) == path:
                time.sleep(poll)  # between a rotation's rename and the new file
                continue
            # Ours was rotated away: finish it, then go on with its successor.
            rest = pending + handle.read()
            for line in rest.split(b"\n"):
                if line.strip():
                    yield line.decode("utf-8", "replace")
            pending = b""
            handle.close()
            handle = _open_when_present(_successor(path, inode), poll)
            new_inode = os.fstat(handle.fileno()).st_ino
            later = _successor(path, inode)  # a rotation may have happened meanwhile
            if later != path and os.stat(later).st_ino != new_inode:
                handle.close()
                handle = _open_when_present(later, poll)
                new_inode = os.fstat(handle.fileno()).st_ino
            inode = new_inode
    finally:
        handle.close()


def _successor(path: Path, inode: int) -> Path:
    """The file written after the one with `inode`: the next rotated one, else the live one."""
    found = False
    for rotated in rotated_files(path):
        try:
            current = os.stat(rotated).st_ino
        except FileNotFoundError:
            continue
        if found:
            return rotated
        found = current == inode
    return path


def _open_when_present(path: Path, poll: float) -> Any:
    while True:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            time.sleep(poll)


def follow_redis(
    url: str,
    stream: str,
    *,
    from_start: bool,
    once: bool,
    block_ms: int = 1000,
    warn: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Records of a Redis Stream: what is there (--once), or new ones as they arrive.

    While following, a stream deleted or replaced under the reader (its `entries-added` went
    back, or its last ID is below the last one read) is reported through `warn` and read again
    from its start, so records added with lower IDs are not missed.
    """
    client = redis.Redis.from_url(url)

    def record_of(entry: str, fields: StreamFields) -> str | None:
        """The entry's record line; None (and a warning) for an entry the writer never adds."""
        line = _field(fields)
        if len(fields) == 1 and line.strip():
            return line
        if warn is not None:
            keys = ", ".join(sorted(repr(_text(k)) for k in fields))
            warn(_safe(f"entry {entry} is not an audit record (fields: {keys[:200]})"))
        return None

    try:
        if once:
            low = "-"
            while True:
                entries = stream_entries(client.xrange(stream, min=low, count=500))
                if not entries:
                    return
                for entry, fields in entries:
                    line = record_of(entry, fields)
                    if line is not None:
                        yield line
                low = "(" + entries[-1][0]
        if from_start:
            last_id = "0-0"
        else:
            newest = stream_entries(client.xrevrange(stream, count=1))
            last_id = newest[0][0] if newest else "0-0"
        added, _ = _stream_state(client, stream)
        while True:
            response = client.xread({stream: last_id}, block=block_ms, count=500)
            if isinstance(response, dict):  # a URL asking for protocol=3
                raise redis.ResponseError("XREAD answered in RESP3's shape; use RESP2")
            for _, read in response or []:  # RESP2's shape: [[stream, entries]]
                for entry, fields in stream_entries(read):
                    last_id = entry
                    line = record_of(entry, fields)
                    if line is not None:
                        yield line
            now_added, last_generated = _stream_state(client, stream)
            if now_added < added or last_generated < entry_id(last_id):
                if warn is not None:
                    warn(
                        f"gap: Redis Stream {_safe(stream)} was deleted or replaced while it "
                        "was read; reading it again from its start"
                    )
                last_id = "0-0"
            added = now_added
    finally:
        client.close()


def _stream_state(client: redis.Redis, stream: str) -> tuple[int, tuple[int, int]]:
    """(entries-added, last-generated-id) from XINFO STREAM; (0, (0, 0)) when it is gone."""
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError:  # no such key
        return 0, (0, 0)
    newest = info.get("last-generated-id")
    return int(info.get("entries-added") or 0), entry_id(newest) if newest else (0, 0)


def _field(fields: StreamFields) -> str:
    raw = fields.get(RECORD_FIELD.encode(), fields.get(RECORD_FIELD, b""))
    return _text(raw)


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def is_redis_source(source: str) -> bool:
    return source.startswith(("redis://", "rediss://", "unix://"))


def run_tail(
    source: str,
    filters: Filters,
    *,
    stream: str = "pdp:audit",
    json_output: bool = False,
    from_start: bool = False,
    once: bool = False,
    count: int | None = None,
    out: TextIO,
    stop: Callable[[], bool] | None = None,
    err: TextIO | None = None,
) -> int:
    """Print matching records to `out`; returns how many were printed.

    Missing records (see `GapWatch`) are reported on `err` (standard error when None) as
    `pdp audit tail: gap: ...` lines, whatever the filters.
    """

    def warn(message: str) -> None:
        stream_ = err if err is not None else sys.stderr
        stream_.write(f"pdp audit tail: {message}\n")
        stream_.flush()

    if is_redis_source(source):
        lines = follow_redis(source, stream, from_start=from_start, once=once, warn=warn)
    else:
        lines = follow_file(Path(source), from_start=from_start, once=once)
    watch = GapWatch(warn, from_start=from_start or once)
    printed = 0
    for line in lines:
        record = parse_record(line)
        if record is None:
            warn(_safe(f"not an audit record (not a JSON object): {line[:80]!r}"))
            continue
        watch.see(record)
        if filters.matches(record):
            out.write((_json_line(line, record) if json_output else format_human(record)) + "\n")
            out.flush()
            printed += 1
            if count is not None and printed >= count:
                break
        if stop is not None and stop():
            break
    return printed
