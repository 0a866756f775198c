"""What both counter stores do alike with a call's items, before counting."""

from __future__ import annotations

from collections.abc import Sequence

from policy_engine.quota.model import UNAVAILABLE, Charge, Verdict

# (organization, quota name, window_ms, algorithm, bucket): what names one counter, the parts
# of its Redis key. A change of window or algorithm starts new counters; of limit, keeps them.
CounterId = tuple[str, str, int, str, str]


def counter_id(charge: Charge) -> CounterId:
    spec = charge.spec
    # The member itself, not its `.value`: a StrEnum member is its str (and `.value` is a
    # descriptor call, a third of this function's time).
    return (spec.organization, spec.name, spec.window_ms, spec.algorithm, charge.bucket)


def distinct(charges: Sequence[Charge]) -> list[Charge]:
    """`charges` without repeats of one counter (first kept): one ALLOW counts once in each
    counter, and checking a counter twice before counting it twice could overrun its limit."""
    if len(charges) < 2:
        return list(charges)
    seen: set[CounterId] = set()
    kept = []
    for charge in charges:
        ident = counter_id(charge)
        if ident not in seen:
            seen.add(ident)
            kept.append(charge)
    return kept


def unavailable_all(items: Sequence[Sequence[Charge]]) -> list[Verdict]:
    """Every item unavailable, except those without charges (admitted: nothing to count)."""
    return [UNAVAILABLE if charges else Verdict(True) for charges in items]
