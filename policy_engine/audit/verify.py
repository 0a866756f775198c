"""`pdp audit verify`: prove audit files intact, or say exactly where and how they were changed.

Reads files in the order given (oldest first), one record per line, in a single pass with
bounded memory, so a day of records can be checked. Records are grouped by `stream` (one writer
segment; a file may hold several after restarts, a Redis dump several interleaved writers).

Inside a stream, every record must hash to its `hash`, and records must link (`prev_hash` =
the previous record's hash, `seq` + 1). Records that link are grouped into fragments while
reading; an intact stream is a single fragment. Where there are several, the way they join
says what happened: a gap in `seq` is a deletion, a fragment that links but appears earlier in
the file is a reordering, two records claiming the same place is an insertion (a fork), a
record sitting inside the chain without linking is an insertion, and a `seq` + 1 that does
not link means a record was altered and re-hashed or replaced. Signed checkpoints vouch for
everything before them; a rewrite of the whole chain breaks their signatures.

Besides tampering, verify accounts for every record that is missing by the writer's own
word or by the shape of the input, and gives one verdict (`Report.verdict`):

* TAMPERED: a problem above (the chain was changed, or a stream begins mid-chain unexplained).
* INCOMPLETE: the chain is intact, but records are known to be missing: `dropped` records
  (decisions given up: queue_full, build_error, sink_backlog_full), a Redis Stream the writer
  found deleted or replaced under it (stream_reset), or a stream that ends without its final
  checkpoint (its writer was killed, or its end was cut; with `live`, an open end is accepted
  as a writer still running, except when a later file segment shows the writer restarted).
* PARTIAL: intact and complete from where the input begins, but the beginning of a stream is
  not in the input: a rotated file's `file_start` on the first line (older files not given, or
  deleted by `file_keep`), a stream the writer found trimmed past its last entry
  (stream_trimmed), or, with `allow_partial`, any mid-chain start (a Redis Stream trimmed by
  MAXLEN: trimming by the configured MAXLEN and by an attacker's XTRIM look alike, so an
  excerpt is never reported as whole).
* OK: none of these.

What cannot be detected: records cut from the end of a stream after its last checkpoint
(reported as the unsigned tail) when the final checkpoint is cut with them and `live` is given,
unless a later segment linked to them when it started.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from policy_engine.audit.canonical import canonical, to_bytes
from policy_engine.audit.chain import HASH_LENGTH, ZERO_HASH, signed_bytes
from policy_engine.audit.keys import key_id, verify_signature
from policy_engine.audit.sinks.base import parse_record

_HEX = frozenset("0123456789abcdef")
_RECENT = 64  # records remembered at each fragment's end, to find where a fork branched off
MAX_PROBLEMS = 1000  # past this many, the input is clearly not an intact log: stop listing


@dataclass(frozen=True, slots=True)
class Problem:
    """One break in the chain: where, which seq, what kind, and a sentence for people."""

    where: str  # file:line
    stream: str
    seq: int | None
    kind: str  # edited, deleted, inserted, reordered, altered, bad_signature, foreign, ...
    message: str

    def __str__(self) -> str:
        seq = f" seq {self.seq}" if self.seq is not None else ""
        stream = f" stream {self.stream[:12]}" if self.stream else ""
        # Other places in the same file read as "line N".
        file = self.where.rsplit(":", 1)[0]
        message = re.sub(re.escape(file) + r":(\d+)", r"line \1", self.message)
        return f"{self.where}:{stream}{seq}: {self.kind}: {message}"


INCOMPLETE_KINDS = frozenset({"dropped", "reset", "unclosed", "empty"})
PARTIAL_KINDS = frozenset({"head_missing", "trimmed"})


@dataclass
class StreamSummary:
    stream: str
    first_seq: int = 0
    last_seq: int = 0
    first_where: str = ""
    last_where: str = ""
    records: int = 0  # decision records
    checkpoints: int = 0  # valid checkpoints (or, without a key, well-formed ones)
    last_signed_seq: int | None = None
    final: bool = False
    unsigned_tail: int = 0


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    # Records known missing though the chain is intact (kinds in INCOMPLETE_KINDS), and
    # streams whose beginning is not in the input (PARTIAL_KINDS).
    gaps: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing_decisions: int = 0  # decisions the writers said they could not record (`dropped`)
    streams: list[StreamSummary] = field(default_factory=list)
    lines: int = 0
    truncated: bool = False  # stopped listing after MAX_PROBLEMS

    @property
    def ok(self) -> bool:
        """The chain is intact: no tampering found (records may still be missing: `verdict`)."""
        return not self.problems

    @property
    def incomplete(self) -> list[Problem]:
        return [g for g in self.gaps if g.kind in INCOMPLETE_KINDS]

    @property
    def partial(self) -> list[Problem]:
        return [g for g in self.gaps if g.kind in PARTIAL_KINDS]

    @property
    def verdict(self) -> str:
        """TAMPERED, INCOMPLETE, PARTIAL or OK (the first that applies)."""
        if self.problems:
            return "TAMPERED"
        if self.incomplete:
            return "INCOMPLETE"
        if self.partial:
            return "PARTIAL"
        return "OK"

    @property
    def records(self) -> int:
        return sum(s.records for s in self.streams)

    @property
    def checkpoints(self) -> int:
        return sum(s.checkpoints for s in self.streams)

    @property
    def last_signed_seq(self) -> int | None:
        for summary in reversed(self.streams):
            if summary.last_signed_seq is not None:
                return summary.last_signed_seq
        return None

    def render(self) -> str:
        lines: list[str] = []
        signed = self.last_signed_seq
        counts = (
            f"{self.records} records, {self.checkpoints} checkpoints, "
            f"last signed seq {signed if signed is not None else 'none'}"
        )
        verdict = self.verdict
        if verdict == "OK":
            lines.append(f"OK: {counts}")
        elif verdict == "TAMPERED":
            lines.append(
                f"TAMPERED: {len(self.problems)} problem(s)"
                f"{' (listing stopped)' if self.truncated else ''}; "
                f"{self.records} records, {self.checkpoints} valid checkpoints"
            )
        elif verdict == "INCOMPLETE":
            lines.append(
                f"INCOMPLETE: {len(self.incomplete)} gap(s), {self.missing_decisions} "
                f"decision(s) known not recorded; {counts}"
            )
        else:
            lines.append(
                f"PARTIAL: {len(self.partial)} stream(s) begin after the start of the log; {counts}"
            )
        lines.extend(f"FAIL {p}" for p in self.problems)
        lines.extend(f"MISSING {g}" for g in self.incomplete)
        lines.extend(f"PARTIAL {g}" for g in self.partial)
        lines.extend(f"WARN {w}" for w in self.warnings)
        if len(self.streams) > 1 or self.notes:
            for s in self.streams:
                ending = "final checkpoint" if s.final else "no final checkpoint"
                signed_to = s.last_signed_seq if s.last_signed_seq is not None else "none"
                lines.append(
                    f"  stream {s.stream[:12]}: seq {s.first_seq}-{s.last_seq} "
                    f"({s.first_where} .. {s.last_where}), {s.records} records, "
                    f"signed up to seq {signed_to}, {ending}"
                )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class _Fragment:
    """Records that link one to the next, in input order."""

    start_seq: int
    start_prev: str
    start_where: str
    start_type: str
    start_file_first_line: bool
    first_index: int
    head_seq: int
    head_hash: str
    head_where: str
    last_index: int
    count: int = 1
    recent: deque[tuple[int, str, str]] = field(default_factory=lambda: deque(maxlen=_RECENT))


@dataclass
class _Stream:
    id: str
    fragments: list[_Fragment] = field(default_factory=list)
    by_head: dict[str, _Fragment] = field(default_factory=dict)
    summary: StreamSummary = field(default_factory=lambda: StreamSummary(""))
    final_seq: int | None = None
    final_where: str = ""
    link: dict[str, Any] | None = None  # stream_start.previous
    link_hash: str = ""
    link_where: str = ""
    sink: str = ""  # stream_start.sink
    removed_through: int = 0  # the writer said seq 1..this are gone (stream_reset/_trimmed)
    removed_reason: str = ""
    removed_where: str = ""
    successor: str = ""  # where a later file segment linked to this stream's last record


def _span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}-{last}"


def _records(count: int, start: str, end: str) -> str:
    return f"the record at {start}" if count == 1 else f"{count} records from {start} to {end}"


def _name(value: bytes | str) -> str:
    """A field name read from Redis, as text (undecodable bytes replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _is_hash(value: str) -> bool:
    return len(value) == HASH_LENGTH and set(value) <= _HEX


class Verifier:
    """Feed it records in file order (`add`), then `finish()` for the report."""

    def __init__(
        self,
        public_key: Ed25519PublicKey | None,
        *,
        allow_partial: bool = False,
        live: bool = False,
    ) -> None:
        self.public_key = public_key
        self.key_id = key_id(public_key) if public_key is not None else None
        self.allow_partial = allow_partial
        self.live = live
        self.report = Report()
        self.streams: dict[str, _Stream] = {}
        self.index = 0

    # --- reading -------------------------------------------------------------------------------

    def problem(self, where: str, stream: str, seq: int | None, kind: str, message: str) -> None:
        if len(self.report.problems) >= MAX_PROBLEMS:
            self.report.truncated = True
            return
        self.report.problems.append(Problem(where, stream, seq, kind, message))

    def gap(self, where: str, stream: str, seq: int | None, kind: str, message: str) -> None:
        """Records missing with the chain intact (INCOMPLETE_KINDS) or a missing beginning."""
        if len(self.report.gaps) >= MAX_PROBLEMS:
            self.report.truncated = True
            return
        self.report.gaps.append(Problem(where, stream, seq, kind, message))

    def add_line(self, raw: str | bytes, where: str, first_line_of_file: bool) -> None:
        self.report.lines += 1
        if not raw.strip():
            return
        record = parse_record(raw)
        if record is None:
            self.problem(
                where, "", None, "malformed", "not a JSON object (altered, or torn by a crash)"
            )
            return
        self.add(record, where, first_line_of_file)

    def add(self, record: dict[str, Any], where: str, first_line_of_file: bool = False) -> None:
        stream_id = record.get("stream")
        seq = record.get("seq")
        stored = record.get("hash")
        prev = record.get("prev_hash")
        kind = record.get("type")
        if (
            not isinstance(stream_id, str)
            or not stream_id
            or isinstance(seq, bool)
            or not isinstance(seq, int)
            or seq < 1
            or not isinstance(stored, str)
            or not _is_hash(stored)
            or not isinstance(prev, str)
            or not _is_hash(prev)
            or not isinstance(kind, str)
        ):
            self.problem(
                where,
                stream_id if isinstance(stream_id, str) else "",
                seq if isinstance(seq, int) else None,
                "malformed",
                "missing or invalid chain fields (stream, seq, prev_hash, hash, type)",
            )
            return
        self.index += 1
        stream = self.streams.get(stream_id)
        if stream is None:
            stream = self.streams[stream_id] = _Stream(stream_id)
            stream.summary = StreamSummary(stream_id, seq, seq, where, where)
            self.report.streams.append(stream.summary)
        summary = stream.summary
        if seq > summary.last_seq:
            summary.last_seq, summary.last_where = seq, where
        if seq < summary.first_seq:
            summary.first_seq, summary.first_where = seq, where

        body = {k: v for k, v in record.items() if k != "hash"}
        try:
            actual = hashlib.sha256(to_bytes(canonical(body))[1]).hexdigest()
        except (ValueError, TypeError):
            actual = ""
        if actual != stored:
            self.problem(
                where,
                stream_id,
                seq,
                "edited",
                "the record's content does not match its hash (a field was changed)",
            )
        if stream.final_seq is not None and seq > stream.final_seq:
            self.problem(
                where,
                stream_id,
                seq,
                "appended",
                f"comes after the stream's final checkpoint (seq {stream.final_seq}, "
                f"{stream.final_where}): added after the writer closed",
            )

        if kind == "decision":
            summary.records += 1
        elif kind == "checkpoint":
            self._checkpoint(stream, record, where, seq)
        elif kind == "stream_start":
            self._stream_start(stream, record, where, seq, prev)
        elif kind == "dropped":
            self._dropped(stream, record, where, seq)

        self._link(stream, seq, prev, stored, where, kind, first_line_of_file)

    def _checkpoint(self, stream: _Stream, record: dict[str, Any], where: str, seq: int) -> None:
        sid = stream.id
        summary = stream.summary
        valid = True
        if record.get("covered_seq") != seq - 1:
            self.problem(where, sid, seq, "malformed", "checkpoint covered_seq is not seq - 1")
            valid = False
        if self.public_key is not None:
            signature = record.get("signature")
            if not isinstance(signature, str) or not signature:
                self.problem(where, sid, seq, "unsigned", "checkpoint has no signature")
                valid = False
            elif record.get("key_id") != self.key_id:
                self.problem(
                    where,
                    sid,
                    seq,
                    "wrong_key",
                    f"checkpoint is signed with key {record.get('key_id')}, "
                    f"not the given public key ({self.key_id})",
                )
                valid = False
            elif not verify_signature(self.public_key, signature, signed_bytes(record)):
                self.problem(
                    where,
                    sid,
                    seq,
                    "bad_signature",
                    "checkpoint signature does not verify: the checkpoint was altered, or the "
                    "records before it were altered and re-hashed",
                )
                valid = False
        if valid:
            summary.checkpoints += 1
            summary.last_signed_seq = seq
        if record.get("final") is True:
            stream.final_seq = seq
            stream.final_where = where
            summary.final = True

    def _dropped(self, stream: _Stream, record: dict[str, Any], where: str, seq: int) -> None:
        count, reason = record.get("count"), record.get("reason")
        count = count if isinstance(count, int) and not isinstance(count, bool) else 0
        through = record.get("removed_through_seq")
        if reason in ("stream_reset", "stream_trimmed"):
            if isinstance(through, int) and not isinstance(through, bool) and 0 < through < seq:
                if through > stream.removed_through:
                    stream.removed_through, stream.removed_reason = through, str(reason)
                    stream.removed_where = where
                what = "deleted or replaced" if reason == "stream_reset" else "trimmed"
                self.gap(
                    where,
                    stream.id,
                    seq,
                    "reset" if reason == "stream_reset" else "trimmed",
                    f"the writer found the stream {what} under it between "
                    f"{record.get('since')} and {record.get('until')}: "
                    f"{_span(1, through)} ({through} record(s)) are no longer in the sink",
                )
            else:
                self.problem(
                    where, stream.id, seq, "malformed", f"{reason} without a valid seq range"
                )
            return
        self.report.missing_decisions += count
        self.gap(
            where,
            stream.id,
            seq,
            "dropped",
            f"{count} decision(s) were not recorded ({reason}) between "
            f"{record.get('since')} and {record.get('until')}",
        )

    def _stream_start(
        self, stream: _Stream, record: dict[str, Any], where: str, seq: int, prev: str
    ) -> None:
        stream.sink = str(record.get("sink") or "")
        if seq != 1:
            self.problem(where, stream.id, seq, "malformed", "stream_start is not seq 1")
        link = record.get("previous")
        if isinstance(link, dict) and isinstance(link.get("stream"), str):
            stream.link, stream.link_hash, stream.link_where = link, prev, where
        elif prev != ZERO_HASH:
            self.problem(
                where,
                stream.id,
                seq,
                "malformed",
                "stream_start links to nothing yet has a prev_hash",
            )

    def _link(
        self,
        stream: _Stream,
        seq: int,
        prev: str,
        digest: str,
        where: str,
        kind: str,
        first_line_of_file: bool,
    ) -> None:
        fragment = stream.by_head.get(prev)
        if fragment is not None and fragment.head_seq + 1 == seq:
            del stream.by_head[prev]
            fragment.recent.append((fragment.head_seq, fragment.head_hash, fragment.head_where))
            fragment.head_seq, fragment.head_hash, fragment.head_where = seq, digest, where
            fragment.last_index = self.index
            fragment.count += 1
        else:
            fragment = _Fragment(
                start_seq=seq,
                start_prev=prev,
                start_where=where,
                start_type=kind,
                start_file_first_line=first_line_of_file,
                first_index=self.index,
                head_seq=seq,
                head_hash=digest,
                head_where=where,
                last_index=self.index,
            )
            stream.fragments.append(fragment)
        stream.by_head[digest] = fragment

    # --- judging -------------------------------------------------------------------------------

    def finish(self) -> Report:
        ends: dict[str, tuple[int, str, str]] = {}
        for stream in self.streams.values():
            end = self._judge(stream)
            if end is not None:
                ends[stream.id] = end
        for stream in self.streams.values():
            self._judge_link(stream, ends)
        for stream in self.streams.values():
            self._judge_end(stream, ends.get(stream.id))
        if not self.streams and not self.report.problems:
            # A writer opens every stream with a record: a log with none was emptied (or
            # never written), which is not "nothing missing".
            self.report.gaps.append(
                Problem(
                    "input",
                    "",
                    None,
                    "empty",
                    f"no audit records in {self.report.lines} line(s): the log was emptied, "
                    "or no writer ever wrote to it",
                )
            )
        return self.report

    def _judge(self, stream: _Stream) -> tuple[int, str, str] | None:
        """Joins the stream's fragments; returns its chain end (seq, hash, where)."""
        sid = stream.id
        fragments = sorted(stream.fragments, key=lambda f: (f.start_seq, f.first_index))
        if not fragments:
            return None
        fragments = self._drop_strays(stream, fragments)
        first = fragments[0]
        self._judge_beginning(stream, first)
        current = first
        for nxt in fragments[1:]:
            if nxt.start_seq == current.head_seq + 1:
                if nxt.start_prev == current.head_hash:
                    self.problem(
                        nxt.start_where,
                        sid,
                        nxt.start_seq,
                        "reordered",
                        f"seq {nxt.start_seq} ({nxt.start_where}) comes before seq "
                        f"{current.head_seq} ({current.head_where}): records were moved",
                    )
                else:
                    self.problem(
                        nxt.start_where,
                        sid,
                        nxt.start_seq,
                        "altered",
                        f"prev_hash does not match seq {current.head_seq} "
                        f"({current.head_where}): that record was altered and re-hashed, "
                        "or replaced",
                    )
                current = nxt
            elif nxt.start_seq > current.head_seq + 1:
                missing = _span(current.head_seq + 1, nxt.start_seq - 1)
                count = nxt.start_seq - current.head_seq - 1
                self.problem(
                    nxt.start_where,
                    sid,
                    current.head_seq + 1,
                    "deleted",
                    f"{missing} missing ({count} record(s) deleted) between "
                    f"{current.head_where} (seq {current.head_seq}) and "
                    f"{nxt.start_where} (seq {nxt.start_seq})",
                )
                current = nxt
            else:
                current = self._judge_fork(sid, current, nxt)
        summary = stream.summary
        last_signed = summary.last_signed_seq or 0
        if current.head_seq > last_signed:
            tail = current.head_seq - last_signed
            summary.unsigned_tail = tail
            if last_signed:
                self.report.warnings.append(
                    f"stream {sid[:12]}: {tail} record(s) after the last valid checkpoint "
                    f"({_span(last_signed + 1, current.head_seq)}, up to {current.head_where}) "
                    "are not signed: they could have been cut or changed without trace"
                )
            else:
                self.report.warnings.append(
                    f"stream {sid[:12]}: no valid checkpoint: none of its {tail} record(s) "
                    f"({_span(first.start_seq, current.head_seq)}) are signed"
                )
        return current.head_seq, current.head_hash, current.head_where

    def _judge_end(self, stream: _Stream, end: tuple[int, str, str] | None) -> None:
        """A stream must end with its final checkpoint, unless `live` and its writer may be
        still running (no later file segment says it restarted)."""
        if stream.final_seq is not None or end is None:
            return
        sid = stream.id
        end_seq, _, end_where = end
        if stream.successor:
            self.gap(
                end_where,
                sid,
                end_seq,
                "unclosed",
                f"the stream ends at seq {end_seq} without a final checkpoint, and its writer "
                f"started again ({stream.successor}): it stopped without closing (killed or "
                "crashed), losing the decisions it had accepted but not written (how many is "
                "not known)",
            )
        elif self.live:
            self.report.notes.append(
                f"stream {sid[:12]} has no final checkpoint: accepted as still being written "
                "(--live)"
            )
        else:
            self.gap(
                end_where,
                sid,
                end_seq,
                "unclosed",
                f"the stream ends at seq {end_seq} without a final checkpoint: its writer "
                "was killed or is still running (use --live for a log being written), or "
                "the end of the stream was cut",
            )

    def _drop_strays(self, stream: _Stream, fragments: list[_Fragment]) -> list[_Fragment]:
        """Removes (and reports) records inserted inside the chain that link to nothing."""
        heads = {f.head_hash for f in fragments}
        hashes: set[str] = set(heads)
        for f in fragments:
            hashes.update(h for _, h, _ in f.recent)
        kept: list[_Fragment] = []
        for f in fragments:
            inside = any(
                o is not f and o.first_index < f.first_index and f.last_index < o.last_index
                for o in fragments
            )
            if inside and f.start_prev not in hashes and f is not fragments[0]:
                self.problem(
                    f.start_where,
                    stream.id,
                    f.start_seq,
                    "inserted",
                    f"{_records(f.count, f.start_where, f.head_where)} "
                    f"({_span(f.start_seq, f.head_seq)}) sits inside the chain but links to "
                    "nothing in it",
                )
            else:
                kept.append(f)
        return kept

    def _judge_beginning(self, stream: _Stream, first: _Fragment) -> None:
        if first.start_type == "stream_start":
            return
        if 0 < first.start_seq - 1 <= stream.removed_through:
            return  # the writer said so in the chain: reported with its record
        if first.start_type == "file_start" and first.start_file_first_line:
            self.gap(
                first.start_where,
                stream.id,
                first.start_seq,
                "head_missing",
                f"the stream begins at seq {first.start_seq}, the start of a rotated file: "
                f"{_span(1, first.start_seq - 1)} are in files not given (or deleted by "
                "file_keep)",
            )
            return
        if self.allow_partial:
            self.gap(
                first.start_where,
                stream.id,
                first.start_seq,
                "trimmed",
                f"the stream begins mid-chain at seq {first.start_seq}: "
                f"{_span(1, first.start_seq - 1)} are not in the input (trimmed, or an "
                "excerpt; accepted as such with --partial)",
            )
            return
        self.problem(
            first.start_where,
            stream.id,
            first.start_seq,
            "cut",
            f"the stream begins mid-chain at seq {first.start_seq} with a "
            f"{first.start_type} record: the records before it were removed "
            "(use --partial for an excerpt, such as a trimmed Redis Stream)",
        )

    def _judge_fork(self, sid: str, current: _Fragment, nxt: _Fragment) -> _Fragment:
        """Two fragments claim the same seq: one branch was inserted. Returns the survivor."""
        fork = next(
            ((s, w) for s, h, w in current.recent if h == nxt.start_prev),
            None,
        )
        if fork is None:
            self.problem(
                nxt.start_where,
                sid,
                nxt.start_seq,
                "inserted",
                f"{_span(nxt.start_seq, nxt.head_seq)} ({nxt.start_where} .. {nxt.head_where}) "
                f"repeats seq numbers already used up to {current.head_where}",
            )
            return current if current.head_seq >= nxt.head_seq else nxt
        fork_seq, fork_where = fork
        branch_len = current.head_seq - fork_seq
        if nxt.count >= branch_len:
            # The chain goes on with `nxt`; `current`'s records after the fork were inserted.
            after = [w for s, _, w in current.recent if s == fork_seq + 1]
            inserted_from = after[0] if after else current.head_where
            self.problem(
                inserted_from,
                sid,
                fork_seq + 1,
                "inserted",
                f"{_records(branch_len, inserted_from, current.head_where)} branches off "
                f"after seq {fork_seq} ({fork_where}); the chain continues at {nxt.start_where}",
            )
            return nxt
        self.problem(
            nxt.start_where,
            sid,
            nxt.start_seq,
            "inserted",
            f"{_records(nxt.count, nxt.start_where, nxt.head_where)} branches off after "
            f"seq {fork_seq} ({fork_where}); the chain continues elsewhere",
        )
        return current

    def _judge_link(self, stream: _Stream, ends: dict[str, tuple[int, str, str]]) -> None:
        """A segment that started after another checks that one's end is still there."""
        link = stream.link
        if link is None:
            return
        previous_id, previous_seq = link.get("stream"), link.get("seq")
        end = ends.get(str(previous_id))
        if end is None:
            self.report.notes.append(
                f"stream {stream.id[:12]} ({stream.link_where}) continues from stream "
                f"{str(previous_id)[:12]} seq {previous_seq}, which is not in the input"
            )
            return
        end_seq, end_hash, end_where = end
        if not isinstance(previous_seq, int):
            return
        if end_seq < previous_seq:
            self.problem(
                end_where,
                str(previous_id),
                end_seq + 1,
                "deleted",
                f"the stream ends at seq {end_seq} ({end_where}), but when the writer restarted "
                f"({stream.link_where}) it ended at seq {previous_seq}: "
                f"{_span(end_seq + 1, previous_seq)} cut",
            )
        elif end_seq == previous_seq and end_hash == stream.link_hash:
            if stream.sink == "file":  # one writer per file: the previous one is over
                previous = self.streams.get(str(previous_id))
                if previous is not None:
                    previous.successor = stream.link_where
        elif end_seq == previous_seq and end_hash != stream.link_hash:
            self.problem(
                end_where,
                str(previous_id),
                end_seq,
                "altered",
                f"the stream's last record is not the one the restart at {stream.link_where} "
                "linked to: it was altered or replaced",
            )
        elif end_seq > previous_seq:
            self.report.notes.append(
                f"stream {str(previous_id)[:12]} went on past seq {previous_seq} after stream "
                f"{stream.id[:12]} started ({stream.link_where}): two writers shared the sink"
            )


def iter_lines(paths: Sequence[Path]) -> Iterator[tuple[bytes, str, bool]]:
    """(line, "file:line", first line of its file) for every line of the files, in order."""
    for path in paths:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                yield line, f"{path}:{number}", number == 1


def verify_lines(
    lines: Iterable[tuple[bytes | str, str, bool]],
    public_key: Ed25519PublicKey | None,
    *,
    allow_partial: bool = False,
    live: bool = False,
) -> Report:
    """Verify records given as (line, "where", first line of a file), in stored order."""
    verifier = Verifier(public_key, allow_partial=allow_partial, live=live)
    for raw, where, first in lines:
        verifier.add_line(raw, where, first)
    return _finish(verifier, public_key)


def _finish(verifier: Verifier, public_key: Ed25519PublicKey | None) -> Report:
    report = verifier.finish()
    if not report.streams:
        report.warnings.append("no audit records in the input")
    if public_key is None:
        report.warnings.append("signatures not checked (no public key given)")
    return report


def verify_files(
    paths: Sequence[Path],
    public_key: Ed25519PublicKey | None,
    *,
    allow_partial: bool = False,
    live: bool = False,
) -> Report:
    """Verify files given oldest first (rotated files before the live one)."""
    return verify_lines(iter_lines(paths), public_key, allow_partial=allow_partial, live=live)


def verify_redis(
    url: str,
    stream: str,
    public_key: Ed25519PublicKey | None,
    *,
    allow_partial: bool = False,
    live: bool = False,
    page: int = 500,
) -> Report:
    """Verify a Redis Stream read with XRANGE (each record's place is `stream@entry-id`).

    The writer adds entries of exactly one field, `record`, holding a record: any other entry
    (no `record`, an empty one, other fields besides) was written by someone else and is a
    problem (`foreign`), never passed over. Adds a note with how many entries the stream has
    lost from its head (Redis 7's `entries-added` minus `length`, from XINFO STREAM). Raises
    redis.RedisError when the server cannot be read.
    """
    import redis

    from policy_engine.audit.sinks.redis import RECORD_FIELD, stream_entries

    client = redis.Redis.from_url(url)
    field = RECORD_FIELD.encode()
    try:
        verifier = Verifier(public_key, allow_partial=allow_partial, live=live)
        low: str = "-"
        while True:
            entries = stream_entries(client.xrange(stream, min=low, count=page))
            for entry_id, fields in entries:
                where = f"{stream}@{entry_id}"
                raw = fields.get(field, b"")
                if set(fields) != {field} or not raw.strip():
                    names = ", ".join(sorted(repr(_name(k)) for k in fields))
                    verifier.problem(
                        where,
                        "",
                        None,
                        "foreign",
                        f"an entry the audit writer never writes (fields: {names[:200]}; the "
                        f"writer adds one field, {RECORD_FIELD!r}, holding a record)",
                    )
                    if not raw.strip():
                        continue
                verifier.add_line(raw, where, False)
            if len(entries) < page:
                break
            low = "(" + entries[-1][0]
        report = _finish(verifier, public_key)
        try:
            info = client.xinfo_stream(stream)
        except redis.ResponseError:
            report.notes.append(f"Redis Stream {stream} does not exist")
            return report
        removed = (info.get("entries-added") or 0) - (info.get("length") or 0)
        if removed > 0:
            report.notes.append(
                f"Redis Stream {stream} has lost {removed} entries since it was created "
                "(trimmed by MAXLEN or XTRIM, or deleted with XDEL)"
            )
        return report
    finally:
        client.close()
