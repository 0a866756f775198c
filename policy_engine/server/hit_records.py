"""The audit record of a cache hit, prepared off the request path and remembered per key.

A hit is answered from stored response bytes, so the request path never builds the domain
request or decision its audit record needs; the audit writer's thread does, through
`HitRecords`. Converting the message, parsing the stored response and serializing the record
cost ~25 µs, so the serialized record is remembered per cache key: the key covers everything
in the request but `request_id` and `context.time`, so a later hit under the same key (with
the same stored response) only fills in those and the per-call fields, about 2 µs.
"""

from __future__ import annotations

import threading

from policy_engine.api import pdp_pb2
from policy_engine.audit.record import PreparedHit, PreparedRecord
from policy_engine.domain.decision import Decision
from policy_engine.domain.request import CheckRequest
from policy_engine.server.convert import (
    RequestConverter,
    decision_from_response,
    timestamp_to_datetime,
)

DEFAULT_MAX_ENTRIES = 4096


class HitRecords:
    """Audit inputs for cache hits; thread-safe, bounded (the oldest entry is evicted)."""

    def __init__(self, converter: RequestConverter, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._converter = converter
        self._max = max(max_entries, 1)
        self._memo: dict[str, tuple[bytes, PreparedRecord]] = {}
        self._lock = threading.Lock()

    def __call__(
        self, msg: pdp_pb2.CheckRequest, key: str, template: bytes
    ) -> PreparedHit | tuple[CheckRequest, Decision]:
        context_time = (
            timestamp_to_datetime(msg.context.time) if msg.context.HasField("time") else None
        )
        remembered = self._memo.get(key)
        # The same key can hold another answer later (an entry expired and was re-decided).
        if remembered is not None and remembered[0] == template:
            return PreparedHit(remembered[1], msg.request_id, context_time)
        request, _ = self._converter.convert(msg)
        decision = decision_from_response(pdp_pb2.CheckResponse.FromString(template))
        try:
            prepared = PreparedRecord(request, decision)
        except (ValueError, TypeError):  # unusual attributes: the writer's general path
            return request, decision
        with self._lock:
            if len(self._memo) >= self._max:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = (template, prepared)
        return PreparedHit(prepared, msg.request_id, context_time)
