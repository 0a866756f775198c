"""cel-go's optionals library: ``optional.of(x)``, ``optional.none()``,
``optional.ofNonZeroValue(x)``, ``o.hasValue()``, ``o.value()``, ``o.orValue(x)`` and
``o.or(p)`` (both short-circuit), plus the syntax the compiler handles (``m.?f``, ``l[?i]``,
``[?o]``, ``{?k: o}``) and the macros ``o.optMap(v, e)`` and ``o.optFlatMap(v, e)``.

The natural way to read attributes that may be missing:
``subject.attributes.?department.orValue("none") == "sales"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from policy_engine.cel.errors import CelEvaluationError
from policy_engine.cel.functions import A, Function, function, sig
from policy_engine.cel.types import BOOL, DYN, optional_of
from policy_engine.cel.values import (
    OPTIONAL_NONE,
    Optional,
    duration_nanos,
    kind_of,
    no_overload,
    timestamp_nanos,
)


def optional_of_value(value: Any) -> Optional:
    """``optional.of(x)``: an optional holding ``x`` (null included)."""
    return Optional(value)


def optional_none() -> Optional:
    """``optional.none()``: the empty optional."""
    return OPTIONAL_NONE


def _is_zero(value: Any) -> bool:
    kind = kind_of(value)
    if kind in ("null_type", "bool", "int", "uint", "double", "string", "bytes", "list", "map"):
        return not value
    if kind == "timestamp":
        return timestamp_nanos(value) == 0
    if kind == "duration":
        return duration_nanos(value) == 0
    if kind == "optional_type":
        return not value.has_value()
    return False


def optional_of_non_zero(value: Any) -> Optional:
    """``optional.ofNonZeroValue(x)``: empty when ``x`` is its type's zero value (null,
    false, 0, 0u, 0.0, "", b"", [], {}, the epoch, a zero duration)."""
    return OPTIONAL_NONE if _is_zero(value) else Optional(value)


def _optional(value: Any, name: str, *others: Any) -> Optional:
    if type(value) is Optional:
        return value
    raise no_overload(name, value, *others)


def has_value(value: Any) -> bool:
    """``o.hasValue()``."""
    return _optional(value, "hasValue").has_value()


def value_of(value: Any) -> Any:
    """``o.value()``: the value; an error on an empty optional."""
    held = _optional(value, "value").value
    if held is OPTIONAL_NONE.value:
        raise CelEvaluationError("optional.none() has no value")
    return held


def or_value(value: Any, otherwise: Callable[[], Any]) -> Any:
    """``o.orValue(x)``: the value, else ``x`` (evaluated only then)."""
    optional = _optional(value, "orValue")
    return optional.value if optional.has_value() else otherwise()


def or_optional(value: Any, otherwise: Callable[[], Any]) -> Optional:
    """``o.or(p)``: ``o`` if it has a value, else the optional ``p`` (evaluated only then)."""
    optional = _optional(value, "or")
    if optional.has_value():
        return optional
    return _optional(otherwise(), "or", optional)


FUNCTIONS: tuple[Function, ...] = (
    function("optional.of", optional_of_value, (1,), "global", (), (sig(A, optional_of(A)),)),
    function("optional.none", optional_none, (0,), "global", (), (sig(optional_of(DYN)),)),
    function(
        "optional.ofNonZeroValue",
        optional_of_non_zero,
        (1,),
        "global",
        (),
        (sig(A, optional_of(A)),),
    ),
    function("hasValue", has_value, (1,), "method", (), (sig(optional_of(A), BOOL),)),
    function("value", value_of, (1,), "method", (), (sig(optional_of(A), A),)),
    function("orValue", or_value, (2,), "method", (), (sig(optional_of(A), A, A),), lazy=True),
    function(
        "or",
        or_optional,
        (2,),
        "method",
        (),
        (sig(optional_of(A), optional_of(A), optional_of(A)),),
        lazy=True,
    ),
)
