"""The PolicyDecisionService: a thin gRPC adapter over the decision pipeline.

Every decision is made by one `Decider` (`policy_engine.decision`): `Check` is a batch of one,
`CheckBatch` a batch of its items. This module only refuses what is malformed at the RPC level
(an empty or oversized batch), maps an `Invalid` outcome of a `Check` to INVALID_ARGUMENT
naming the offending fields (with `kontext_validation_error` in the details), observes the
RPC's latency, and returns the pipeline's answer.

The asyncio server calls `check_async` and `check_batch_async` (on its event loop, with the
caller's deadline: a call whose deadline has passed is answered DEADLINE_EXCEEDED and not
evaluated); `Check` and `CheckBatch` are the same adapter for synchronous callers (the
in-process benchmark, tests).

Every answer is ALLOW or DENY. A request that cannot be decided (a bug, a failing policy
source, no valid policy set loaded) is answered DENY with `kontext_server_error`, never an RPC
failure; what may be cached, the audit records and the decision counts are the pipeline's (see
`policy_engine.decision.pipeline`).
"""

from __future__ import annotations

import time
from typing import Any, NoReturn, Protocol

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
from policy_engine.server.convert import RequestConverter
from policy_engine.server.errors import Status, invalid_argument
from policy_engine.server.recording import DecisionRecorder

SERVICE_NAME = pdp_pb2.DESCRIPTOR.services_by_name["PolicyDecisionService"].full_name

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
) -> Decider:
    """The server's pipeline: the cache from the settings (unless `cache` is given; None turns
    it off), and as observers the decisions metric and, with an enabled audit log, its
    recorder. The decider does not own the audit log (the server closes it after the last
    RPC has been answered)."""
    observers: list[Observer] = [DecisionMetrics()]
    if audit is not None and audit.enabled:
        observers.append(DecisionRecorder(audit, RequestConverter(settings.limits)))
    return Decider(policy_source, settings, clock=clock, cache=cache, observers=observers)


class PolicyDecisionServicer(pdp_pb2_grpc.PolicyDecisionServiceServicer):
    """Answers Check and CheckBatch from a `Decider` (see the module docstring).

    Built from a policy source and settings (`clock`, `cache`, `audit` as for `build_decider`),
    or over a decider built elsewhere with `over`; `close()` closes the decider (which stops
    only a cache it built itself).
    """

    def __init__(
        self,
        policy_source: PolicySource,
        settings: Settings,
        clock: Clock | None = None,
        *,
        cache: DecisionStore | None = FROM_SETTINGS,
        audit: AuditLog | None = None,
    ) -> None:
        # The default clock is read as a float by the pipeline (no datetime on the hit path).
        clock = None if clock is utc_now else clock
        decider = build_decider(policy_source, settings, clock=clock, cache=cache, audit=audit)
        self._serve(decider, settings)

    @classmethod
    def over(cls, decider: Decider, settings: Settings) -> PolicyDecisionServicer:
        """A servicer answering from `decider` (the server builds the decider itself)."""
        servicer = cls.__new__(cls)
        servicer._serve(decider, settings)
        return servicer

    def _serve(self, decider: Decider, settings: Settings) -> None:
        self.decider = decider
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

    def Check(
        self, request: pdp_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.CheckResponse:
        decisions = self.decider.decide((request,))
        outcome = decisions.outcomes[0]
        self._latency["Check", decisions.level].observe(time.perf_counter() - decisions.started)
        if isinstance(outcome, Invalid):
            self._abort_invalid(context, outcome.violations, request.request_id)
        return decisions.only()

    def CheckBatch(
        self, request: pdp_pb2.CheckBatchRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.CheckBatchResponse:
        items = request.items
        problem = self._batch_problem(len(items))
        if problem is not None:
            self._abort_invalid(context, [problem])
        decisions = self.decider.decide(items)
        response = decisions.batch()
        self._latency["CheckBatch", decisions.level].observe(
            time.perf_counter() - decisions.started
        )
        return response

    async def check_async(
        self, request: pdp_pb2.CheckRequest, context: AsyncContext
    ) -> pdp_pb2.CheckResponse:
        """`Check` on the event loop, bounded by the caller's deadline."""
        try:
            decisions = await self.decider.decide_async((request,), deadline_of(context))
        except DeadlineExceeded as exc:
            await context.abort_with_status(Status(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)))
        outcome = decisions.outcomes[0]
        self._latency["Check", decisions.level].observe(time.perf_counter() - decisions.started)
        if isinstance(outcome, Invalid):
            await context.abort_with_status(self._invalid(outcome.violations, request.request_id))
        return decisions.only()

    async def check_batch_async(
        self, request: pdp_pb2.CheckBatchRequest, context: AsyncContext
    ) -> pdp_pb2.CheckBatchResponse:
        """`CheckBatch` on the event loop, bounded by the caller's deadline."""
        items = request.items
        problem = self._batch_problem(len(items))
        if problem is not None:
            await context.abort_with_status(self._invalid([problem]))
        try:
            decisions = await self.decider.decide_async(items, deadline_of(context))
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

    def _abort_invalid(
        self,
        context: grpc.ServicerContext,
        violations: list[tuple[str, str]],
        request_id: str = "",
    ) -> NoReturn:
        context.abort_with_status(self._invalid(violations, request_id))
        raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover
