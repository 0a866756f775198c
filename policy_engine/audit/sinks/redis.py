"""Redis Stream sink: one XADD per record, trimmed with `MAXLEN ~`.

Each entry has a single field, `record`, holding the record's JSON line. The sink never creates
or needs a consumer group: consumers create their own (`XGROUP CREATE <stream> <group> 0
MKSTREAM`) and read with XREADGROUP. Several writers (server processes) may share one stream:
each record names its own chain segment (`stream`), which is how `verify` separates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from policy_engine.audit.chain import Sealed
from policy_engine.audit.sinks.base import OpenState, Sink, parse_record

RECORD_FIELD = "record"
_LOOK_BACK = 1000  # entries searched for this chain's last one after an uncertain write


class RedisStreamSink(Sink):
    """Writes a batch in one MULTI/EXEC, so it lands whole or not at all.

    When a batch fails in a way that leaves its outcome unknown (the connection dropped after
    EXEC was sent), the retry first reads the stream's last entry and skips what is already
    there, so no record is written twice.
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
        self._uncertain = False

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
        entries = self._connect().xrevrange(self.stream, count=1)
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
            self._uncertain = False
            if not records:
                return
        client = self._connect()
        try:
            pipe = client.pipeline(transaction=True)
            for record in records:
                pipe.xadd(
                    self.stream,
                    {RECORD_FIELD: record.line},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            pipe.execute()
        except Exception:
            self._uncertain = True
            raise

    def _unwritten(self, records: Sequence[Sealed]) -> Sequence[Sealed]:
        """Drops the records the stream already holds (a batch that did land before an error).

        Other writers may share the stream, so this looks back for this chain's newest entry.
        """
        if not records:
            return records
        ours = (parse_record(records[0].line) or {}).get("stream")
        for _, fields in self._connect().xrevrange(self.stream, count=_LOOK_BACK):
            raw = fields.get(RECORD_FIELD.encode()) or fields.get(RECORD_FIELD)
            entry = parse_record(raw) if raw is not None else None
            if entry and entry.get("stream") == ours and isinstance(entry.get("seq"), int):
                return [r for r in records if r.seq > entry["seq"]]
        return records

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
