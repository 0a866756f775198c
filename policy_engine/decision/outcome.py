"""What the decision pipeline produces: one typed outcome per request, and the batch's answer.

Every outcome names the request message it answers (`item`), the decision ID it was answered
with (32 ASCII hex bytes, as on the wire), and the proto effect number and first reason code
the decisions metric counts. The four kinds say how the answer came about:

- `CacheHit`: answered from a stored response template; no domain request or decision was
  built (the audit log builds them off the request path from `key` and `template`);
- `Decided`: the engine decided (ALLOW or DENY), `stored` when the answer went to the cache;
- `Invalid`: the request was refused as malformed (a `kontext_validation_error` deny): `Check`
  fails the RPC with INVALID_ARGUMENT naming `violations`, a `CheckBatch` item is answered;
- `ServerError`: nothing could decide (no policy set loaded, the policy source, the clock or
  the engine failed): answered DENY with `kontext_server_error`.

Observers tell them apart by type (`isinstance` or `match`), never by shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from policy_engine.domain.codes import ErrorCode

if TYPE_CHECKING:
    from policy_engine.api import pdp_pb2
    from policy_engine.cache import CacheLevel
    from policy_engine.domain.decision import Decision
    from policy_engine.domain.request import CheckRequest


@dataclass(slots=True)
class Outcome:
    """What every outcome has; see the subclasses for how it came about."""

    item: pdp_pb2.CheckRequest  # the request message as received
    decision_id: bytes  # 32 ASCII hex bytes, the answer's decision_id
    effect: int  # the answer's proto Effect number
    code: str  # the first reason's code, "" for an allow without reasons


@dataclass(slots=True)
class CacheHit(Outcome):
    """Answered from the cache: `template` is the stored response, `key` its cache key;
    `key_set` the fingerprint of the organization's token key set, which salts `key` (so the
    stored answer was decided with those keys), when the request carries a token; else b""."""

    key: str
    template: bytes
    level: CacheLevel
    key_set: bytes = b""


@dataclass(slots=True)
class Decided(Outcome):
    """Decided by the engine; `stored` when the answer was handed to the cache."""

    request: CheckRequest
    decision: Decision
    stored: bool = False


@dataclass(slots=True)
class Invalid(Outcome):
    """Refused as malformed; `request` is None when not even a domain request could be built."""

    request: CheckRequest | None
    decision: Decision

    @property
    def violations(self) -> list[tuple[str, str]]:
        """`(field, message)` of each validation reason, for the RPC error's details."""
        return [
            (r.field, r.message)
            for r in self.decision.reasons
            if r.code is ErrorCode.VALIDATION_ERROR
        ]


@dataclass(slots=True)
class ServerError(Outcome):
    """Denied because nothing could decide; `request` is set when one had been built."""

    request: CheckRequest | None
    decision: Decision


@dataclass(slots=True)
class Decisions:
    """One call's outcomes, in request order, and the answer built from them.

    `level` is the latency label: "local" or "redis" when the cache answered every item
    ("redis" if any came from Redis), "none" when it answered none, "mixed" otherwise.
    `started` is the `time.perf_counter()` reading the call began at; `at` the clock reading
    (unix seconds) every item was decided at. `trace` is the (trace ID, span ID) of the
    call's span, in hex, when tracing is on and a span is active (the audit records carry
    them); tracing's observer sets it before the others see the call.
    """

    outcomes: list[Outcome]
    level: str
    started: float
    at: float
    _single: pdp_pb2.CheckResponse | None = None
    _batch: pdp_pb2.CheckBatchResponse | None = None
    trace: tuple[str, str] | None = None

    def replace(self, index: int, outcome: Outcome, response: pdp_pb2.CheckResponse) -> None:
        """Item `index` answered anew (a quota turned its ALLOW into a DENY): its outcome and
        its answer in the single or batch response, before any observer has seen them."""
        self.outcomes[index] = outcome
        if self._single is not None and len(self.outcomes) == 1:
            self._single = response
        if self._batch is not None:
            self._batch.results[index].CopyFrom(response)

    def only(self) -> pdp_pb2.CheckResponse:
        """The answer of a batch of one (`Check`); ValueError for a larger batch."""
        if self._single is None:
            raise ValueError(f"a batch of {len(self.outcomes)} has no single answer")
        return self._single

    def batch(self) -> pdp_pb2.CheckBatchResponse:
        """The answers as one `CheckBatchResponse`, in request order."""
        if self._batch is None:
            from policy_engine.api import pdp_pb2

            self._batch = pdp_pb2.CheckBatchResponse(results=[self.only()])
        return self._batch
