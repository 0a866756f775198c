"""The decision pipeline: requests in, typed outcomes and their answer out, outside gRPC.

`Decider.decide(items, deadline)` is the only entry, a coroutine, for a `Check` (a batch of
one) and a `CheckBatch` alike; synchronous callers (the CLI, tools, tests) use
`decide_sync`, which runs it on the process's event loop. For one call it

1. snapshots one policy set and one clock reading (every item is decided under both);
2. waits for a JWKS refresh an item's token needs (`policy_engine.auth.pending`), if any;
3. looks the cacheable items up in one round trip (`get` for one key, `get_many` for more);
   any cache fault is a miss for the whole call, never an error;
4. waits for room with every observer (`admit`: a full audit queue), if needed;
5. evaluates the misses with the pure engine (`policy_engine.engine.decide`);
6. stores the storable decisions (one `put_many`) and answers them from the stored bytes;
7. builds the answer (one parse of the assembled bytes);
8. counts every ALLOW (fresh and cached alike) that an organization's quotas match, in one
   `consume` call to the quota store for the whole call (`_count_quotas`): an ALLOW without
   room becomes DENY `kontext_rate_limited`, one the store could not count follows its
   quotas' `when_unavailable`; a call with no quota to count makes no store call; and
9. hands every outcome to each observer (audit recorder, metrics) in one `observe` call.

Its input is the API's `CheckRequest` messages, not domain requests: the cache key is a digest
of the message and the cache holds answers as serialized responses, so a hit is answered
without building a domain request or touching the engine (conversion alone costs more than a
whole hit). Only misses are converted (`RequestConverter`). Nothing here knows about gRPC (no
context, no status codes): the servicer maps `Invalid` to INVALID_ARGUMENT for a `Check`.

What may be cached is decided here (`storable`): only plain allows and denies, never
validation failures, server errors, decisions that read the clock or that a policy opted out
of, and never past a subject token's validity. A quota's answer is never stored: the cache
holds what the policies decided, and every ALLOW it answers is counted again. The answer
fingerprint salting every key (`answer_fingerprint`) and the clock are the pipeline's too.

Everything runs on the event loop (a thread hand-off costs as much as a decision); the
waits (steps 2-4, 8) are awaited for at most the caller's remaining time, and only by the call
that needs them. A call whose deadline has passed when its turn comes, or passes while it
waits, is not evaluated (a batch whose deadline passes during its evaluation is not
evaluated further): `DeadlineExceeded` is raised (the server answers DEADLINE_EXCEEDED), its
stage is counted in `pdp_deadline_exceeded_total`, and nothing is stored or observed.

Every answer is ALLOW or DENY: a request the engine cannot decide (a bug, a failing policy
source or clock) is answered DENY with `kontext_server_error`, and the exception goes to the
log, never to the caller; such log records carry `request_id` and `decision_id` as fields
(`extra`), JSON keys with `log_format: json`. While no valid policy set is loaded every
request is denied with a reason saying so; the log says it once when that state begins and
once when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from policy_engine import __version__
from policy_engine.api import pdp_pb2
from policy_engine.auth.pending import await_pending_keys
from policy_engine.cache import (
    CacheLevel,
    DeadlinePassed,
    DecisionCache,
    Hit,
    Store,
    build_cache,
)
from policy_engine.cache import settings_fingerprint as _settings_fingerprint
from policy_engine.config import Settings
from policy_engine.decision.outcome import (
    CacheHit,
    Decided,
    Decisions,
    Invalid,
    Outcome,
    ServerError,
)
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer, Reason
from policy_engine.engine import decide
from policy_engine.engine.validation import is_validation_failure
from policy_engine.errors import PolicyEngineError
from policy_engine.lifecycle import deadline_in, event_loop
from policy_engine.metrics import DEADLINE_EXCEEDED, DECISIONS
from policy_engine.quota import UNAVAILABLE, Charge, QuotaStore, Verdict
from policy_engine.quota.enforce import count_outcomes, enforce
from policy_engine.server.convert import (
    RequestConverter,
    ResponseBuilder,
    add_response,
    add_result,
    batch_from,
    decision_from_response,
    new_decision_ids,
    next_decision_id,
    response_from,
)
from policy_engine.store.store import NoPolicyLoaded

if TYPE_CHECKING:
    from collections.abc import Mapping

    from policy_engine.auth.keys import KeySource
    from policy_engine.policy import CompiledPolicySet

# The logger the decision path has always logged under (log filters and alerts name it).
log = logging.getLogger("policy_engine.server.service")

PolicySource = Callable[[], "CompiledPolicySet"]
"""Returns the policy set to decide with; called once per `decide` so a reload can swap it."""

Clock = Callable[[], datetime]

SERVER_ERROR_MESSAGE = "the policy decision point could not decide this request; denied"
NO_POLICY_SET_MESSAGE = (
    "no valid policy set is loaded, so the policy decision point denies every request "
    "until one loads"
)

_NONE = pdp_pb2.CACHE_LEVEL_NONE
# Effect numbers, as outcomes and the metrics carry them (Outcome.effect: an int).
_ALLOW: int = pdp_pb2.EFFECT_ALLOW
_DENY: int = pdp_pb2.EFFECT_DENY
# Codes that describe the request or the server, not the policies: never cached.
_UNCACHEABLE_CODES = frozenset({ErrorCode.VALIDATION_ERROR, ErrorCode.SERVER_ERROR})


class DecisionStore(Protocol):
    """The cache as the pipeline uses it (`DecisionCache` is one). `get` and `get_many` are
    coroutines bounded by the caller's deadline (`time.monotonic()` s, None: none): past it
    they raise `DeadlinePassed`; any other fault is a miss. `put_many` never blocks."""

    def keys(
        self, msgs: Sequence[Any], revision: str, key_sets: Mapping[str, KeySource]
    ) -> list[str | None]: ...

    def skipped(self, count: int = 1) -> None: ...

    async def get(self, key: str, now: float, deadline: float | None = None) -> Hit | None: ...

    async def get_many(
        self, keys: Sequence[str | None], now: float, deadline: float | None = None
    ) -> list[Hit | None]: ...

    def put_many(self, stores: Sequence[Store], now: float) -> None: ...


class Observer(Protocol):
    """Sees every call's outcomes once, before the answer is returned (the audit recorder
    queues records, the metrics count decisions). It must not block: it runs on the request
    path, on the event loop. An exception fails the call (an audit log that must not lose
    records says so).

    `admit(count, deadline)` comes first: None when `count` outcomes can be observed at
    once, else an awaitable the pipeline awaits before `observe` (the audit log waiting for
    room in its queue, `when_full: block`), which must end by `deadline` (a
    `time.monotonic()` instant; None: none) and never raise."""

    def admit(self, count: int, deadline: float | None) -> Awaitable[None] | None: ...

    def observe(self, decisions: Decisions) -> None: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


def answer_fingerprint(settings: Settings) -> bytes:
    """What besides the request and the policies shapes a cached answer (salts every key).

    The docs URL is inside every reason; the limits decide which requests are valid; the code
    version covers engine changes between deployments sharing one Redis.
    """
    return _settings_fingerprint((__version__, settings.docs_base_url, settings.limits))


def cache_from_settings(settings: Settings) -> DecisionCache | None:
    """The cache `settings.cache` describes, keyed for this pipeline's answers (salted with
    `answer_fingerprint`); None when caching is off. Reads the Redis signing keys: raises
    ConfigError naming the setting when they cannot be used. Connects and starts nothing:
    a server starts and stops it as the "cache" component and passes it to the `Decider`."""
    return build_cache(
        settings.cache,
        fingerprint=answer_fingerprint(settings),
        max_id_length=settings.limits.max_id_length,
    )


def storable(decision: Decision) -> bool:
    """May this decision be served to a later identical request? (See the module docstring.)"""
    return (
        decision.cacheable
        and not decision.time_dependent
        and not any(r.code in _UNCACHEABLE_CODES for r in decision.reasons)
    )


def _log_fields(item: pdp_pb2.CheckRequest, decision_id: bytes) -> dict[str, str]:
    """One item's identifiers as log record fields (`extra`), never pasted into messages."""
    return {"request_id": item.request_id, "decision_id": decision_id.decode()}


def _call_fields(items: Sequence[pdp_pb2.CheckRequest], ids: Sequence[bytes]) -> dict[str, Any]:
    """A whole call's identifiers as log record fields: an item's for a batch of one, else
    the lists (`request_ids`, `decision_ids`, in request order)."""
    if len(items) == 1:
        return _log_fields(items[0], ids[0])
    return {
        "request_ids": [item.request_id for item in items],
        "decision_ids": [decision_id.decode() for decision_id in ids],
    }


def _quota_subject(outcome: Outcome) -> str:
    """The subject a quota counts an ALLOW for: the request's subject ID, or for an external
    user ID the person it maps to (the ID the policies decided for; a cached answer carries it
    in its stored response), so both exchange modes share the person's counters."""
    subject = outcome.item.subject
    if subject.kind != pdp_pb2.SUBJECT_KIND_EXTERNAL_USER:
        return subject.id
    if isinstance(outcome, Decided):
        mapped = outcome.decision.mapped_subject_id
    elif isinstance(outcome, CacheHit):
        mapped = pdp_pb2.CheckResponse.FromString(outcome.template).mapped_subject_id
    else:
        mapped = ""
    return mapped or subject.id


def _first_code(decision: Decision) -> str:
    return decision.reasons[0].code.value if decision.reasons else ""


def _valid_until(decision: Decision) -> float | None:
    until = decision.valid_until
    return None if until is None else until.timestamp()


class DecisionMetrics:
    """The `pdp_decisions_total` observer: one increment per (effect, code) seen in a call."""

    def __init__(self) -> None:
        self._names = {_ALLOW: "ALLOW", _DENY: "DENY"}
        # Labelled children, bound once (a `labels()` call costs a lock and a lookup).
        self._counters: dict[tuple[int, str], Any] = {
            (number, code): DECISIONS.labels(name, code)
            for number, name in self._names.items()
            for code in ("", *(c.value for c in ErrorCode))
        }

    def admit(self, count: int, deadline: float | None) -> None:
        return None  # counting never waits

    def observe(self, decisions: Decisions) -> None:
        outcomes = decisions.outcomes
        if len(outcomes) == 1:
            first = outcomes[0]
            self._count(first.effect, first.code, 1)
            return
        tally: dict[tuple[int, str], int] = {}
        for outcome in outcomes:
            label = (outcome.effect, outcome.code)
            tally[label] = tally.get(label, 0) + 1
        for (effect, code), amount in tally.items():
            self._count(effect, code, amount)

    def _count(self, effect: int, code: str, amount: int) -> None:
        counter = self._counters.get((effect, code))
        if counter is None:
            counter = DECISIONS.labels(self._names.get(effect, "DENY"), code)
        counter.inc(amount)


class DeadlineExceeded(PolicyEngineError):
    """The caller's deadline passed before its call was evaluated (`stage`: "queued" when its
    turn came too late, "keys" while it waited for a JWKS refresh its token needs, "cache"
    while it waited for the cache), or while a batch was evaluated ("evaluation": the rest of
    it was not); nothing was stored or observed. Or ("quota") it passed while the quota
    store counted the call's ALLOWs: answers already decided may have been stored (they are
    the policies' answers; every later hit is counted again), nothing was observed."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"the deadline passed before the decision ({stage})")
        self.stage = stage


# queued: its turn came too late; keys: it ran out waiting for a JWKS refresh; cache: for
# Redis; evaluation: while a batch was evaluated (the rest of it was not).
_DEADLINE_COUNTERS = {
    stage: DEADLINE_EXCEEDED.labels(stage)
    for stage in ("queued", "keys", "cache", "audit", "evaluation", "quota")
}
# Evaluations between two looks at the clock in a batch (a look costs ~0.1 us, one
# evaluation tens of us): a batch runs at most this many past its caller's deadline.
_DEADLINE_STRIDE = 8


def _expired(stage: str) -> DeadlineExceeded:
    _DEADLINE_COUNTERS[stage].inc()
    return DeadlineExceeded(stage)


def _count_if_past(deadline: float | None, stage: str) -> None:
    """Count a call cancelled while waiting at `stage` when its deadline had passed (gRPC
    cancels the call at its deadline, which may come before the wait's own bound)."""
    if deadline is not None and deadline <= time.monotonic():
        _DEADLINE_COUNTERS[stage].inc()


class _FromSettings:
    """The default of the `cache` argument: build the cache from the settings."""


FROM_SETTINGS: Any = _FromSettings()


class Decider:
    """Decides lists of `CheckRequest` messages (see the module docstring).

    The cache is built from `settings.cache` unless one is passed (`cache=None` turns caching
    off); `close()` stops only a cache built here. `quotas` is the quota counter store: one
    built from `settings.quota` unless passed (a server passes the one its lifecycle starts
    and stops); None denies every ALLOW a quota matches with `kontext_server_error` unless
    the quota says `when_unavailable: allow` (no store: nothing can count). `clock` None
    reads `time.time()` (no datetime is built on the hit path); a clock passed in is read
    once per call. One instance serves every call on the process's event loop (`decide`),
    and synchronous callers through it (`decide_sync`): a call's state lives in the call,
    and `source` may be swapped at any time (the next call reads it).
    """

    def __init__(
        self,
        policy_source: PolicySource,
        settings: Settings,
        *,
        clock: Clock | None = None,
        cache: DecisionStore | None = FROM_SETTINGS,
        observers: Sequence[Observer] = (),
        quotas: QuotaStore | None = FROM_SETTINGS,
    ) -> None:
        self.source = policy_source
        self._clock = clock
        self._limits = settings.limits
        self._converter = RequestConverter(settings.limits)
        self._responses = ResponseBuilder(settings.docs_base_url)
        self.observers: list[Observer] = list(observers)
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
        self._owns_cache = cache is FROM_SETTINGS
        if cache is FROM_SETTINGS:
            cache = cache_from_settings(settings)
        self.cache: DecisionStore | None = cache
        # Built from the settings when first needed (a call with an ALLOW to count): a
        # decider whose policies declare no quota never builds one.
        self._owns_quotas = quotas is FROM_SETTINGS
        self._settings = settings
        self.quotas: QuotaStore | None = None if self._owns_quotas else quotas

    def close(self, deadline: float | None = None) -> bool:
        """Stop the cache if this decider built it (its queued Redis writes are written until
        `deadline`, `time.monotonic()` s, default 5 s from now; then its connections close);
        False when writes were left unwritten. A cache passed in is its owner's to stop."""
        deadline = deadline_in(5.0) if deadline is None else deadline
        stopped = True
        if self._owns_quotas and self.quotas is not None:
            stopped = self.quotas.stop(deadline)
        if self._owns_cache and isinstance(self.cache, DecisionCache):
            return self.cache.stop(deadline) and stopped
        return stopped

    # --- the entry -----------------------------------------------------------------------------

    async def decide(
        self, items: Sequence[pdp_pb2.CheckRequest], deadline: float | None = None
    ) -> Decisions:
        """One outcome per item, in order, and the answer; observers have seen them.

        `items` must not be empty (the caller refuses an empty batch). `deadline` is the
        caller's, on the `time.monotonic()` clock (None: none). Raises `DeadlineExceeded`
        (counted) when it passes before the evaluation (while waiting for a JWKS refresh, the
        cache or room in the audit queue), or during a batch's evaluation: nothing (more) is
        then evaluated, and nothing stored or observed. Otherwise never raises for a request's
        sake: whatever fails becomes a server-error deny; only an observer's exception
        propagates.
        """
        started = time.perf_counter()
        if deadline is not None and deadline <= time.monotonic():
            raise _expired("queued")
        snapshot = self._snapshot()
        if isinstance(snapshot, Decision):
            await self._admit(len(items), deadline)
            decisions = self._unavailable(items, snapshot, started)
        else:
            policies, now, now_ts = snapshot
            count = len(items)
            # Before the lookup: a refresh it waits for changes the key set salting the keys.
            try:
                waited = await await_pending_keys(items, policies, deadline)
            except asyncio.CancelledError:
                _count_if_past(deadline, "keys")
                raise
            except Exception:  # only a hint: verification decides whatever happened here
                log.exception("waiting for JWKS refreshes failed; deciding with the keys held")
                waited = 1
            # The wait may have used up the caller's time: nobody would read the answer.
            if waited and deadline is not None and deadline <= time.monotonic():
                raise _expired("keys")
            ids = [next_decision_id()] if count == 1 else new_decision_ids(count)
            cache = self.cache
            keys: list[str | None] | None = None
            hits: list[Hit | None] | None = None
            if cache is not None:
                keys, hits = await self._lookup(cache, items, ids, policies, now_ts, deadline)
            # The last wait: from here to the observers nothing awaits, so the room it got holds.
            await self._admit(count, deadline)
            decisions = self._decide(
                items, ids, keys, hits, policies, now, now_ts, started, deadline
            )
            # No quota anywhere: nothing to count, no store call. A source that cannot say
            # (not a compiled set) is looked at: its ALLOWs must not go uncounted.
            if getattr(policies, "has_quotas", True):
                await self._count_quotas(decisions, policies, deadline)
        for observer in self.observers:
            observer.observe(decisions)
        return decisions

    async def _count_quotas(
        self, decisions: Decisions, policies: CompiledPolicySet, deadline: float | None
    ) -> None:
        """Step 8: every ALLOW of `decisions` (fresh or cached) that its organization's quotas
        match is counted, all in one `consume` call bounded by `deadline`; the ones not
        admitted are answered anew (`enforce`) in place. Raises DeadlineExceeded ("quota")
        when the deadline passed while the store could not answer."""
        allowed = [i for i, outcome in enumerate(decisions.outcomes) if outcome.effect == _ALLOW]
        if not allowed:
            return
        try:
            charged = self._charges(decisions, allowed, policies)
        except Exception:  # a bug: no ALLOW may stand uncounted
            log.exception(
                "finding the quotas of a call failed; denying its ALLOWs",
                extra=_call_fields(
                    [o.item for o in decisions.outcomes],
                    [o.decision_id for o in decisions.outcomes],
                ),
            )
            for index in allowed:
                outcome = decisions.outcomes[index]
                request, decision = self._allowed(outcome)
                failed = self._server_error(decision.revision)
                self._answer_anew(decisions, index, request, failed)
            return
        if not charged:
            return
        organizations = policies.organizations
        verdicts = await self._consume([charges for _, charges in charged], deadline)
        if (
            deadline is not None
            and deadline <= time.monotonic()
            and any(verdict.unavailable for verdict in verdicts)
        ):
            raise _expired("quota")
        for (index, charges), verdict in zip(charged, verdicts, strict=True):
            count_outcomes(charges, verdict)
            if verdict.admitted:
                continue
            outcome = decisions.outcomes[index]
            organization = organizations[outcome.item.organization]
            request, decision = self._allowed(outcome)
            denied = enforce(decision, charges, verdict, organization.quotas)
            if denied is not None:
                self._answer_anew(decisions, index, request, denied)

    @staticmethod
    def _charges(
        decisions: Decisions, allowed: list[int], policies: CompiledPolicySet
    ) -> list[tuple[int, tuple[Charge, ...]]]:
        """(index, charges) of each ALLOW in `allowed` that its organization's quotas match."""
        organizations = policies.organizations
        charged: list[tuple[int, tuple[Charge, ...]]] = []
        for index in allowed:
            outcome = decisions.outcomes[index]
            item = outcome.item
            organization = organizations.get(item.organization)
            if organization is None or not organization.quotas:
                continue
            subject = _quota_subject(outcome)
            # An external user ID counts as its person, in the quotas naming either of them.
            external_id = item.subject.id if subject != item.subject.id else ""
            charges = organization.quotas.charges(
                subject, item.application.id, item.integration.id, item.scope, external_id
            )
            if charges:
                charged.append((index, charges))
        return charged

    async def _consume(
        self, items: list[tuple[Charge, ...]], deadline: float | None
    ) -> list[Verdict]:
        """The store's verdicts for `items`; every item unavailable when there is no store,
        it fails (a bug: stores answer faults with verdicts) or answers the wrong count."""
        try:
            store = self.quotas
            if store is None and self._owns_quotas:
                store = self.quotas = self._build_quota_store()
            if store is None:
                return [UNAVAILABLE] * len(items)
            verdicts = await store.consume(items, deadline)
        except asyncio.CancelledError:
            _count_if_past(deadline, "quota")
            raise
        except Exception:
            log.exception("the quota store failed; its quotas are unavailable for this call")
            return [UNAVAILABLE] * len(items)
        if len(verdicts) != len(items):
            log.error("the quota store answered %d verdicts for %d", len(verdicts), len(items))
            return [UNAVAILABLE] * len(items)
        return verdicts

    def _build_quota_store(self) -> QuotaStore:
        """The quota store the settings describe, started (see `quota_store_from_settings`)."""
        from policy_engine.quota import quota_store_from_settings

        store = quota_store_from_settings(self._settings)
        store.start()
        return store

    def _allowed(self, outcome: Outcome) -> tuple[Any, Decision]:
        """The domain request and decision of an ALLOW outcome: a cache hit's are rebuilt from
        its message and stored answer (only for an ALLOW a quota turns into a DENY)."""
        if isinstance(outcome, Decided):
            return outcome.request, outcome.decision
        assert isinstance(outcome, CacheHit)
        request, _ = self._converter.convert(outcome.item)
        template = pdp_pb2.CheckResponse.FromString(outcome.template)
        return request, decision_from_response(template)

    def _answer_anew(
        self, decisions: Decisions, index: int, request: Any, decision: Decision
    ) -> None:
        """Replace item `index`'s outcome and answer with `decision` (never stored)."""
        outcome = decisions.outcomes[index]
        item = outcome.item
        parts: list[bytes] = []
        effect = self._add_response(parts, decision, item, outcome.decision_id)
        response = response_from(b"".join(parts[2:]))
        code = _first_code(decision)
        replaced = Decided(item, outcome.decision_id, effect, code, request, decision)
        decisions.replace(index, replaced, response)

    async def _admit(self, count: int, deadline: float | None) -> None:
        """Wait until every observer can take `count` outcomes at once (room in a full audit
        queue, `when_full: block`), before anything is decided: an outcome is then observed
        without blocking the loop, and a call whose deadline passes while it waits is decided
        for nobody (DeadlineExceeded, stage "audit"), never audited as answered."""
        for observer in self.observers:
            admission = observer.admit(count, deadline)
            if admission is None:
                continue
            try:
                await admission
            except asyncio.CancelledError:
                _count_if_past(deadline, "audit")
                raise
            if deadline is not None and deadline <= time.monotonic():
                raise _expired("audit")

    def decide_sync(
        self,
        items: Sequence[pdp_pb2.CheckRequest],
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> Decisions:
        """`decide` for synchronous callers (CLI, tools, tests): run on the process's event
        loop, waited for up to `timeout` seconds (None: as long as it takes; TimeoutError
        then). Raises RuntimeError on the loop's own thread (await `decide` there)."""
        return event_loop().call(self.decide(items, deadline), timeout)

    async def _lookup(
        self,
        cache: DecisionStore,
        items: Sequence[pdp_pb2.CheckRequest],
        ids: list[bytes],
        policies: CompiledPolicySet,
        now_ts: float,
        deadline: float | None,
    ) -> tuple[list[str | None] | None, list[Hit | None] | None]:
        """Keys and hits, one round trip for all (GET for one key, MGET for more); (None,
        None) when the cache failed: the whole call is decided without it. Raises
        DeadlineExceeded when `deadline` passes while waiting for it."""
        try:
            keys = cache.keys(items, policies.revision, policies.key_sets)
            if len(keys) == 1:
                key = keys[0]
                if key is None:
                    cache.skipped()  # explain (the trace needs the engine), or not cacheable
                    return keys, None
                return keys, [await cache.get(key, now_ts, deadline)]
            bypassed = keys.count(None)
            if bypassed:
                cache.skipped(bypassed)
            return keys, await cache.get_many(keys, now_ts, deadline)
        except DeadlinePassed:
            raise _expired("cache") from None
        except asyncio.CancelledError:
            _count_if_past(deadline, "cache")
            raise
        except Exception:
            log.exception(
                "decision cache lookup failed; deciding without it", extra=_call_fields(items, ids)
            )
            return None, None

    # --- the steps -----------------------------------------------------------------------------

    def _decide(
        self,
        items: Sequence[pdp_pb2.CheckRequest],
        ids: list[bytes],
        keys: list[str | None] | None,
        hits: list[Hit | None] | None,
        policies: CompiledPolicySet,
        now: datetime | None,
        now_ts: float,
        started: float,
        deadline: float | None = None,
    ) -> Decisions:
        """The outcomes from the looked-up `keys` and `hits` (None: no cache, or it failed).
        Raises DeadlineExceeded when `deadline` passes while a batch is evaluated (looked at
        every `_DEADLINE_STRIDE` evaluations): its rest is not evaluated, nothing is stored."""
        count = len(items)
        outcomes: list[Outcome] = []
        append = outcomes.append
        parts: list[bytes] = []
        stores: list[Store] = []
        evaluated = from_redis = 0
        redis_level = CacheLevel.REDIS
        nothing: list[Any] = [None] * count
        for item, decision_id, key, hit in zip(
            items, ids, keys or nothing, hits or nothing, strict=True
        ):
            if hit is not None:
                entry, level = hit.entry, hit.level
                template = entry.template
                key_set = b""
                if item.subject.access_token:  # for the audit record (see CacheHit.key_set)
                    source = policies.key_sets.get(item.organization)
                    key_set = source.fingerprint if source is not None else b""
                append(
                    CacheHit(
                        item, decision_id, entry.effect, entry.code, key, template, level, key_set
                    )
                )
                add_result(parts, template, decision_id, item.request_id, level)
                if level is redis_level:
                    from_redis += 1
                continue
            if now is None:
                now = datetime.fromtimestamp(now_ts, UTC)
            if (
                deadline is not None
                and evaluated % _DEADLINE_STRIDE == 0
                and deadline <= time.monotonic()
            ):
                raise _expired("evaluation")
            evaluated += 1
            append(self._evaluate(item, key, decision_id, policies, now, parts, stores))
        try:
            single, batch = self._assemble(parts, count)
        except Exception:
            # Cannot happen with entries this code wrote (a corrupt local entry, a value that
            # verified yet does not parse): the call is decided anew, bypassing the lookup.
            log.exception(
                "a cached decision could not be answered; deciding anew",
                extra=_call_fields(items, ids),
            )
            if now is None:
                now = datetime.fromtimestamp(now_ts, UTC)
            return self._decide_anew(items, ids, keys, policies, now, now_ts, started)
        self._store(stores, now_ts, items, ids)
        if evaluated == count:
            level_label = "none"
        elif evaluated:
            level_label = "mixed"
        else:
            level_label = "redis" if from_redis else "local"
        return Decisions(outcomes, level_label, started, now_ts, single, batch)

    def _decide_anew(
        self,
        items: Sequence[pdp_pb2.CheckRequest],
        ids: list[bytes],
        keys: list[str | None] | None,
        policies: CompiledPolicySet,
        now: datetime,
        now_ts: float,
        started: float,
    ) -> Decisions:
        """Every item evaluated (no lookup); storable answers replace the entries under their
        keys, so a corrupt entry is overwritten by a good one."""
        outcomes: list[Outcome] = []
        parts: list[bytes] = []
        stores: list[Store] = []
        for index, item in enumerate(items):
            key = keys[index] if keys is not None else None
            outcomes.append(self._evaluate(item, key, ids[index], policies, now, parts, stores))
        single, batch = self._assemble(parts, len(items))
        self._store(stores, now_ts, items, ids)
        return Decisions(outcomes, "none", started, now_ts, single, batch)

    def _store(
        self,
        stores: list[Store],
        now_ts: float,
        items: Sequence[pdp_pb2.CheckRequest],
        ids: list[bytes],
    ) -> None:
        """Hand the storable answers to the cache (never blocks; a failure costs hits only)."""
        cache = self.cache
        if not stores or cache is None:  # stores are only made with a cache
            return
        try:
            cache.put_many(stores, now_ts)
        except Exception:
            log.exception(
                "decision cache write failed; answers are unaffected",
                extra=_call_fields(items, ids),
            )

    def _evaluate(
        self,
        item: pdp_pb2.CheckRequest,
        key: str | None,
        decision_id: bytes,
        policies: CompiledPolicySet,
        now: datetime,
        parts: list[bytes],
        stores: list[Store],
    ) -> Outcome:
        """One item the cache did not answer: its outcome; its answer added to `parts`, and
        to `stores` when it may be cached under `key`."""
        request, decision = self._convert_and_decide(item, decision_id, policies, now)
        code = _first_code(decision)
        if is_validation_failure(decision):
            self._add_response(parts, decision, item, decision_id)
            return Invalid(item, decision_id, _DENY, code, request, decision)
        if request is None or decision.reasons is self._server_error_reasons:
            self._add_response(parts, decision, item, decision_id)
            return ServerError(item, decision_id, _DENY, code, request, decision)
        effect = _ALLOW if decision.effect is Effect.ALLOW else _DENY
        if not item.explain:
            try:
                template = self._responses.template(decision)
            except Exception:
                log.exception("building a response failed", extra=_log_fields(item, decision_id))
            else:
                add_result(parts, template, decision_id, item.request_id, _NONE)
                if key is None or not storable(decision):
                    return Decided(item, decision_id, effect, code, request, decision)
                stores.append(Store(key, template, effect, code, _valid_until(decision)))
                return Decided(item, decision_id, effect, code, request, decision, stored=True)
        effect = self._add_response(parts, decision, item, decision_id)
        return Decided(item, decision_id, effect, code, request, decision)

    @staticmethod
    def _assemble(
        parts: list[bytes], count: int
    ) -> tuple[pdp_pb2.CheckResponse | None, pdp_pb2.CheckBatchResponse | None]:
        """The answer, parsed once: a `CheckResponse` for one item, else the batch's."""
        if count == 1:
            # parts = [result tag, length, the response's own bytes...]: parse those alone.
            return response_from(b"".join(parts[2:])), None
        return None, batch_from(parts)

    def _unavailable(
        self, items: Sequence[pdp_pb2.CheckRequest], decision: Decision, started: float
    ) -> Decisions:
        """Every item denied with the snapshot's server error (no policy set, source failed)."""
        count = len(items)
        ids = [next_decision_id()] if count == 1 else new_decision_ids(count)
        code = _first_code(decision)
        parts: list[bytes] = []
        outcomes: list[Outcome] = []
        for item, decision_id in zip(items, ids, strict=True):
            self._add_response(parts, decision, item, decision_id)
            outcomes.append(ServerError(item, decision_id, _DENY, code, None, decision))
        single, batch = self._assemble(parts, count)
        return Decisions(outcomes, "none", started, time.time(), single, batch)

    # --- helpers -------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[CompiledPolicySet, datetime | None, float] | Decision:
        """The policy set and the time (a datetime only when the clock was injected), or the
        deny to answer when either cannot be had."""
        snapshot: tuple[CompiledPolicySet, datetime | None, float]
        try:
            policies = self.source()
            if self._clock is None:
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

    def _convert_and_decide(
        self,
        msg: pdp_pb2.CheckRequest,
        decision_id: bytes,
        policies: CompiledPolicySet,
        now: datetime,
    ) -> tuple[Any, Decision]:
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
            log.exception("decision failed; answering deny", extra=_log_fields(msg, decision_id))
            return request, self._server_error(getattr(policies, "revision", ""))

    def _add_response(
        self,
        parts: list[bytes],
        decision: Decision,
        msg: pdp_pb2.CheckRequest,
        decision_id: bytes,
    ) -> int:
        """The full answer (with the explain trace when asked) added to `parts`; returns its
        effect number. A failure to build it answers the last-resort server error."""
        try:
            resp = self._responses.response(
                decision, request_id=msg.request_id, explain=msg.explain
            )
        except Exception:
            log.exception("building the response failed", extra=_log_fields(msg, decision_id))
            resp = pdp_pb2.CheckResponse(
                effect=pdp_pb2.EFFECT_DENY,
                reasons=[self._server_error_reason_pb],
                policy_revision=getattr(decision, "revision", ""),
                request_id=msg.request_id,
            )
        resp.decision_id = decision_id.decode()
        add_response(parts, resp.SerializeToString())
        return resp.effect

    def _server_error(self, revision: str, reasons: tuple[Reason, ...] | None = None) -> Decision:
        return Decision(
            effect=Effect.DENY,
            reasons=reasons or self._server_error_reasons,
            revision=revision,
            cacheable=False,
        )


__all__ = [
    "FROM_SETTINGS",
    "NO_POLICY_SET_MESSAGE",
    "SERVER_ERROR_MESSAGE",
    "Clock",
    "DeadlineExceeded",
    "Decider",
    "DecisionMetrics",
    "DecisionStore",
    "Observer",
    "PolicySource",
    "answer_fingerprint",
    "cache_from_settings",
    "storable",
    "utc_now",
]
