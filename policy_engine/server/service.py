"""The PolicyDecisionService: proto in, engine decision, proto out, with a decision cache.

Every answer is ALLOW or DENY. A request the engine cannot decide (a bug, a policy source
that fails) is answered DENY with `kontext_server_error` rather than an RPC failure, so the
broker always gets a usable reason; the exception goes to the server log, never to the client.
Only a malformed request fails the RPC, with INVALID_ARGUMENT naming the offending fields.
While no valid policy set is loaded (a startup whose policies do not load), every request is
denied with a reason that says so, and the log says it once when that state begins and once
when it ends (a set loaded), never once per request; so does any other failing policy source.

The cache (`policy_engine.cache`) is consulted before any conversion: a hit is answered from
the stored response bytes without building domain objects or touching the engine. Only plain
allows and denies are stored: never validation failures, server errors, decisions that read
the clock, decisions a policy opted out of, and never past a subject token's validity. Any
fault inside the cache path is a miss: the engine decides, the RPC never fails because of it.

With an audit log, every decision (each Check, each CheckBatch item, cached or not, refused as
invalid or answered with a server error) is queued as one record before the answer is
returned, so a broker that got an answer can find it in the log. A cache hit is queued with
the stored response and the request message; both are turned into domain values on the
audit writer's thread, off the request path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from policy_engine import __version__
from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit import AuditLog
from policy_engine.cache import CacheLevel, DecisionCache, Store, build_cache, settings_fingerprint
from policy_engine.config import Settings
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer, Reason
from policy_engine.domain.request import CheckRequest
from policy_engine.engine import decide
from policy_engine.engine.validation import is_validation_failure
from policy_engine.metrics import DECISION_LATENCY, DECISIONS
from policy_engine.server.convert import (
    RequestConverter,
    ResponseBuilder,
    add_response,
    add_result,
    batch_from,
    new_decision_id,
    new_decision_ids,
    next_decision_id,
    response_from,
    stamp,
)
from policy_engine.server.errors import invalid_argument
from policy_engine.server.recording import CACHE_LEVEL_LABELS, DecisionRecorder
from policy_engine.store.store import NoPolicyLoaded

if TYPE_CHECKING:
    from policy_engine.policy import CompiledPolicySet

log = logging.getLogger(__name__)

PolicySource = Callable[[], "CompiledPolicySet"]
"""Returns the policy set to decide with; called once per RPC so a reload can swap it."""

Clock = Callable[[], datetime]

SERVICE_NAME = pdp_pb2.DESCRIPTOR.services_by_name["PolicyDecisionService"].full_name

SERVER_ERROR_MESSAGE = "the policy decision point could not decide this request; denied"
NO_POLICY_SET_MESSAGE = (
    "no valid policy set is loaded, so the policy decision point denies every request "
    "until one loads"
)

_NONE = pdp_pb2.CACHE_LEVEL_NONE
_EFFECT_NUMBERS = {Effect.ALLOW: pdp_pb2.EFFECT_ALLOW, Effect.DENY: pdp_pb2.EFFECT_DENY}
_EFFECT_NAMES = {pdp_pb2.EFFECT_ALLOW: "ALLOW", pdp_pb2.EFFECT_DENY: "DENY"}
# Codes that describe the request or the server, not the policies: never cached.
_UNCACHEABLE_CODES = frozenset({ErrorCode.VALIDATION_ERROR, ErrorCode.SERVER_ERROR})


class _Unset:
    """Default for the `cache` argument: build the cache from the settings."""


_UNSET: Any = _Unset()


def utc_now() -> datetime:
    return datetime.now(UTC)


def _first_code(decision: Decision) -> str:
    return decision.reasons[0].code.value if decision.reasons else ""


def _storable(decision: Decision) -> bool:
    """May this decision be served to a later identical request? (See the module docstring.)"""
    return (
        decision.cacheable
        and not decision.time_dependent
        and not any(r.code in _UNCACHEABLE_CODES for r in decision.reasons)
    )


class PolicyDecisionServicer(pdp_pb2_grpc.PolicyDecisionServiceServicer):
    """Decides Check and CheckBatch requests against whatever the policy source returns.

    The cache is built from `settings.cache` unless one is passed (tests inject theirs;
    `cache=None` turns caching off). The servicer does not own an injected cache's lifetime,
    nor the audit log's (the server closes it after the last RPC has been answered).
    """

    def __init__(
        self,
        policy_source: PolicySource,
        settings: Settings,
        clock: Clock = utc_now,
        *,
        cache: DecisionCache | None = _UNSET,
        audit: AuditLog | None = None,
    ) -> None:
        self._source = policy_source
        self._clock = clock
        # The default clock is read as a float on the hit path (no datetime built there).
        self._fast_clock = clock is utc_now
        self._limits = settings.limits
        self._max_batch = settings.limits.max_batch_size
        self._converter = RequestConverter(settings.limits)
        self._recorder = (
            DecisionRecorder(audit, self._converter)
            if audit is not None and audit.enabled
            else None
        )
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
        self._no_policy_reasons = (
            replace(
                self._server_error_reasons[0],
                rule="policy-set-loaded",
                message=NO_POLICY_SET_MESSAGE,
            ),
        )
        # The last-resort answer, built now so that producing it cannot fail later.
        self._server_error_reason_pb = self._responses.reason(self._server_error_reasons[0])
        # What is wrong with the policy source (its exception type), None while it works:
        # logged when it changes, so a server without policies does not log every request.
        self._source_problem: type[BaseException] | None = None
        self._source_lock = threading.Lock()
        self._owns_cache = cache is _UNSET
        if cache is _UNSET:
            cache = build_cache(
                settings.cache,
                fingerprint=answer_fingerprint(settings),
                max_id_length=settings.limits.max_id_length,
            )
        self._cache: DecisionCache | None = cache
        # Labelled metric children, bound once (a `labels()` call costs a lock and a lookup).
        self._decision_counters: dict[tuple[int, str], Any] = {
            (number, code): DECISIONS.labels(name, code)
            for number, name in _EFFECT_NAMES.items()
            for code in ("", *(c.value for c in ErrorCode))
        }
        self._latency: dict[tuple[str, str], Any] = {
            (method, level): DECISION_LATENCY.labels(method, level)
            for method in ("Check", "CheckBatch")
            for level in ("none", "local", "redis", "mixed")
        }

    @property
    def cache(self) -> DecisionCache | None:
        return self._cache

    def close(self) -> None:
        """Stop the cache's writer and Redis pool (only a cache this servicer built)."""
        if self._owns_cache and self._cache is not None:
            self._cache.close()

    # --- RPCs ----------------------------------------------------------------------------------

    def Check(
        self, request: pdp_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.CheckResponse:
        started = time.perf_counter()
        snapshot = self._snapshot()
        if isinstance(snapshot, Decision):
            decision = snapshot
            resp = self._respond(decision, request)
            self._count(resp.effect, ErrorCode.SERVER_ERROR.value)
            if self._recorder is not None:
                self._recorder.unconverted(request, decision, resp.decision_id, started)
            self._latency["Check", "none"].observe(time.perf_counter() - started)
            return resp
        policies, now, now_ts = snapshot
        cache = self._cache
        key: str | None = None
        if cache is not None:
            hit = None
            try:
                if request.explain:
                    cache.skipped()  # the trace needs the engine
                else:
                    key = cache.key(request, policies.revision, policies.key_sets)
                    if key is None:
                        cache.skipped()
                    else:
                        hit = cache.get(key, now_ts)
            except Exception:
                log.exception("decision cache lookup failed; deciding without it")
                key = hit = None
            if hit is not None:
                entry, level = hit
                decision_id = next_decision_id()
                try:
                    resp = response_from(
                        stamp(entry.template, decision_id, request.request_id, level)
                    )
                except Exception:
                    log.exception("a cached decision could not be answered; deciding anew")
                else:
                    self._count(entry.effect, entry.code)
                    if self._recorder is not None:
                        self._recorder.hit(
                            request, key, entry.template, decision_id, level, started, now_ts
                        )
                    self._latency["Check", CACHE_LEVEL_LABELS[level]].observe(
                        time.perf_counter() - started
                    )
                    return resp
        if now is None:
            now = datetime.fromtimestamp(now_ts, UTC)
        converted, decision = self._decide(request, policies, now)
        if is_validation_failure(decision):
            self._count(pdp_pb2.EFFECT_DENY, ErrorCode.VALIDATION_ERROR.value)
            if self._recorder is not None:
                self._recorder.decided(
                    request, converted, decision, new_decision_id(), started, now_ts
                )
            self._latency["Check", "none"].observe(time.perf_counter() - started)
            self._abort_invalid(
                context,
                [
                    (r.field, r.message)
                    for r in decision.reasons
                    if r.code is ErrorCode.VALIDATION_ERROR
                ],
                request.request_id,
            )
        resp = None
        if key is not None and _storable(decision):
            resp = self._store_and_respond(key, decision, request.request_id, now_ts)
        if resp is None:
            resp = self._respond(decision, request)
        self._count(resp.effect, _first_code(decision))
        if self._recorder is not None:
            self._recorder.decided(request, converted, decision, resp.decision_id, started, now_ts)
        self._latency["Check", "none"].observe(time.perf_counter() - started)
        return resp

    def CheckBatch(
        self, request: pdp_pb2.CheckBatchRequest, context: grpc.ServicerContext
    ) -> pdp_pb2.CheckBatchResponse:
        started = time.perf_counter()
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
        level = "none"
        if isinstance(snapshot, Decision):
            decision = snapshot
            response = pdp_pb2.CheckBatchResponse(results=[respond(decision, i) for i in items])
            self._count(pdp_pb2.EFFECT_DENY, ErrorCode.SERVER_ERROR.value, count)
            if self._recorder is not None:
                for item, result in zip(items, response.results, strict=True):
                    self._recorder.unconverted(item, decision, result.decision_id, started)
        elif self._cache is None:
            response = self._batch_uncached(items, *snapshot, started)
        else:
            response, level = self._batch_with_cache(self._cache, items, *snapshot, started)
        self._latency["CheckBatch", level].observe(time.perf_counter() - started)
        return response

    def _batch_uncached(
        self,
        items: Any,
        policies: CompiledPolicySet,
        now: datetime | None,
        now_ts: float,
        started: float,
    ) -> pdp_pb2.CheckBatchResponse:
        if now is None:
            now = datetime.fromtimestamp(now_ts, UTC)
        decide_one, respond, recorder = self._decide, self._respond, self._recorder
        tally: dict[tuple[int, str], int] = {}
        results = []
        for item in items:
            converted, decision = decide_one(item, policies, now)
            result = respond(decision, item)
            results.append(result)
            if recorder is not None:
                recorder.decided(item, converted, decision, result.decision_id, started, now_ts)
            label = (_EFFECT_NUMBERS.get(decision.effect, 0), _first_code(decision))
            tally[label] = tally.get(label, 0) + 1
        self._count_tally(tally)
        return pdp_pb2.CheckBatchResponse(results=results)

    # --- the cached batch ----------------------------------------------------------------------

    def _batch_with_cache(
        self,
        cache: DecisionCache,
        items: Any,
        policies: CompiledPolicySet,
        now: datetime | None,
        now_ts: float,
        started: float,
    ) -> tuple[pdp_pb2.CheckBatchResponse, str]:
        """Local level per item, one MGET for the local misses, evaluate the rest, one write.

        Returns the response and the latency label: local or redis when every item was
        answered from the cache (redis if any came from Redis), none when none was, mixed.
        """
        count = len(items)
        hits: list[Any]
        keys: list[str | None]
        try:
            keys = cache.keys(items, policies.revision, policies.key_sets)
            bypassed = keys.count(None)
            if bypassed:
                cache.skipped(bypassed)
            hits = cache.get_many(keys, now_ts)
        except Exception:
            log.exception("decision cache lookup failed; deciding the batch without it")
            keys = [None] * count
            hits = [None] * count
        ids = new_decision_ids(count)
        parts: list[bytes] = []
        stores: dict[str, Store] = {}
        tally: dict[tuple[int, str], int] = {}
        evaluated = from_redis = 0
        redis_level = CacheLevel.REDIS
        recorder = self._recorder
        # Audit records wait until the batch is assembled: if that fails, it is decided anew
        # and those decisions, not these, are the ones answered and recorded.
        audited: list[tuple[Any, ...]] = []
        for index, item in enumerate(items):
            hit = hits[index]
            if hit is not None:
                entry, level = hit
                try:
                    add_result(parts, entry.template, ids[index], item.request_id, level)
                except Exception:
                    log.exception("a cached decision could not be answered; deciding anew")
                else:
                    label = (entry.effect, entry.code)
                    tally[label] = tally.get(label, 0) + 1
                    if level is redis_level:
                        from_redis += 1
                    if recorder is not None:
                        audited.append((item, keys[index], entry.template, ids[index], level))
                    continue
            if now is None:
                now = datetime.fromtimestamp(now_ts, UTC)
            evaluated += 1
            self._evaluate_item(
                parts, item, keys[index], ids[index], policies, now, stores, tally, audited
            )
        try:
            response = batch_from(parts)
        except Exception:
            # Cannot happen with entries this code wrote; if it ever does, the batch is
            # decided again from scratch rather than failed, and nothing is stored.
            log.exception("assembling a batch from cached answers failed; deciding it anew")
            return self._batch_uncached(items, policies, now, now_ts, started), "none"
        if recorder is not None:
            recorder.batch(audited, started, now_ts)
        if stores:
            try:
                cache.put_many(list(stores.values()), now_ts)
            except Exception:
                log.exception("decision cache write failed; answers are unaffected")
        self._count_tally(tally)
        if evaluated == count:
            level_label = "none"
        elif evaluated:
            level_label = "mixed"
        else:
            level_label = "redis" if from_redis else "local"
        return response, level_label

    def _evaluate_item(
        self,
        parts: list[bytes],
        item: pdp_pb2.CheckRequest,
        key: str | None,
        decision_id: bytes,
        policies: CompiledPolicySet,
        now: datetime,
        stores: dict[str, Store],
        tally: dict[tuple[int, str], int],
        audited: list[tuple[Any, ...]],
    ) -> None:
        """One batch item the cache did not answer, added to `parts`; notes what to store and,
        with an audit log, what to record (as `(item, request, decision, decision_id)`)."""
        converted, decision = self._decide(item, policies, now)
        label = (_EFFECT_NUMBERS.get(decision.effect, 0), _first_code(decision))
        tally[label] = tally.get(label, 0) + 1
        if key is not None and _storable(decision):
            try:
                template = self._responses.template(decision)
            except Exception:
                log.exception(
                    "building a cacheable response failed (request_id=%r)", item.request_id
                )
            else:
                add_result(parts, template, decision_id, item.request_id, _NONE)
                stores[key] = (key, template, label[0], label[1], _timestamp(decision))
                if self._recorder is not None:
                    audited.append((item, converted, decision, decision_id))
                return
        response = self._respond(decision, item)
        add_response(parts, response.SerializeToString())
        if self._recorder is not None:
            audited.append((item, converted, decision, response.decision_id))

    # --- helpers -------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[CompiledPolicySet, datetime | None, float] | Decision:
        """The policy set and the time (a datetime only when the clock was injected), or the
        deny to answer when either cannot be had."""
        try:
            policies = self._source()
            if self._fast_clock:
                snapshot = policies, None, time.time()
            else:
                now = self._clock()
                snapshot = policies, now, now.timestamp()
        except NoPolicyLoaded as exc:
            self._source_state(exc)
            return self._server_error("", self._no_policy_reasons)
        except Exception as exc:
            self._source_state(exc)
            return self._server_error("")
        if self._source_problem is not None:
            self._source_state(None, policies)
        return snapshot

    def _source_state(
        self, exc: Exception | None, policies: CompiledPolicySet | None = None
    ) -> None:
        """Logs the policy source's state when it changes: failing (how), or working again."""
        problem = None if exc is None else type(exc)
        with self._source_lock:
            if problem is self._source_problem:
                return
            self._source_problem = problem
        if isinstance(exc, NoPolicyLoaded):  # a state, not a bug: no traceback
            log.error("every request is denied until a valid policy set loads (%s)", exc)
        elif exc is not None:
            log.error(
                "policy source or clock failed; denying every request until it recovers",
                exc_info=exc,
            )
        else:
            revision = getattr(policies, "revision", "")
            log.info("policy set %s is loaded; deciding requests again", revision)

    def _store_and_respond(
        self, key: str, decision: Decision, request_id: str, now_ts: float
    ) -> pdp_pb2.CheckResponse | None:
        """Cache the decision and answer from the same bytes; None if anything failed."""
        cache = self._cache
        try:
            template = self._responses.template(decision)
            resp = response_from(stamp(template, next_decision_id(), request_id, _NONE))
        except Exception:
            log.exception("building a cacheable response failed (request_id=%r)", request_id)
            return None
        try:
            cache.put(  # type: ignore[union-attr]
                key,
                template,
                resp.effect,
                _first_code(decision),
                now_ts,
                _timestamp(decision),
            )
        except Exception:
            log.exception("decision cache write failed; the answer is unaffected")
        return resp

    def _count(self, effect: int, code: str, amount: int = 1) -> None:
        counter = self._decision_counters.get((effect, code))
        if counter is None:
            counter = DECISIONS.labels(_EFFECT_NAMES.get(effect, "DENY"), code)
        counter.inc(amount)

    def _count_tally(self, tally: dict[tuple[int, str], int]) -> None:
        for (effect, code), amount in tally.items():
            self._count(effect, code, amount)

    def _decide(
        self, msg: pdp_pb2.CheckRequest, policies: CompiledPolicySet, now: datetime
    ) -> tuple[CheckRequest | None, Decision]:
        """The domain request (None if it could not be built) and the engine's decision.

        Never raises: an exception becomes a server-error deny.
        """
        request = None
        try:
            request, problems = self._converter.convert(msg)
            if problems:
                return request, Decision(
                    effect=Effect.DENY,
                    reasons=problems,
                    revision=policies.revision,
                    cacheable=False,
                )
            return request, decide(policies, request, now=now, limits=self._limits)
        except Exception:
            log.exception("decision failed (request_id=%r); answering deny", msg.request_id)
            return request, self._server_error(getattr(policies, "revision", ""))

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

    def _server_error(self, revision: str, reasons: tuple[Reason, ...] | None = None) -> Decision:
        return Decision(
            effect=Effect.DENY,
            reasons=reasons or self._server_error_reasons,
            revision=revision,
            cacheable=False,
        )

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


def _timestamp(decision: Decision) -> float | None:
    until = decision.valid_until
    return None if until is None else until.timestamp()


def answer_fingerprint(settings: Settings) -> bytes:
    """What besides the request and the policies shapes a cached answer (salts every key).

    The docs URL is inside every reason; the limits decide which requests are valid; the code
    version covers engine changes between deployments sharing one Redis.
    """
    return settings_fingerprint((__version__, settings.docs_base_url, settings.limits))
