"""The PolicyDecisionService: proto in, engine decision, proto out.

Every answer is ALLOW or DENY. A request the engine cannot decide (a bug, a policy source
that fails) is answered DENY with `kontext_server_error` rather than an RPC failure, so the
broker always gets a usable reason; the exception goes to the server log, never to the client.
Only a malformed request fails the RPC, with INVALID_ARGUMENT naming the offending fields.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn

import grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import Settings
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer, Reason
from policy_engine.engine import decide
from policy_engine.engine.validation import is_validation_failure
from policy_engine.server.convert import RequestConverter, ResponseBuilder, new_decision_id
from policy_engine.server.errors import invalid_argument

if TYPE_CHECKING:
    from policy_engine.policy import CompiledPolicySet

log = logging.getLogger(__name__)

PolicySource = Callable[[], "CompiledPolicySet"]
"""Returns the policy set to decide with; called once per RPC so a reload can swap it."""

Clock = Callable[[], datetime]

SERVICE_NAME = pdp_pb2.DESCRIPTOR.services_by_name["PolicyDecisionService"].full_name

SERVER_ERROR_MESSAGE = "the policy decision point could not decide this request; denied"


def utc_now() -> datetime:
    return datetime.now(UTC)


class PolicyDecisionServicer(pdp_pb2_grpc.PolicyDecisionServiceServicer):
    """Decides Check and CheckBatch requests against whatever the policy source returns."""

    def __init__(
        self, policy_source: PolicySource, settings: Settings, clock: Clock = utc_now
    ) -> None:
        self._source = policy_source
        self._clock = clock
        self._limits = settings.limits
        self._max_batch = settings.limits.max_batch_size
        self._converter = RequestConverter(settings.limits)
        self._responses = ResponseBuilder(settings.docs_base_url)
        self._validation_docs = self._responses.docs_url(ErrorCode.VALIDATION_ERROR)
        self._server_error_reasons: tuple[Reason, ...] = (
            Reason(
                code=ErrorCode.SERVER_ERROR,
                layer=Layer.SYSTEM,
                policy="builtin",
                rule="decision-failed",
                message=SERVER_ERROR_MESSAGE,
            ),
        )
        # The last-resort answer, built now so that producing it cannot fail later.
        self._server_error_reason_pb = self._responses.reason(self._server_error_reasons[0])

    # --- RPCs ----------------------------------------------------------------------------------

    def Check(
        self, request: pdp_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.CheckResponse:
        snapshot = self._snapshot()
        if snapshot is None:
            decision = self._server_error("")
        else:
            decision = self._decide(request, *snapshot)
            if is_validation_failure(decision):
                self._abort_invalid(
                    context,
                    [
                        (r.field, r.message)
                        for r in decision.reasons
                        if r.code is ErrorCode.VALIDATION_ERROR
                    ],
                    request.request_id,
                )
        return self._respond(decision, request)

    def CheckBatch(
        self, request: pdp_pb2.CheckBatchRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.CheckBatchResponse:
        items = request.items
        count = len(items)
        if count == 0:
            self._abort_invalid(context, [("items", "the batch is empty")])
        if count > self._max_batch:
            self._abort_invalid(
                context,
                [("items", f"the batch has {count} items; at most {self._max_batch} allowed")],
            )
        # One policy set and one clock reading for the whole batch: its answers are consistent.
        snapshot = self._snapshot()
        respond = self._respond
        if snapshot is None:
            results = [respond(self._server_error(""), item) for item in items]
        else:
            decide_one = self._decide
            policies, now = snapshot
            results = [respond(decide_one(item, policies, now), item) for item in items]
        return pdp_pb2.CheckBatchResponse(results=results)

    # --- helpers -------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[CompiledPolicySet, datetime] | None:
        try:
            return self._source(), self._clock()
        except Exception:
            log.exception("policy source or clock failed; answering deny")
            return None

    def _decide(
        self, msg: pdp_pb2.CheckRequest, policies: CompiledPolicySet, now: datetime
    ) -> Decision:
        """The engine's decision; never raises (an exception becomes a server-error deny)."""
        try:
            request, problems = self._converter.convert(msg)
            if problems:
                return Decision(effect=Effect.DENY, reasons=problems, revision=policies.revision)
            return decide(policies, request, now=now, limits=self._limits)
        except Exception:
            log.exception("decision failed (request_id=%r); answering deny", msg.request_id)
            return self._server_error(getattr(policies, "revision", ""))

    def _respond(self, decision: Decision, msg: pdp_pb2.CheckRequest) -> pdp_pb2.CheckResponse:
        try:
            return self._responses.response(
                decision, request_id=msg.request_id, explain=msg.explain
            )
        except Exception:
            log.exception("building the response failed (request_id=%r)", msg.request_id)
            return pdp_pb2.CheckResponse(
                effect=pdp_pb2.EFFECT_DENY,
                reasons=[self._server_error_reason_pb],
                policy_revision=getattr(decision, "revision", ""),
                decision_id=new_decision_id(),
                request_id=msg.request_id,
            )

    def _server_error(self, revision: str) -> Decision:
        return Decision(effect=Effect.DENY, reasons=self._server_error_reasons, revision=revision)

    def _abort_invalid(
        self,
        context: grpc.ServicerContext,
        violations: list[tuple[str, str]],
        request_id: str = "",
    ) -> NoReturn:
        context.abort_with_status(
            invalid_argument(violations, docs_url=self._validation_docs, request_id=request_id)
        )
        raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover
