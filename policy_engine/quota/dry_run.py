"""Quotas in dry runs (`pdp test`, `pdp eval`): counted as the server counts them, in an
in-process store whose clock the caller sets (a case's time), never the wall clock's."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from policy_engine.domain.decision import Decision, Effect
from policy_engine.quota.enforce import enforce
from policy_engine.quota.memory import InProcessQuotaStore

if TYPE_CHECKING:
    from policy_engine.policy.compiled import CompiledOrganization
    from policy_engine.quota.model import Charge


class DryRunQuotas:
    """Quota counters for dry runs: one in-process store (per suite, or per `pdp eval`)
    whose clock is the instant of the decision being counted."""

    def __init__(self) -> None:
        self.now_ms = 0
        self.store = InProcessQuotaStore(clock=lambda: self.now_ms)

    def count(
        self,
        organization: CompiledOrganization | None,
        request: tuple[str, str, str, str],
        decision: Decision,
        at: datetime,
        used: Mapping[str, int],
    ) -> tuple[Decision, tuple[str, ...]]:
        """`decision` (for `request`: subject, application, integration and scope IDs) once
        its ALLOW is counted at `at` as `Decider` counts it, after `used` (quota name ->
        ALLOWs that quota already counted for this request in the window of `at`) topped the
        buckets up; and the problems with `used` (a quota the organization does not declare,
        or that does not count this request's answer)."""
        self.now_ms = int(at.timestamp() * 1000)
        quotas = organization.quotas if organization is not None else None
        charges: tuple[Charge, ...] = ()
        if quotas and decision.effect is Effect.ALLOW:
            subject, application, integration, scope = request
            # An external user ID counts as the person it maps to (as on the server), in the
            # quotas naming either.
            person = decision.mapped_subject_id
            charges = quotas.charges(
                person or subject, application, integration, scope, subject if person else ""
            )
        problems: list[str] = []
        for name, count in used.items():
            matching = [charge for charge in charges if charge.spec.name == name]
            if not matching:
                declared = quotas is not None and any(q.spec.name == name for q in quotas.quotas)
                problems.append(
                    f"quota {name!r} "
                    + ("does not count this request's answer" if declared else "is not declared")
                )
            else:
                # One quota name, one charge: topped up at once (up to 100,000 a case).
                self.store.top_up(matching[0], count)
        if problems or not charges:
            return decision, tuple(problems)
        assert quotas is not None
        verdict = self.store.consume_sync([charges])[0]
        return enforce(decision, charges, verdict, quotas) or decision, ()
