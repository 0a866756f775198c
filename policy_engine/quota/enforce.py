"""What a quota verdict makes of an ALLOW: shared by the server's pipeline and `pdp test`.

The pipeline (policy_engine.decision.pipeline) finds each ALLOW's charges (the quotas its
organization declares that match it, policy_engine.policy.quotas), asks the counter store
for every item of a call at once, and hands each verdict to `enforce`:

- admitted: the ALLOW stands (it was counted in every matching quota);
- exhausted: DENY, `kontext_rate_limited` (SYSTEM layer, policy = the quota's name), whose
  message names the quota, its limit, window and `per` parts and when it frees, and whose
  `retry_after_ms` says the same for machines;
- unavailable (the store could not count): DENY with `kontext_server_error` when any matching
  quota says `when_unavailable: deny` (the default), else the ALLOW stands uncounted.

Every outcome is counted in `pdp_quota_total{organization, quota, outcome}` per quota.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer, Reason
from policy_engine.metrics import QUOTAS
from policy_engine.quota.model import Charge, QuotaSpec, Verdict, WhenUnavailable

if TYPE_CHECKING:
    from policy_engine.policy.quotas import OrganizationQuotas

__all__ = ["count_outcomes", "enforce", "span", "unavailable_denies"]

_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1_000))


def span(ms: int) -> str:
    """A duration for people, rounded up to the second: 750000 -> "12 min 30 s",
    3600000 -> "1 h", 1 -> "1 s"."""
    seconds = max(1, -(-ms // 1_000))
    parts = []
    for unit, size in _UNITS:
        amount, seconds = divmod(seconds, size // 1_000)
        if amount:
            parts.append(f"{amount} {unit}")
    return " ".join(parts)


def _per(spec_per: Sequence[str]) -> str:
    return "per " + ", ".join(spec_per) if spec_per else "across the organization"


def _reason(code: ErrorCode, spec: QuotaSpec, rule: str, message: str, wait_ms: int = 0) -> Reason:
    return Reason(
        code=code,
        layer=Layer.SYSTEM,
        policy=spec.name,
        rule=rule,
        message=message,
        retry_after_ms=wait_ms,
    )


def exhausted_reason(spec: QuotaSpec, per: Sequence[str], retry_after_ms: int) -> Reason:
    """The `kontext_rate_limited` reason of an ALLOW quota `spec` had no room for."""
    message = (
        f"quota {spec.name} allows {spec.limit:,} per {span(spec.window_ms)} "
        f"({spec.algorithm.value} window) {_per(per)} and is exhausted; "
        f"it frees in {span(retry_after_ms)}"
    )
    return _reason(ErrorCode.RATE_LIMITED, spec, "quota-exhausted", message, max(1, retry_after_ms))


def unavailable_reason(spec: QuotaSpec) -> Reason:
    """The `kontext_server_error` reason of an ALLOW the counter store could not count."""
    message = (
        f"the quota store is unreachable, so quota {spec.name} could not count this "
        "request; denied (when_unavailable: deny)"
    )
    return _reason(ErrorCode.SERVER_ERROR, spec, "quota-store-unavailable", message)


def unavailable_denies(charges: Sequence[Charge]) -> QuotaSpec | None:
    """The first quota among `charges` whose `when_unavailable` is deny, or None."""
    for charge in charges:
        if charge.spec.when_unavailable is not WhenUnavailable.ALLOW:
            return charge.spec
    return None


def enforce(
    decision: Decision,
    charges: Sequence[Charge],
    verdict: Verdict,
    quotas: OrganizationQuotas,
) -> Decision | None:
    """The decision an ALLOW with `charges` (of the organization's `quotas`) becomes under
    `verdict`, or None when the ALLOW stands. A quota's answer is never cacheable."""
    if verdict.admitted:
        return None
    if verdict.unavailable or verdict.exhausted is None:
        spec = unavailable_denies(charges)
        if spec is None:
            return None
        reason = unavailable_reason(spec)
    else:
        spec = verdict.exhausted
        reason = exhausted_reason(spec, quotas.per_of(spec.name), verdict.retry_after_ms)
    return replace(decision, effect=Effect.DENY, reasons=(reason,), cacheable=False)


def count_outcomes(charges: Sequence[Charge], verdict: Verdict) -> None:
    """`pdp_quota_total`: admitted for every quota of an admitted item; exhausted for the
    full one; unavailable for every quota the store could not count."""
    if verdict.admitted:
        for charge in charges:
            QUOTAS.labels(charge.spec.organization, charge.spec.name, "admitted").inc()
    elif verdict.exhausted is not None and not verdict.unavailable:
        spec = verdict.exhausted
        QUOTAS.labels(spec.organization, spec.name, "exhausted").inc()
    else:
        for charge in charges:
            QUOTAS.labels(charge.spec.organization, charge.spec.name, "unavailable").inc()
