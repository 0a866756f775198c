"""The decision engine: pure, no I/O and no globals.

It takes an immutable compiled policy set, a request and the time, and returns a decision:
1. built-in checks no policy can switch off (validation, organization, service accounts,
   catalog, external identity mapping, token, connection);
2. the org, user and application layers: each layer allows or denies; a request is allowed
   only if all three allow. Inside a layer a matching deny beats a matching allow; a layer in
   which no rule matches gives its default; a condition that fails to evaluate never allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from policy_engine.auth.tokens import TokenCheck, check_token
from policy_engine.cel import CelEvaluationError
from policy_engine.config import RequestLimits
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import (
    POLICY_LAYERS,
    Decision,
    Effect,
    LayerTrace,
    Reason,
    RuleMatch,
    RuleResult,
    RuleTrace,
)
from policy_engine.domain.decision import Layer as LayerName
from policy_engine.domain.request import CheckRequest, ConnectionState, SubjectKind
from policy_engine.engine.activation import NOT_EXTERNAL, build_activation
from policy_engine.engine.validation import validate_request, validation_reasons
from policy_engine.policy.compiled import (
    CompiledOrganization,
    CompiledPolicySet,
    CompiledRule,
    LayerIndex,
)
from policy_engine.policy.identities import Refused
from policy_engine.policy.index import applies_to_any

BUILTIN_POLICY = "builtin"
DEFAULT_RULE = "default"
_DEFAULT_LIMITS = RequestLimits()


def _system_reason(code: ErrorCode, rule: str, message: str, field: str = "") -> Reason:
    return Reason(
        code=code,
        layer=LayerName.SYSTEM,
        policy=BUILTIN_POLICY,
        rule=rule,
        message=message,
        field=field,
    )


# External user IDs ("userId mode"): the application may not act for external users (there),
# and the ID is not linked to a person. See README, "External identity mapping", for the codes.
EXTERNAL_USER_MODE_RULE = "external-user-mode-allowed"
EXTERNAL_USER_MAPPED_RULE = "external-user-mapped"


def _identity_reason(refused: Refused) -> Reason:
    """The deny for an external user ID the organization's mappings do not resolve: an
    application outside the namespace is refused like any unauthorized application
    (kontext_policy_denied: the organization decided it may not use userId mode); an ID with
    no mapping is a person who has not linked it yet (kontext_authorization_required: the
    broker's remedy is to send them through sign-in, as for a missing token)."""
    if refused.mode_allowed:
        return _system_reason(
            ErrorCode.AUTHORIZATION_REQUIRED,
            EXTERNAL_USER_MAPPED_RULE,
            refused.message,
            "subject.id",
        )
    return _system_reason(
        ErrorCode.POLICY_DENIED, EXTERNAL_USER_MODE_RULE, refused.message, "subject.namespace"
    )


def _builtin_reasons(
    request: CheckRequest,
    organization: CompiledOrganization,
    token_check: TokenCheck | None,
    identity: Reason | None,
) -> list[Reason]:
    reasons: list[Reason] = []
    if request.subject.kind is SubjectKind.SERVICE_ACCOUNT:
        reasons.append(
            _system_reason(
                ErrorCode.POLICY_DENIED,
                "service-accounts-never-receive-credentials",
                "service accounts are for infrastructure management and never receive "
                "integration credentials",
            )
        )
    catalog = organization.catalog
    if request.integration.id not in catalog.integrations:
        reasons.append(
            _system_reason(
                ErrorCode.NOT_FOUND,
                "integration-in-catalog",
                f"integration {request.integration.id!r} is not in organization "
                f"{organization.name!r}'s catalog",
                "integration.id",
            )
        )
    if request.application.id not in catalog.applications:
        reasons.append(
            _system_reason(
                ErrorCode.NOT_FOUND,
                "application-in-catalog",
                f"application {request.application.id!r} is not in organization "
                f"{organization.name!r}'s catalog",
                "application.id",
            )
        )
    if identity is not None:
        reasons.append(identity)
    if not request.subject.access_token and organization.tokens.required:
        reasons.append(
            _system_reason(
                ErrorCode.AUTHORIZATION_REQUIRED,
                "valid-subject-token",
                f"organization {organization.name!r} requires the subject's access token",
                "subject.access_token",
            )
        )
    if token_check is not None and token_check.problem is not None:
        reasons.append(
            _system_reason(
                ErrorCode.AUTHORIZATION_REQUIRED,
                "valid-subject-token",
                token_check.problem,
                "subject.access_token",
            )
        )
    if request.context.connection is ConnectionState.ABSENT:
        reasons.append(
            _system_reason(
                ErrorCode.INTEGRATION_CONNECTION_REQUIRED,
                "active-connection",
                f"{request.subject.id!r} has no active connection to {request.integration.id!r}",
            )
        )
    return reasons


@dataclass(slots=True)
class _LayerOutcome:
    effect: Effect
    by_default: bool
    reasons: list[Reason] = field(default_factory=list)
    trace: list[RuleTrace] = field(default_factory=list)
    errored_allows: list[tuple[CompiledRule, str]] = field(default_factory=list)
    matched: list[RuleMatch] = field(default_factory=list)
    read_clock: bool = False
    cacheable: bool = True


def _evaluate(rule: CompiledRule, activation: dict[str, Any]) -> tuple[RuleResult, str]:
    if rule.condition is None:
        return RuleResult.MATCHED, ""
    try:
        value = rule.condition.evaluate(activation)
    except CelEvaluationError as exc:
        return RuleResult.ERROR, str(exc)
    if value is True:
        return RuleResult.MATCHED, ""
    if value is False:
        return RuleResult.NOT_MATCHED, ""
    return RuleResult.ERROR, f"condition returned {type(value).__name__}, not bool"


def _run_rule(
    layer: LayerName,
    rule: CompiledRule,
    activation: dict[str, Any],
    outcome: _LayerOutcome,
    explain: bool,
) -> RuleResult:
    """Evaluates one applicable rule and records what it means for its layer."""
    result, detail = _evaluate(rule, activation)
    outcome.read_clock |= rule.reads_clock
    outcome.cacheable &= rule.cacheable
    if explain:
        outcome.trace.append(RuleTrace(rule.policy, rule.name, rule.effect, result, detail))
    if result is RuleResult.MATCHED:
        outcome.matched.append(RuleMatch(layer, rule.policy, rule.name, rule.effect))
    if rule.effect is Effect.DENY and result is not RuleResult.NOT_MATCHED:
        message = rule.message or f"denied by {layer} policy {rule.policy!r}, rule {rule.name!r}"
        if result is RuleResult.ERROR:
            message = f"{message} (condition failed to evaluate, denying: {detail})"
        outcome.reasons.append(Reason(rule.code, layer, rule.policy, rule.name, message))
    elif rule.effect is Effect.ALLOW and result is RuleResult.ERROR:
        outcome.errored_allows.append((rule, detail))
    return result


def _decide_layer(
    layer: LayerName,
    index: LayerIndex,
    request: CheckRequest,
    activation: dict[str, Any],
    explain: bool,
    external_id: str = "",
) -> _LayerOutcome:
    """One layer's answer for `request` (for an external user, made as the person its ID
    maps to; `external_id` is then that external ID, "" otherwise)."""
    bucket = index.bucket(request.integration.id)
    subject, application, scope = request.subject.id, request.application.id, request.scope
    outcome = _LayerOutcome(effect=index.default, by_default=True)

    # The index narrows each effect's rules to the few that may apply (same order as the
    # bucket); applies_to still decides, so what is evaluated is what a full scan finds.
    # A deny whose target names the external ID applies as well as one naming the person
    # (each subject matcher may accept either, so alice's policy with a rule naming her
    # partner account holds for it): an operator who targets the account the request names
    # must not see the deny skipped because the engine decides as the person. Allows must
    # name the person: this can only deny more.
    if external_id:
        denies = bucket.denies.candidates_for_any((subject, external_id), application, scope)
    else:
        denies = bucket.denies.candidates(subject, application, scope)
    for rule in denies:
        if (
            applies_to_any(rule, (subject, external_id), application, scope)
            if external_id
            else rule.applies_to(subject, application, scope)
        ):
            _run_rule(layer, rule, activation, outcome, explain)
    if outcome.reasons:
        outcome.effect, outcome.by_default = Effect.DENY, False
        if not explain:
            return outcome
    for rule in bucket.allows.candidates(subject, application, scope):
        if (
            rule.applies_to(subject, application, scope)
            and _run_rule(layer, rule, activation, outcome, explain) is RuleResult.MATCHED
        ):
            if not outcome.reasons:
                outcome.effect, outcome.by_default = Effect.ALLOW, False
            if not explain:
                return outcome
    if outcome.by_default and outcome.effect is Effect.DENY:
        outcome.reasons.append(
            Reason(
                ErrorCode.POLICY_DENIED,
                layer,
                DEFAULT_RULE,
                DEFAULT_RULE,
                f"no {layer} policy allows {application!r} to use {request.integration.id!r} "
                f"with scope {scope!r} for {subject!r} (the {layer} layer defaults to deny)",
            )
        )
        outcome.reasons.extend(
            Reason(
                ErrorCode.POLICY_DENIED,
                layer,
                rule.policy,
                rule.name,
                f"allow rule could not be evaluated and did not match: {detail}",
            )
            for rule, detail in outcome.errored_allows
        )
    return outcome


def decide(
    policies: CompiledPolicySet,
    request: CheckRequest,
    *,
    now: datetime,
    limits: RequestLimits = _DEFAULT_LIMITS,
) -> Decision:
    violations = validate_request(request, limits)
    if violations:
        return Decision(
            Effect.DENY, validation_reasons(violations), policies.revision, cacheable=False
        )
    organization = policies.organizations.get(request.organization)
    if organization is None:
        reason = _system_reason(
            ErrorCode.NOT_FOUND,
            "organization-has-policies",
            f"no policies are loaded for organization {request.organization!r}",
            "organization",
        )
        return Decision(Effect.DENY, (reason,), policies.revision)
    evaluation_time = request.context.time or now
    token = request.subject.access_token
    subject = request.subject
    person = ""  # for an external user ID: the person it maps to
    external = NOT_EXTERNAL
    identity: Reason | None = None
    if subject.kind is SubjectKind.EXTERNAL_USER:
        resolved = organization.identities.resolve(
            request.application.id, subject.namespace, subject.id
        )
        if isinstance(resolved, Refused):
            identity = _identity_reason(resolved)
        else:
            person = resolved.person
            external = {"id": subject.id, "namespace": resolved.namespace}
    # An unresolved external ID has no person for the token to belong to: it is denied
    # already, and its token is not looked at.
    token_check = (
        check_token(
            token,
            evaluation_time,
            organization.tokens,
            person or subject.id,
            subject.kind,
            application_id=request.application.id,
            external_id=subject.id if person else "",
        )
        if token and identity is None
        else None
    )
    valid_until = token_check.changes_at if token_check else None
    key_set = token_check.key_set if token_check is not None else b""
    builtin = _builtin_reasons(request, organization, token_check, identity)
    if builtin:
        trace = (LayerTrace(LayerName.SYSTEM, Effect.DENY, False),) if request.explain else ()
        return Decision(
            Effect.DENY,
            tuple(builtin),
            policies.revision,
            trace,
            valid_until=valid_until,
            mapped_subject_id=person,
            token_key_set=key_set,
        )

    claims = token_check.claims if token_check is not None else {}
    actors = token_check.actors if token_check is not None else ()
    if person:
        # Decided as the person: their user-layer policies apply, CEL sees their ID.
        request = replace(request, subject=replace(subject, id=person))
    activation = build_activation(request, evaluation_time, claims, actors, external)
    reasons: list[Reason] = []
    traces: list[LayerTrace] = []
    matched: list[RuleMatch] = []
    time_dependent = False
    cacheable = True
    for layer in POLICY_LAYERS:
        outcome = _decide_layer(
            layer,
            organization.layers[layer],
            request,
            activation,
            request.explain,
            external["id"],
        )
        reasons.extend(outcome.reasons)
        matched.extend(outcome.matched)
        time_dependent |= outcome.read_clock
        cacheable &= outcome.cacheable
        if request.explain:
            traces.append(
                LayerTrace(layer, outcome.effect, outcome.by_default, tuple(outcome.trace))
            )
    effect = Effect.DENY if reasons else Effect.ALLOW
    return Decision(
        effect,
        tuple(reasons),
        policies.revision,
        tuple(traces),
        matched_rules=tuple(matched),
        time_dependent=time_dependent,
        valid_until=valid_until,
        cacheable=cacheable,
        mapped_subject_id=person,
        token_key_set=key_set,
    )
