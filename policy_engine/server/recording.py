"""What the decision pipeline hands the audit log: one record per decision, as cheaply as it can.

`DecisionRecorder` is an observer of the pipeline (`policy_engine.decision`): it turns each
typed outcome into an audit record: a decision the engine made or refused as invalid (the
domain request and decision exist), one made without a domain request (a server error: the
message's raw fields), and a cache hit (only the message and the stored response bytes
exist). Latency is measured from the start of the pipeline's call.

A hit is answered from stored response bytes, so the request path never builds the domain
request or decision its audit record needs; the audit writer's thread does, through
`HitRecords`. Converting the message, parsing the stored response and serializing the record
cost ~25 µs, so the serialized record is remembered per cache key: the key covers everything
in the request but `request_id` and `context.time`, so a later hit under the same key (with
the same stored response) only fills in those and the per-call fields, about 2 µs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable
from dataclasses import replace
from functools import partial

from policy_engine.api import pdp_pb2
from policy_engine.audit import AuditLog
from policy_engine.audit.record import PreparedHit, PreparedRecord
from policy_engine.decision.outcome import CacheHit, Decided, Decisions, Invalid, ServerError
from policy_engine.domain.decision import Decision
from policy_engine.domain.request import CheckRequest
from policy_engine.server.convert import (
    RequestConverter,
    decision_from_response,
    raw_fields,
    timestamp_to_datetime,
)

CACHE_LEVEL_LABELS: dict[int, str] = {
    pdp_pb2.CACHE_LEVEL_NONE: "none",
    pdp_pb2.CACHE_LEVEL_LOCAL: "local",
    pdp_pb2.CACHE_LEVEL_REDIS: "redis",
}

DEFAULT_MAX_ENTRIES = 4096


class HitRecords:
    """Audit inputs for cache hits; thread-safe, bounded (the oldest entry is evicted)."""

    def __init__(self, converter: RequestConverter, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._converter = converter
        self._max = max(max_entries, 1)
        self._memo: dict[str, tuple[bytes, PreparedRecord]] = {}
        self._lock = threading.Lock()

    def __call__(
        self, msg: pdp_pb2.CheckRequest, key: str, template: bytes, key_set: bytes = b""
    ) -> PreparedHit | tuple[CheckRequest, Decision]:
        """The hit's audit inputs; `key_set`: `CacheHit.key_set` (the same for every hit under
        `key`, which it salts)."""
        context_time = (
            timestamp_to_datetime(msg.context.time) if msg.context.HasField("time") else None
        )
        remembered = self._memo.get(key)
        # The same key can hold another answer later (an entry expired and was re-decided).
        if remembered is not None and remembered[0] == template:
            return PreparedHit(remembered[1], msg.request_id, context_time)
        request, _ = self._converter.convert(msg)
        decision = decision_from_response(pdp_pb2.CheckResponse.FromString(template))
        if key_set:
            decision = replace(decision, token_key_set=key_set)
        try:
            prepared = PreparedRecord(request, decision)
        except (ValueError, TypeError):  # unusual attributes: the writer's general path
            return request, decision
        with self._lock:
            if len(self._memo) >= self._max:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = (template, prepared)
        return PreparedHit(prepared, msg.request_id, context_time)


class DecisionRecorder:
    """Queues the audit record of each decision the servicer answers (see the module doc)."""

    def __init__(self, audit: AuditLog, converter: RequestConverter) -> None:
        self._audit = audit
        self._hit_records = HitRecords(converter)

    def decided(
        self,
        msg: pdp_pb2.CheckRequest,
        request: CheckRequest | None,
        decision: Decision,
        decision_id: str | bytes,
        started: float,
        at: float,
        trace: tuple[str, str] | None = None,
    ) -> None:
        """A decision the engine (or validation) made; `request` None if none could be built.
        `trace`: the call's (trace ID, span ID) when traced."""
        if request is None:
            self.unconverted(msg, decision, decision_id, started, trace)
            return
        self._audit.record(
            request,
            decision,
            decision_id=decision_id,
            latency_ms=(time.perf_counter() - started) * 1000,
            at=at,
            trace=trace,
        )

    def unconverted(
        self,
        msg: pdp_pb2.CheckRequest,
        decision: Decision,
        decision_id: str | bytes,
        started: float,
        trace: tuple[str, str] | None = None,
    ) -> None:
        """A decision made without a domain request (a server error), from the message."""
        self._audit.record_invalid(
            decision,
            decision_id=decision_id.decode() if isinstance(decision_id, bytes) else decision_id,
            latency_ms=(time.perf_counter() - started) * 1000,
            trace=trace,
            **raw_fields(msg),
        )

    def hit(
        self,
        msg: pdp_pb2.CheckRequest,
        key: str,
        template: bytes,
        decision_id: bytes,
        level: int,
        started: float,
        at: float,
        trace: tuple[str, str] | None = None,
        key_set: bytes = b"",
    ) -> None:
        """A cache hit: the record is built on the writer's thread from the stored response
        (`key_set`: `CacheHit.key_set`)."""
        self._audit.record_lazy(
            partial(self._hit_records, msg, key, template, key_set),
            decision_id=decision_id,
            cache_level=CACHE_LEVEL_LABELS[level],
            latency_ms=(time.perf_counter() - started) * 1000,
            at=at,
            trace=trace,
        )

    def admit(self, count: int, deadline: float | None) -> Awaitable[None] | None:
        """The audit log's wait for room for `count` records (`AuditLog.admit`)."""
        return self._audit.admit(count, deadline)

    def observe(self, decisions: Decisions) -> None:
        """Queue one record per outcome, in order (the pipeline's observer entry)."""
        started, at, trace = decisions.started, decisions.at, decisions.trace
        for outcome in decisions.outcomes:
            match outcome:
                case CacheHit():
                    self.hit(
                        outcome.item,
                        outcome.key,
                        outcome.template,
                        outcome.decision_id,
                        outcome.level,
                        started,
                        at,
                        trace,
                        outcome.key_set,
                    )
                case Decided() | Invalid() | ServerError():
                    self.decided(
                        outcome.item,
                        outcome.request,
                        outcome.decision,
                        outcome.decision_id,
                        started,
                        at,
                        trace,
                    )
