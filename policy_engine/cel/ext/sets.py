"""cel-go's sets library (``ext.Sets``): ``sets.contains(a, b)``, ``sets.equivalent(a, b)``
and ``sets.intersects(a, b)`` on lists, with CEL equality (``1 == 1.0``, never ``true == 1``).

``sets.intersects(subject.attributes.groups, ["admins", "sre"])`` is how a policy asks
"is the subject in any of these groups".
"""

from __future__ import annotations

from typing import Any

from policy_engine.cel.functions import A, Function, function, sig
from policy_engine.cel.types import BOOL, list_of
from policy_engine.cel.values import kind_of, list_contains, no_overload


def _lists(name: str, first: Any, second: Any) -> None:
    if kind_of(first) != "list" or kind_of(second) != "list":
        raise no_overload(name, first, second)


def sets_contains(first: Any, second: Any) -> bool:
    """``sets.contains(a, b)``: every element of ``b`` is in ``a`` (true for an empty ``b``)."""
    _lists("sets.contains", first, second)
    return all(list_contains(first, item) for item in second)


def sets_equivalent(first: Any, second: Any) -> bool:
    """``sets.equivalent(a, b)``: ``a`` and ``b`` hold the same elements (as sets)."""
    _lists("sets.equivalent", first, second)
    return sets_contains(first, second) and sets_contains(second, first)


def sets_intersects(first: Any, second: Any) -> bool:
    """``sets.intersects(a, b)``: ``a`` and ``b`` have an element in common."""
    _lists("sets.intersects", first, second)
    return any(list_contains(first, item) for item in second)


_PAIR = (sig(list_of(A), list_of(A), BOOL),)

FUNCTIONS: tuple[Function, ...] = (
    function("sets.contains", sets_contains, (2,), "global", (), _PAIR),
    function("sets.equivalent", sets_equivalent, (2,), "global", (), _PAIR),
    function("sets.intersects", sets_intersects, (2,), "global", (), _PAIR),
)
