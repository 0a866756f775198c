"""CEL value semantics over plain Python values.

The evaluator works directly on the values found in the activation (``str``, ``int``,
``float``, ``bool``, ``None``, ``bytes``, ``list``/``tuple``, any ``Mapping``,
``datetime.datetime`` and ``datetime.timedelta``) instead of wrapping them in celpy's
``celtypes``: wrapping costs more than the whole evaluation of a typical policy clause.

The price is that Python's own semantics differ from CEL's in a few places, and every operator
here exists to bridge one of them:

* ``bool`` subclasses ``int`` in Python (``True == 1``, ``1 + True == 2``, ``True in {1}``);
  in CEL a bool is never a number. Every type test therefore looks at the exact type first.
* Python ints are unbounded; CEL ints are int64 and overflow is an error.
* Python ``//`` and ``%`` floor; CEL (like Go) truncates toward zero.
* Python container comparison uses identity first (``[nan] == [nan]`` can be true) and
  Python equality between ``1`` and ``True``; list and map equality is re-implemented.

Operators are table-driven: a table maps a pair of CEL kinds to an implementation, and a
derived table keyed by exact Python types gives the common case a single dict lookup.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from policy_engine.cel.errors import CelEvaluationError

#: Sentinel returned by :func:`map_lookup` for an absent key (``None`` is a valid value).
MISSING: Any = object()

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
NANOS_PER_SECOND = 1_000_000_000
#: Timestamps span 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z (ns since the epoch).
MIN_TIMESTAMP_NANOS = -62_135_596_800 * NANOS_PER_SECOND
MAX_TIMESTAMP_NANOS = 253_402_300_800 * NANOS_PER_SECOND - 1
#: Durations are int64 nanoseconds (about +-292 years), as cel-go and the conformance cases
#: have them (``timestamp('9999-12-31T23:59:59Z') - timestamp('0001-01-01T00:00:00Z')``
#: is a range error).
MIN_DURATION_NANOS = INT64_MIN
MAX_DURATION_NANOS = INT64_MAX
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class UInt(int):
    """A CEL ``uint``: its own type, 0..2^64-1, never mixed with ``int`` in arithmetic.

    A subclass of ``int`` so that comparisons, hashing and map lookups across int, uint and
    double work as CEL's heterogeneous equality says (``1u == 1``); every operator
    dispatches on the exact type, so ``1u + 1`` has no overload and ``0u - 1u`` overflows.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{int(self)}u"


def uint(value: int) -> UInt:
    """A uint value; raises :class:`CelEvaluationError` outside 0..2^64-1."""
    if 0 <= value <= UINT64_MAX:
        return UInt(value)
    raise CelEvaluationError(f"uint out of range: {value}")


class Timestamp:
    """A CEL timestamp: nanoseconds since the Unix epoch, within the spec's range.

    Activations may also hold aware ``datetime`` values (microseconds); every operator reads
    both through :func:`timestamp_nanos`.
    """

    __slots__ = ("nanos",)

    def __init__(self, nanos: int) -> None:
        self.nanos = nanos

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Timestamp, datetime)):
            return self.nanos == timestamp_nanos(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("timestamp", self.nanos))

    def __repr__(self) -> str:
        return f"Timestamp({self.nanos})"

    def to_datetime(self) -> datetime:
        """The aware UTC datetime, truncated to microseconds."""
        return _EPOCH + timedelta(microseconds=self.nanos // 1000)


class Duration:
    """A CEL duration: signed int64 nanoseconds (``timedelta`` values are read as well)."""

    __slots__ = ("nanos",)

    def __init__(self, nanos: int) -> None:
        self.nanos = nanos

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Duration, timedelta)):
            return self.nanos == duration_nanos(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("duration", self.nanos))

    def __repr__(self) -> str:
        return f"Duration({self.nanos})"


def timestamp_from_nanos(nanos: int) -> Timestamp:
    """A timestamp; raises :class:`CelEvaluationError` outside 0001-01-01..9999-12-31."""
    if MIN_TIMESTAMP_NANOS <= nanos <= MAX_TIMESTAMP_NANOS:
        return Timestamp(nanos)
    raise CelEvaluationError("timestamp out of range")


def duration_from_nanos(nanos: int) -> Duration:
    """A duration; raises :class:`CelEvaluationError` outside int64 nanoseconds."""
    if MIN_DURATION_NANOS <= nanos <= MAX_DURATION_NANOS:
        return Duration(nanos)
    raise CelEvaluationError("duration out of range")


def timestamp_nanos(value: Timestamp | datetime) -> int:
    """Nanoseconds since the epoch of a timestamp or an aware (or UTC naive) datetime."""
    if type(value) is Timestamp:
        return value.nanos
    if value.tzinfo is None or value.utcoffset() is None:  # type: ignore[union-attr]
        # Which zone was meant is unknown: refuse rather than guess (fails closed).
        raise CelEvaluationError("cannot compare or compute with a timestamp without a zone")
    delta = value - _EPOCH  # type: ignore[operator]
    return (delta.days * 86_400 + delta.seconds) * NANOS_PER_SECOND + delta.microseconds * 1000


def duration_nanos(value: Duration | timedelta) -> int:
    """Nanoseconds of a duration or a timedelta."""
    if type(value) is Duration:
        return value.nanos
    delta: timedelta = value  # type: ignore[assignment]
    return (delta.days * 86_400 + delta.seconds) * NANOS_PER_SECOND + delta.microseconds * 1000


class Optional:
    """A CEL optional value (cel-go's optionals library): ``optional.of(x)`` holds ``x``,
    ``optional.none()`` holds nothing (``value`` is :data:`MISSING`)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def has_value(self) -> bool:
        return self.value is not MISSING

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Optional):
            return NotImplemented
        if not self.has_value() or not other.has_value():
            return self.has_value() == other.has_value()
        return cel_equals(self.value, other.value)

    def __hash__(self) -> int:
        return hash("optional")

    def __repr__(self) -> str:
        return f"optional.of({self.value!r})" if self.has_value() else "optional.none()"


class CelType:
    """A CEL type value (``type(1) == int``): compared by name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CelType) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("type", self.name))

    def __repr__(self) -> str:
        return self.name


_KIND_TYPE_NAMES = {
    "timestamp": "google.protobuf.Timestamp",
    "duration": "google.protobuf.Duration",
}
#: The type denotations an expression may name, by name.
_TYPES: dict[str, CelType] = {
    name: CelType(name)
    for name in (
        "int",
        "uint",
        "double",
        "bool",
        "string",
        "bytes",
        "list",
        "map",
        "null_type",
        "type",
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "optional_type",
    )
}
TYPES: Mapping[str, CelType] = MappingProxyType(_TYPES)


def type_named(name: str) -> CelType | None:
    """The type value a denotation names, or None."""
    return TYPES.get(name)


def type_of(value: Any) -> CelType:
    """CEL ``type(x)``."""
    kind = kind_of(value)
    found = TYPES.get(_KIND_TYPE_NAMES.get(kind, kind))
    if found is None:
        raise no_overload("type", value)
    return found


BinaryOp = Callable[[Any, Any], Any]

_KIND_BY_TYPE: dict[type, str] = {
    bool: "bool",
    int: "int",
    UInt: "uint",
    float: "double",
    str: "string",
    bytes: "bytes",
    list: "list",
    tuple: "list",
    dict: "map",
    MappingProxyType: "map",
    type(None): "null_type",
    datetime: "timestamp",
    timedelta: "duration",
    Timestamp: "timestamp",
    Duration: "duration",
    CelType: "type",
    Optional: "optional_type",
}
_TYPES_BY_KIND: dict[str, tuple[type, ...]] = {}
for _type, _kind in _KIND_BY_TYPE.items():
    _TYPES_BY_KIND[_kind] = (*_TYPES_BY_KIND.get(_kind, ()), _type)


def register_type(python_type: type, name: str) -> CelType:
    """Make ``python_type``'s values CEL values of the type ``name`` (an extension library's
    own type, such as ``net.IP``): ``type(x)`` and ``kind_of`` name it, and ``name`` is a
    type denotation. Called once, at import."""
    _KIND_BY_TYPE[python_type] = name
    _TYPES_BY_KIND[name] = (*_TYPES_BY_KIND.get(name, ()), python_type)
    return _TYPES.setdefault(name, CelType(name))


NUMERIC_KINDS = frozenset({"int", "uint", "double"})
_ORDERED_KINDS = frozenset(
    {"int", "uint", "double", "string", "bytes", "bool", "timestamp", "duration"}
)
_TIME_KINDS = frozenset({"timestamp", "duration"})
_SCALAR_TYPES = frozenset({str, int, float, bool, bytes, type(None)})


def kind_of(value: Any) -> str:
    """The CEL type name of ``value`` (``int``, ``double``, ``string``, ``map``, ...).

    Exact builtin types take one dict lookup; subclasses (an ``IntEnum``, an ``OrderedDict``,
    a user ``Mapping``) fall back to ``isinstance`` checks, ``bool`` before ``int``.
    """
    kind = _KIND_BY_TYPE.get(type(value))
    if kind is not None:
        return kind
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, datetime):
        return "timestamp"
    if isinstance(value, timedelta):
        return "duration"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# The allocation budget
#
# A value can grow exponentially with the text that builds it (each ``s.replace('a', 'aaaa')``
# or ``cel.bind(b, a + a, ...)`` multiplies its size), and copies pile up in comprehensions
# (``l.map(x, big.reverse())``). Every operation that builds a string, bytes or list charges
# its size (code points, bytes, elements) to its evaluation, before it allocates where it
# could multiply: past the budget, the evaluation fails (a deny) instead of taking the
# server's memory. Operations that only select or compare build nothing and charge nothing.

#: Units (code points, bytes, list elements) the values built by one evaluation may add up to.
MAX_ALLOCATION = 1 << 23
#: What constant folding may build for one expression (its results are kept with it; a
#: larger constant is computed at evaluation instead, under the evaluation's budget).
MAX_FOLDED_ALLOCATION = 1 << 16


class _Allocation(threading.local):
    remaining: int = MAX_ALLOCATION


_ALLOCATION = _Allocation()


def reset_allocation(units: int = MAX_ALLOCATION) -> None:
    """Start a budget of ``units`` for what this thread builds next (one evaluation)."""
    _ALLOCATION.remaining = units


def allocate(units: int, operation: str) -> None:
    """Charge ``units`` to this thread's evaluation; raises :class:`CelEvaluationError` when
    its budget (:data:`MAX_ALLOCATION`) is spent."""
    remaining = _ALLOCATION.remaining - units
    _ALLOCATION.remaining = remaining
    if remaining < 0:
        raise CelEvaluationError(
            f"{operation}: the values this expression builds exceed {MAX_ALLOCATION} "
            "code points, bytes or list elements"
        )


#: Lists up to this long are compared or searched without charge (attribute lists are at most
#: 64 entries); a longer one charges its length, so a scan of a built list inside a loop or
#: ``sets.intersects`` of two built lists (quadratic) stops at the budget instead of hanging.
FREE_SCAN = 64


def scan(units: int, operation: str) -> None:
    """Charge a scan of ``units`` list elements or code points to this thread's evaluation
    (the budget values built draw on); raises :class:`CelEvaluationError` when it is spent."""
    remaining = _ALLOCATION.remaining - units
    _ALLOCATION.remaining = remaining
    if remaining < 0:
        raise CelEvaluationError(
            f"{operation}: the list elements and text this expression scans and the values "
            f"it builds exceed {MAX_ALLOCATION}"
        )


#: Strings up to this long (request strings are at most a few KiB) are searched without
#: charge; a longer one, which only a condition can build, charges its length to each search
#: (contains, indexOf, matches, glob), so a few hundred searches of a built text of millions
#: of code points, errors absorbed by ||, stop at the budget instead of taking seconds.
FREE_TEXT_SCAN = 1 << 16


def scan_text(text: str, operation: str) -> None:
    """Charge a search of ``text`` (see :data:`FREE_TEXT_SCAN`); raises
    :class:`CelEvaluationError` when the evaluation's budget is spent."""
    if len(text) > FREE_TEXT_SCAN:
        scan(len(text), operation)


def check_budget(operation: str) -> None:
    """Raise :class:`CelEvaluationError` if this evaluation's budget is already spent: an
    operation that charges after its work (or scans before charging) refuses to start, so
    errors absorbed by ``||`` cannot repeat that work for every operand of a long chain."""
    if _ALLOCATION.remaining < 0:
        raise CelEvaluationError(
            f"{operation}: the values this expression builds exceed {MAX_ALLOCATION} "
            "code points, bytes or list elements"
        )


def charged(impl: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``impl`` charging the size of the string, bytes or list it returns (for functions whose
    result is at most a few times the size of their operands; others check before); it does
    not start once the budget is spent."""

    def run(*args: Any) -> Any:
        check_budget(name)
        result = impl(*args)
        if type(result) in _SIZED_TYPES:
            allocate(len(result), name)
        return result

    run.__name__ = getattr(impl, "__name__", name)
    run.__doc__ = impl.__doc__
    return run


_SIZED_TYPES = frozenset({str, bytes, list, tuple})


def no_overload(op: str, *args: Any) -> CelEvaluationError:
    """The CEL ``no_matching_overload`` error, naming the operator and the argument kinds."""
    kinds = ", ".join(kind_of(a) for a in args)
    return CelEvaluationError(f"no matching overload for '{op}' on ({kinds})")


def as_cel_error(exc: BaseException) -> CelEvaluationError:
    """Turn any exception raised while evaluating into a :class:`CelEvaluationError`.

    Used where errors are absorbed (``&&``, ``||``, ``all``, ``exists``) and at the top of
    ``evaluate``, so that nothing but ``CelEvaluationError`` ever escapes an evaluation.
    """
    if isinstance(exc, CelEvaluationError):
        return exc
    if isinstance(exc, RecursionError):
        return CelEvaluationError("expression is nested too deeply to evaluate")
    try:
        detail = str(exc)
    except Exception:  # pragma: no cover - a pathological __str__
        detail = ""
    return CelEvaluationError(f"evaluation failed: {type(exc).__name__}: {detail}")


# --------------------------------------------------------------------------------------------
# Equality and maps


def cel_equals(a: Any, b: Any) -> bool:
    """CEL ``==``: defined for all values, numbers compare across int/double, bool is no number.

    >>> cel_equals(1, 1.0), cel_equals(True, 1), cel_equals([1, "a"], (1.0, "a"))
    (True, False, True)
    """
    ta = type(a)
    if ta is type(b) and ta in _SCALAR_TYPES:
        return bool(a == b)
    ka = kind_of(a)
    kb = kind_of(b)
    if ka != kb:
        if ka not in NUMERIC_KINDS or kb not in NUMERIC_KINDS:
            return False
        if ka == "double" or kb == "double":
            return float(a) == float(b)  # as ordering does (cel-go, the C++ runtime)
        return bool(a == b)
    if ka == "list":
        if len(a) != len(b):
            return False
        if len(a) > FREE_SCAN:
            scan(len(a), "==")
        return all(cel_equals(x, y) for x, y in zip(a, b, strict=True))
    if ka == "map":
        if len(a) > FREE_SCAN:
            scan(len(a), "==")
        return _maps_equal(a, b)
    if ka == "timestamp":
        return timestamp_nanos(a) == timestamp_nanos(b)
    if ka == "duration":
        return duration_nanos(a) == duration_nanos(b)
    return bool(a == b)


def _maps_equal(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> bool:
    if len(a) != len(b):
        return False
    for key, value in a.items():
        other = map_lookup(b, key)
        if other is MISSING or not cel_equals(value, other):
            return False
    return True


def map_lookup(mapping: Mapping[Any, Any], key: Any) -> Any:
    """``mapping[key]`` with CEL key equality, or :data:`MISSING`.

    Python would find the key ``1`` for ``True`` (and vice versa); CEL keeps them apart, so
    those rare cases scan the keys. String keys - the overwhelmingly common case - are a
    single ``get``. Numeric keys match across int/double (``{1: x}[1.0]``), as in CEL.
    """
    if type(key) is str:
        return mapping.get(key, MISSING)
    kind = kind_of(key)
    if kind == "bool":
        for candidate, value in mapping.items():
            if kind_of(candidate) == "bool" and candidate == key:
                return value
        return MISSING
    try:
        value = mapping.get(key, MISSING)
    except TypeError:  # unhashable key (list, map): never present
        return MISSING
    if value is not MISSING and kind in NUMERIC_KINDS and (key == 0 or key == 1):
        for candidate, found in mapping.items():
            if kind_of(candidate) in NUMERIC_KINDS and candidate == key:
                return found
        return MISSING
    return value


def list_contains(items: Sequence[Any], needle: Any) -> bool:
    """CEL list membership. Python's ``in`` is only trusted for needles it cannot confuse."""
    if len(items) > FREE_SCAN:
        scan(len(items), "in")
    if type(needle) is str or type(needle) is bytes or needle is None:
        return needle in items
    return any(cel_equals(needle, item) for item in items)


def cel_in(needle: Any, container: Any) -> bool:
    """CEL ``in``: list membership by CEL equality or map key membership; else an error."""
    tc = type(container)
    if tc is list or tc is tuple:
        return list_contains(container, needle)
    if tc is dict:
        return map_lookup(container, needle) is not MISSING
    kind = kind_of(container)
    if kind == "list":
        return list_contains(container, needle)
    if kind == "map":
        return map_lookup(container, needle) is not MISSING
    raise no_overload("in", needle, container)


def select_field(obj: Any, field: str) -> Any:
    """``obj.field``: a string-key lookup on a map (on an optional: ``obj.?field``);
    anything else is an error."""
    if type(obj) is Optional:
        return optional_select(obj, field)
    if type(obj) is dict:
        try:
            return obj[field]
        except KeyError:
            raise CelEvaluationError(f"no such key: {field!r}") from None
    if isinstance(obj, Mapping):
        value = obj.get(field, MISSING)
        if value is MISSING:
            raise CelEvaluationError(f"no such key: {field!r}")
        return value
    raise CelEvaluationError(f"cannot select field '{field}' from a value of type {kind_of(obj)}")


def has_field(obj: Any, field: str) -> bool:
    """``has(obj.field)``: key presence on a map (or an optional's map), without failing on a
    missing key; false on an empty optional."""
    if type(obj) is Optional:
        return obj.has_value() and has_field(obj.value, field)
    if isinstance(obj, Mapping):
        return field in obj
    raise CelEvaluationError(f"has() cannot test field '{field}' on a value of type {kind_of(obj)}")


def _list_position(container: Any, key: Any) -> int:
    """The position ``key`` names in a list (not bounds-checked): an int, a uint or a whole
    double inside int64 (as cel-go and the conformance say); any other key has no overload."""
    key_kind = kind_of(key)
    if key_kind == "int" or key_kind == "uint":
        return int(key)
    if key_kind == "double" and float(key).is_integer() and -(2.0**63) < key < 2.0**63:
        return int(key)
    raise no_overload("_[_]", container, key)


def index(container: Any, key: Any) -> Any:
    """``container[key]``: bounds-checked list index by int, or map lookup by key."""
    if type(container) is dict and type(key) is str:
        try:
            return container[key]
        except KeyError:
            raise CelEvaluationError(f"no such key: {key!r}") from None
    if type(container) is Optional:
        return optional_index(container, key)
    kind = kind_of(container)
    if kind == "list":
        position = _list_position(container, key)
        if 0 <= position < len(container):
            return container[position]
        raise CelEvaluationError(f"index out of range: {key}")
    if kind == "map":
        value = map_lookup(container, key)
        if value is MISSING:
            raise CelEvaluationError(f"no such key: {key!r}")
        return value
    raise no_overload("_[_]", container, key)


OPTIONAL_NONE = Optional(MISSING)


def optional_select(obj: Any, field: str) -> Optional:
    """``obj.?field``: the field's value as an optional, empty when the map has no such key
    or ``obj`` is an empty optional."""
    if type(obj) is Optional:
        if not obj.has_value():
            return OPTIONAL_NONE
        obj = obj.value
    if isinstance(obj, Mapping):
        value = obj.get(field, MISSING)
        return OPTIONAL_NONE if value is MISSING else Optional(value)
    raise CelEvaluationError(f"cannot select field '{field}' from a value of type {kind_of(obj)}")


def optional_index(container: Any, key: Any) -> Optional:
    """``container[?key]``: the element or entry as an optional, empty when absent (or out
    of range) or ``container`` is an empty optional."""
    if type(container) is Optional:
        if not container.has_value():
            return OPTIONAL_NONE
        container = container.value
    kind = kind_of(container)
    if kind == "map":
        value = map_lookup(container, key)
        return OPTIONAL_NONE if value is MISSING else Optional(value)
    if kind == "list":
        # Only a position past the end is absent: a key that is no position (1.5) is an
        # error, as in cel-go, not an empty optional a negated hasValue() would turn true.
        position = _list_position(container, key)
        if 0 <= position < len(container):
            return Optional(container[position])
        return OPTIONAL_NONE
    raise no_overload("_[?_]", container, key)


_MAP_KEY_KINDS = frozenset({"string", "int", "uint", "bool"})


def build_map(pairs: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map literal: keys must be string/int/uint/bool and unique (by CEL equality)."""
    out: dict[Any, Any] = {}
    for key, value in pairs:
        kind = kind_of(key)
        if kind not in _MAP_KEY_KINDS:
            raise CelEvaluationError(f"unsupported map key type: {kind}")
        if map_lookup(out, key) is not MISSING:
            raise CelEvaluationError(f"duplicate map key: {key!r}")
        if key in out:
            # Python would merge True and 1 into one entry; refuse rather than lose a key.
            raise CelEvaluationError(f"map key {key!r} collides with a bool/int key")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Ordering


def _make_ordering(symbol: str, compare: BinaryOp) -> BinaryOp:
    """An ordering operator: same-kind numbers, strings, bytes, bools, timestamps, durations."""

    def ordering(a: Any, b: Any) -> bool:
        ta = type(a)
        if ta is type(b) and (ta is int or ta is str or ta is float):
            return compare(a, b)
        ka = kind_of(a)
        kb = kind_of(b)
        if ka == kb and ka in _TIME_KINDS:
            nanos = timestamp_nanos if ka == "timestamp" else duration_nanos
            return bool(compare(nanos(a), nanos(b)))
        if ka == kb and ka in _ORDERED_KINDS:
            return bool(compare(a, b))
        if ka in NUMERIC_KINDS and kb in NUMERIC_KINDS:
            if ka == "double" or kb == "double":
                # int/uint against double compares as doubles (cel-go; the conformance
                # cases: 2^63-1 < 2^63 as a double is false).
                return bool(compare(float(a), float(b)))
            return bool(compare(a, b))
        raise no_overload(symbol, a, b)

    ordering.__name__ = f"ordering_{compare.__name__}"
    return ordering


ORDERING: dict[str, BinaryOp] = {
    symbol: _make_ordering(symbol, compare)
    for symbol, compare in (
        ("<", operator.lt),
        ("<=", operator.le),
        (">", operator.gt),
        (">=", operator.ge),
    )
}


def cel_not_equals(a: Any, b: Any) -> bool:
    """CEL ``!=``: the negation of :func:`cel_equals`."""
    return not cel_equals(a, b)


# --------------------------------------------------------------------------------------------
# Arithmetic


def _int64(result: int, symbol: str) -> int:
    if INT64_MIN <= result <= INT64_MAX:
        return result
    raise CelEvaluationError(f"integer overflow in '{symbol}'")


def _int_add(a: int, b: int) -> int:
    return _int64(a + b, "+")


def _int_sub(a: int, b: int) -> int:
    return _int64(a - b, "-")


def _int_mul(a: int, b: int) -> int:
    return _int64(a * b, "*")


def trunc_div(a: int, b: int) -> int:
    """Integer division truncating toward zero (Go/CEL), not flooring (Python)."""
    quotient = abs(a) // abs(b)
    return -quotient if (a < 0) != (b < 0) else quotient


def _int_div(a: int, b: int) -> int:
    if b == 0:
        raise CelEvaluationError("division by zero")
    return _int64(trunc_div(a, b), "/")


def _int_mod(a: int, b: int) -> int:
    if b == 0:
        raise CelEvaluationError("modulus by zero")
    if a == INT64_MIN and b == -1:
        raise CelEvaluationError("integer overflow in '%'")
    remainder = abs(a) % abs(b)
    return -remainder if a < 0 else remainder


def _double_div(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _list_concat(a: Any, b: Any) -> list[Any]:
    allocate(len(a) + len(b), "+")
    return [*a, *b]


def _sequence_concat(a: Any, b: Any) -> Any:
    """Strings or bytes joined, charged before they are built."""
    allocate(len(a) + len(b), "+")
    return a + b


def _uint64(result: int, symbol: str) -> UInt:
    if 0 <= result <= UINT64_MAX:
        return UInt(result)
    raise CelEvaluationError(f"unsigned integer overflow in '{symbol}'")


def _uint_add(a: int, b: int) -> UInt:
    return _uint64(a + b, "+")


def _uint_sub(a: int, b: int) -> UInt:
    return _uint64(a - b, "-")


def _uint_mul(a: int, b: int) -> UInt:
    return _uint64(a * b, "*")


def _uint_div(a: int, b: int) -> UInt:
    if b == 0:
        raise CelEvaluationError("division by zero")
    return UInt(a // b)


def _uint_mod(a: int, b: int) -> UInt:
    if b == 0:
        raise CelEvaluationError("modulus by zero")
    return UInt(a % b)


def _ts_plus_duration(a: Any, b: Any) -> Timestamp:
    return timestamp_from_nanos(timestamp_nanos(a) + duration_nanos(b))


def _duration_plus_ts(a: Any, b: Any) -> Timestamp:
    return timestamp_from_nanos(duration_nanos(a) + timestamp_nanos(b))


def _ts_minus_duration(a: Any, b: Any) -> Timestamp:
    return timestamp_from_nanos(timestamp_nanos(a) - duration_nanos(b))


def _ts_minus_ts(a: Any, b: Any) -> Duration:
    return duration_from_nanos(timestamp_nanos(a) - timestamp_nanos(b))


def _dur_plus(a: Any, b: Any) -> Duration:
    return duration_from_nanos(duration_nanos(a) + duration_nanos(b))


def _dur_minus(a: Any, b: Any) -> Duration:
    return duration_from_nanos(duration_nanos(a) - duration_nanos(b))


_ARITHMETIC_BY_KIND: dict[str, dict[tuple[str, str], BinaryOp]] = {
    "+": {
        ("int", "int"): _int_add,
        ("uint", "uint"): _uint_add,
        ("double", "double"): operator.add,
        ("string", "string"): _sequence_concat,
        ("bytes", "bytes"): _sequence_concat,
        ("list", "list"): _list_concat,
        ("timestamp", "duration"): _ts_plus_duration,
        ("duration", "timestamp"): _duration_plus_ts,
        ("duration", "duration"): _dur_plus,
    },
    "-": {
        ("int", "int"): _int_sub,
        ("uint", "uint"): _uint_sub,
        ("double", "double"): operator.sub,
        ("timestamp", "timestamp"): _ts_minus_ts,
        ("timestamp", "duration"): _ts_minus_duration,
        ("duration", "duration"): _dur_minus,
    },
    "*": {
        ("int", "int"): _int_mul,
        ("uint", "uint"): _uint_mul,
        ("double", "double"): operator.mul,
    },
    "/": {("int", "int"): _int_div, ("uint", "uint"): _uint_div, ("double", "double"): _double_div},
    "%": {("int", "int"): _int_mod, ("uint", "uint"): _uint_mod},
}


def _by_python_types(table: dict[tuple[str, str], BinaryOp]) -> dict[tuple[type, type], BinaryOp]:
    return {
        (ta, tb): impl
        for (ka, kb), impl in table.items()
        for ta in _TYPES_BY_KIND[ka]
        for tb in _TYPES_BY_KIND[kb]
    }


def _make_arithmetic(symbol: str) -> BinaryOp:
    """A binary arithmetic operator dispatching on the operands' kinds."""
    by_kind = _ARITHMETIC_BY_KIND[symbol]
    by_type = _by_python_types(by_kind)

    def arithmetic(a: Any, b: Any) -> Any:
        impl = by_type.get((type(a), type(b)))
        if impl is None:
            impl = by_kind.get((kind_of(a), kind_of(b)))
            if impl is None:
                raise no_overload(symbol, a, b)
        return impl(a, b)

    return arithmetic


ARITHMETIC: dict[str, BinaryOp] = {symbol: _make_arithmetic(symbol) for symbol in "+-*/%"}

#: Every binary (non-logical) operator, by its CEL symbol.
BINARY_OPERATORS: dict[str, BinaryOp] = {
    **ARITHMETIC,
    **ORDERING,
    "==": cel_equals,
    "!=": cel_not_equals,
    "in": cel_in,
}


def negate(value: Any) -> Any:
    """Unary ``-``: int (with overflow check) or double."""
    kind = kind_of(value)
    if kind == "int":
        return _int64(-value, "-")
    if kind == "double":
        return -value
    raise no_overload("-_", value)


def logical_not(value: Any) -> bool:
    """Unary ``!``: requires a bool."""
    if value is True:
        return False
    if value is False:
        return True
    raise no_overload("!_", value)


def as_utc(value: datetime) -> datetime:
    """Timestamps are expected timezone-aware; a naive one is read as UTC, not local time."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
