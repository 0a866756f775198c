"""cel-go's math library (``ext.Math``): ``math.greatest``/``math.least`` over numbers of
any kind (arguments or one list), ``math.ceil``, ``floor``, ``round`` (half away from zero),
``trunc``, ``abs``, ``sign``, ``isNaN``, ``isInf``, ``isFinite`` and the bitwise
``math.bitAnd``, ``bitOr``, ``bitXor``, ``bitNot``, ``bitShiftLeft``, ``bitShiftRight`` on
int64 and uint64, as cel-go computes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from policy_engine.cel.errors import CelEvaluationError
from policy_engine.cel.functions import Function, function, sig
from policy_engine.cel.types import BOOL, DOUBLE, DYN, INT, UINT, CelT
from policy_engine.cel.values import (
    INT64_MAX,
    INT64_MIN,
    NUMERIC_KINDS,
    ORDERING,
    UINT64_MAX,
    UInt,
    kind_of,
    no_overload,
)

#: math.greatest / math.least take at most this many arguments (or one list).
MAX_ARGUMENTS = 32

_GREATER = ORDERING[">"]
_LESS = ORDERING["<"]


def _extreme(name: str, better: Callable[[Any, Any], bool], args: tuple[Any, ...]) -> Any:
    values = args
    if len(args) == 1 and kind_of(args[0]) == "list":
        values = tuple(args[0])
        if not values:
            raise CelEvaluationError(f"{name}(): an empty list has no {name[5:]} value")
    best = None
    for value in values:
        if kind_of(value) not in NUMERIC_KINDS:
            raise no_overload(name, *args)
        if best is None or better(value, best):
            best = value
    return best


def greatest(*args: Any) -> Any:
    """``math.greatest(a, b, ...)`` / ``math.greatest(list)``: the greatest number, numbers
    of every kind compared as CEL orders them; the first of equal ones."""
    return _extreme("math.greatest", _GREATER, args)


def least(*args: Any) -> Any:
    """``math.least(a, b, ...)`` / ``math.least(list)``: the least number."""
    return _extreme("math.least", _LESS, args)


def extreme_type(arguments: Sequence[CelT]) -> CelT | None:
    """The type of ``math.greatest``/``math.least``: their numbers' common kind, else dyn;
    None (refused) for an argument that cannot be a number."""
    if len(arguments) == 1 and arguments[0].kind == "list":
        arguments = arguments[0].params
    numeric = ("int", "uint", "double", "dyn")
    if not all(t.kind in numeric for t in arguments):
        return None
    first = arguments[0]
    return first if all(t == first for t in arguments) else DYN


def _double(name: str, value: Any) -> float:
    if kind_of(value) == "double":
        return float(value)
    raise no_overload(name, value)


def _rounding(name: str, compute: Callable[[float], float]) -> Callable[[Any], float]:
    def rounding(value: Any) -> float:
        number = _double(name, value)
        if math.isnan(number) or math.isinf(number):
            return number
        # Python's ceil/floor/trunc give an int, which has no -0: as Go's math functions, a
        # result keeps the operand's sign (math.ceil(-0.5) is -0.0, so 1.0 / it is -inf).
        return math.copysign(float(compute(number)), number)

    rounding.__name__ = name.replace(".", "_")
    return rounding


def _round_half_away(value: float) -> float:
    """Go's math.Round: exact where ``floor(|x| + 0.5)`` is not (the sum rounds up for
    0.49999999999999994 and for odd integers above 2^52)."""
    whole = float(math.trunc(value))
    if abs(value - whole) >= 0.5:  # the difference of a double and its truncation is exact
        whole += math.copysign(1.0, value)
    return whole


def absolute(value: Any) -> Any:
    """``math.abs(x)``: int (|int64 min| overflows), uint or double."""
    kind = kind_of(value)
    if kind == "int":
        if value == INT64_MIN:
            raise CelEvaluationError("math.abs(): integer overflow")
        return abs(value)
    if kind == "uint" or kind == "double":
        return value if kind == "uint" else abs(value)
    raise no_overload("math.abs", value)


def sign(value: Any) -> Any:
    """``math.sign(x)``: -1, 0 or 1 of the number's kind (NaN for NaN)."""
    kind = kind_of(value)
    if kind == "int":
        return (value > 0) - (value < 0)
    if kind == "uint":
        return UInt(1 if value else 0)
    if kind == "double":
        if math.isnan(value):
            return value
        return float((value > 0) - (value < 0))
    raise no_overload("math.sign", value)


def _float_test(name: str, test: Callable[[float], bool]) -> Callable[[Any], bool]:
    def predicate(value: Any) -> bool:
        return test(_double(name, value))

    predicate.__name__ = name.replace(".", "_")
    return predicate


def _signed(value: int) -> int:
    value &= UINT64_MAX
    return value - (1 << 64) if value > INT64_MAX else value


def _bitwise(name: str, compute: Callable[[int, int], int]) -> Callable[[Any, Any], Any]:
    def bitwise(a: Any, b: Any) -> Any:
        ka, kb = kind_of(a), kind_of(b)
        if ka == kb == "int":
            return _signed(compute(a, b))
        if ka == kb == "uint":
            return UInt(compute(a, b) & UINT64_MAX)
        raise no_overload(name, a, b)

    bitwise.__name__ = name.replace(".", "_")
    return bitwise


def bit_not(value: Any) -> Any:
    """``math.bitNot(x)``: the bits of an int or uint inverted."""
    kind = kind_of(value)
    if kind == "int":
        return ~value
    if kind == "uint":
        return UInt(UINT64_MAX - value)
    raise no_overload("math.bitNot", value)


def _shift(name: str, left: bool) -> Callable[[Any, Any], Any]:
    def shift(value: Any, count: Any) -> Any:
        kind = kind_of(value)
        if kind not in ("int", "uint") or kind_of(count) != "int":
            raise no_overload(name, value, count)
        if count < 0:
            raise CelEvaluationError(f"{name}(): negative shift count {count}")
        if count >= 64:
            return 0 if kind == "int" else UInt(0)
        bits = value & UINT64_MAX  # a right shift of an int is logical, as in cel-go
        shifted = (bits << count if left else bits >> count) & UINT64_MAX
        return _signed(shifted) if kind == "int" else UInt(shifted)

    shift.__name__ = name.replace(".", "_")
    return shift


def _extremes(name: str, impl: Callable[..., Any]) -> Function:
    return Function(
        name=name,
        impl=impl,
        arities=frozenset(range(1, MAX_ARGUMENTS + 1)),
        as_method=False,
        as_global=True,
        check=extreme_type,
    )


_INTEGERS = (sig(INT, INT, INT), sig(UINT, UINT, UINT))

FUNCTIONS: tuple[Function, ...] = (
    _extremes("math.greatest", greatest),
    _extremes("math.least", least),
    *(
        function(
            f"math.{name}",
            _rounding(f"math.{name}", compute),
            (1,),
            "global",
            (),
            (sig(DOUBLE, DOUBLE),),
        )
        for name, compute in (
            ("ceil", math.ceil),
            ("floor", math.floor),
            ("round", _round_half_away),
            ("trunc", math.trunc),
        )
    ),
    function(
        "math.abs", absolute, (1,), "global", (), tuple(sig(t, t) for t in (INT, UINT, DOUBLE))
    ),
    function("math.sign", sign, (1,), "global", (), tuple(sig(t, t) for t in (INT, UINT, DOUBLE))),
    *(
        function(
            f"math.{name}",
            _float_test(f"math.{name}", test),
            (1,),
            "global",
            (),
            (sig(DOUBLE, BOOL),),
        )
        for name, test in (
            ("isNaN", math.isnan),
            ("isInf", math.isinf),
            ("isFinite", math.isfinite),
        )
    ),
    *(
        function(f"math.{name}", _bitwise(f"math.{name}", compute), (2,), "global", (), _INTEGERS)
        for name, compute in (
            ("bitAnd", lambda a, b: a & b),
            ("bitOr", lambda a, b: a | b),
            ("bitXor", lambda a, b: a ^ b),
        )
    ),
    function("math.bitNot", bit_not, (1,), "global", (), (sig(INT, INT), sig(UINT, UINT))),
    *(
        function(
            f"math.{name}",
            _shift(f"math.{name}", left),
            (2,),
            "global",
            (),
            (
                sig(INT, INT, INT),
                sig(UINT, INT, UINT),
            ),
        )
        for name, left in (("bitShiftLeft", True), ("bitShiftRight", False))
    ),
)
