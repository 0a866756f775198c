"""The PolicyDecisionService: a thin gRPC adapter over the decision pipeline.

Every decision is made by one `Decider` (`policy_engine.decision`): `Check` is a batch of one,
`CheckBatch` a batch of its items. Both are coroutines on the asyncio server's event loop,
bounded by the caller's deadline (a call whose deadline has passed is answered
DEADLINE_EXCEEDED and not evaluated). This module only refuses what is malformed at the RPC
level (an empty or oversized batch), maps an `Invalid` outcome of a `Check` to
INVALID_ARGUMENT naming the offending fields (with `kontext_validation_error` in the details),
observes the RPC's latency, and returns the pipeline's answer.

Every answer is ALLOW or DENY. A request that cannot be decided (a bug, a failing policy
source, no valid policy set loaded) is answered DENY with `kontext_server_error`, never an RPC
failure; what may be cached, the audit records and the decision counts are the pipeline's (see
`policy_engine.decision.pipeline`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit import AuditLog
from policy_engine.config import Settings
from policy_engine.decision import DeadlineExceeded, Decider, DecisionMetrics, Invalid, Observer
from policy_engine.decision.pipeline import (
    FROM_SETTINGS,
    NO_POLICY_SET_MESSAGE,
    SERVER_ERROR_MESSAGE,
    Clock,
    DecisionStore,
    PolicySource,
    answer_fingerprint,
    utc_now,
)
from policy_engine.domain.codes import ErrorCode, docs_url
from policy_engine.metrics import DECISION_LATENCY
from policy_engine.quota import QuotaStore
from policy_engine.server.convert import RequestConverter
from policy_engine.server.errors import Status, invalid_argument
from policy_engine.server.recording import DecisionRecorder

if TYPE_CHECKING:
    from policy_engine.tracing.otel import Tracing

SERVICE_NAME = pdp_pb2.DESCRIPTOR.services_by_name["PolicyDecisionService"].full_name

log = logging.getLogger(__name__)

_DEFAULT_THREADS = Settings().threads  # the `threads` default: no warning for it
_threads_warned = False

__all__ = [
    "NO_POLICY_SET_MESSAGE",
    "SERVER_ERROR_MESSAGE",
    "SERVICE_NAME",
    "AsyncContext",
    "Clock",
    "PolicyDecisionServicer",
    "PolicySource",
    "answer_fingerprint",
    "build_decider",
    "deadline_of",
    "utc_now",
]


class AsyncContext(Protocol):
    """What the asyncio handlers use of `grpc.aio.ServicerContext`."""

    def time_remaining(self) -> float | None: ...

    async def abort_with_status(self, status: grpc.Status) -> NoReturn: ...


def deadline_of(context: AsyncContext) -> float | None:
    """The caller's deadline on the `time.monotonic()` clock, None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def build_decider(
    policy_source: PolicySource,
    settings: Settings,
    *,
    clock: Clock | None = None,
    cache: DecisionStore | None = FROM_SETTINGS,
    audit: AuditLog | None = None,
    quotas: QuotaStore | None = FROM_SETTINGS,
    tracing: Tracing | None = None,
) -> Decider:
    """The server's pipeline: the cache from the settings (unless `cache` is given; None turns
    it off), and as observers the decisions metric and, with an enabled audit log, its
    recorder. The decider does not own the audit log (the server closes it after the last
    RPC has been answered). `quotas`: the quota counter store (the server passes the one it
    starts and stops; by default the decider builds one from the settings when a quota first
    needs it). With `tracing` (the "tracing" component, tracing on) the pipeline is its traced
    one. Raises ConfigError when the cache settings cannot be used."""
    _warn_threads(settings)
    observers: list[Observer] = [DecisionMetrics()]
    if audit is not None and audit.enabled:
        observers.append(DecisionRecorder(audit, RequestConverter(settings.limits)))
    # The default clock is read as a float by the pipeline (no datetime on the hit path).
    clock = None if clock is utc_now else clock
    if tracing is not None:
        return tracing.decider(
            policy_source, settings, clock=clock, cache=cache, observers=observers, quotas=quotas
        )
    return Decider(
        policy_source, settings, clock=clock, cache=cache, observers=observers, quotas=quotas
    )


def _warn_threads(settings: Settings) -> None:
    """`threads` sized the old server's handler threads, then a Redis lookup pool; nothing
    uses it now (calls and Redis are on the event loop). Old configurations keep working:
    one warning per process when it is set to anything but its default."""
    global _threads_warned
    if settings.threads != _DEFAULT_THREADS and not _threads_warned:
        _threads_warned = True
        log.warning(
            "setting threads (%d) is ignored: calls and Redis lookups run on the event loop; "
            "remove it from the configuration",
            settings.threads,
        )


class PolicyDecisionServicer(pdp_pb2_grpc.PolicyDecisionServiceServicer):
    """Answers Check and CheckBatch from a `Decider` (see the module docstring), built by
    `build_decider` from the policy source, the settings and `clock`, `cache`, `audit` as
    there (the server passes the cache it starts and stops itself); `tracing` as there (the
    traced servicer, `policy_engine.tracing.otel.TracedServicer`, passes it). `decider` is the
    pipeline; `close()` closes it (which stops only a cache it built itself).
    """

    def __init__(
        self,
        policy_source: PolicySource,
        settings: Settings,
        clock: Clock | None = None,
        *,
        cache: DecisionStore | None = FROM_SETTINGS,
        audit: AuditLog | None = None,
        quotas: QuotaStore | None = FROM_SETTINGS,
        tracing: Tracing | None = None,
    ) -> None:
        self.decider = build_decider(
            policy_source,
            settings,
            clock=clock,
            cache=cache,
            audit=audit,
            quotas=quotas,
            tracing=tracing,
        )
        self._max_batch = settings.limits.max_batch_size
        self._validation_docs = docs_url(settings.docs_base_url, ErrorCode.VALIDATION_ERROR)
        # Labelled metric children, bound once (a `labels()` call costs a lock and a lookup).
        self._latency: dict[tuple[str, str], Any] = {
            (method, level): DECISION_LATENCY.labels(method, level)
            for method in ("Check", "CheckBatch")
            for level in ("none", "local", "redis", "mixed")
        }

    @property
    def cache(self) -> Any:
        """The decider's cache (a `DecisionCache` unless one of another kind was injected)."""
        return self.decider.cache

    @property
    def _source(self) -> PolicySource:
        """The decider's policy source; tests swap it as a reload does."""
        return self.decider.source

    @_source.setter
    def _source(self, source: PolicySource) -> None:
        self.decider.source = source

    def close(self) -> None:
        """Close the decider: stops the cache's writer and Redis pool if the decider built it."""
        self.decider.close()

    # --- RPCs ----------------------------------------------------------------------------------

    async def Check(
        self, request: pdp_pb2.CheckRequest, context: AsyncContext
    ) -> pdp_pb2.CheckResponse:
        """One decision, bounded by the caller's deadline."""
        try:
            decisions = await self.decider.decide((request,), deadline_of(context))
        except DeadlineExceeded as exc:
            await context.abort_with_status(Status(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)))
        outcome = decisions.outcomes[0]
        self._latency["Check", decisions.level].observe(time.perf_counter() - decisions.started)
        if isinstance(outcome, Invalid):
            await context.abort_with_status(self._invalid(outcome.violations, request.request_id))
        return decisions.only()

    async def CheckBatch(
        self, request: pdp_pb2.CheckBatchRequest, context: AsyncContext
    ) -> pdp_pb2.CheckBatchResponse:
        """A batch's decisions, bounded by the caller's deadline."""
        items = request.items
        problem = self._batch_problem(len(items))
        if problem is not None:
            await context.abort_with_status(self._invalid([problem]))
        try:
            decisions = await self.decider.decide(items, deadline_of(context))
        except DeadlineExceeded as exc:
            await context.abort_with_status(Status(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)))
        response = decisions.batch()
        self._latency["CheckBatch", decisions.level].observe(
            time.perf_counter() - decisions.started
        )
        return response

    def _batch_problem(self, count: int) -> tuple[str, str] | None:
        """Why a batch of `count` items is refused at the RPC level, None when it is not."""
        if count == 0:
            return ("items", "the batch is empty")
        if count > self._max_batch:
            return ("items", f"the batch has {count} items; at most {self._max_batch} allowed")
        return None

    def _invalid(self, violations: list[tuple[str, str]], request_id: str = "") -> grpc.Status:
        return invalid_argument(violations, docs_url=self._validation_docs, request_id=request_id)
