"""CEL's static types, as the compiler infers them to check an expression at load.

A :class:`CelT` is a type: a kind (``int``, ``list``, ``map``, ``dyn``, ...) and its
parameters (``list(string)`` is ``CelT("list", (STRING,))``). ``dyn`` is any value: a check
never refuses an operand of type dyn, it leaves the call to fail closed at evaluation (the
PDP's attributes are maps of dyn). A map with ``fields`` is a declared variable whose field
names and types are known (``subject.id`` is a string); for overloads it is a
``map(string, dyn)``.

Overloads are signatures over these types with type parameters (``$A``), resolved as cel-go
and the C++ checker do: an argument of type dyn matches any parameter, a parameter binds to
the first type it meets and must then meet an equal one (``[1] + ["a"]`` has no overload),
and a call whose argument types match several overloads gets their common result type, or
dyn.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BOOL",
    "BYTES",
    "DOUBLE",
    "DURATION",
    "DYN",
    "INT",
    "NULL",
    "STRING",
    "TIMESTAMP",
    "TYPE",
    "UINT",
    "CelT",
    "Signature",
    "join",
    "list_of",
    "map_of",
    "optional_of",
    "param",
    "record",
    "resolve",
]


@dataclass(frozen=True, slots=True)
class CelT:
    """A static CEL type. ``kind`` starting with ``$`` is a type parameter of a signature."""

    kind: str
    params: tuple[CelT, ...] = ()
    #: Known field names and types of a declared variable (a map with fixed keys), or None.
    fields: tuple[tuple[str, CelT], ...] | None = None
    # Computed once: types are compared and hashed on every node a compile builds.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.kind, self.params, self.fields)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not CelT:
            return NotImplemented
        return (
            self._hash == other._hash
            and self.kind == other.kind
            and self.params == other.params
            and self.fields == other.fields
        )

    def __str__(self) -> str:
        if self.kind == "list":
            return f"list({self.params[0]})"
        if self.kind == "map":
            return f"map({self.params[0]}, {self.params[1]})"
        if self.kind == "optional_type":
            return f"optional_type({self.params[0]})"
        return self.kind.lstrip("$")

    def field(self, name: str) -> CelT | None:
        """The type of a known field, or None."""
        for field_name, field_type in self.fields or ():
            if field_name == name:
                return field_type
        return None


DYN = CelT("dyn")
INT = CelT("int")
UINT = CelT("uint")
DOUBLE = CelT("double")
BOOL = CelT("bool")
STRING = CelT("string")
BYTES = CelT("bytes")
NULL = CelT("null_type")
TIMESTAMP = CelT("google.protobuf.Timestamp")
DURATION = CelT("google.protobuf.Duration")
TYPE = CelT("type")


def list_of(element: CelT) -> CelT:
    return CelT("list", (element,))


def map_of(key: CelT, value: CelT) -> CelT:
    return CelT("map", (key, value))


def optional_of(value: CelT) -> CelT:
    return CelT("optional_type", (value,))


def param(name: str) -> CelT:
    """A type parameter of a signature (``param("A")``)."""
    return CelT(f"${name}")


def record(**fields: CelT) -> CelT:
    """A declared map variable with known fields (``record(id=STRING)``): selecting another
    field is refused at load, and each field has its type."""
    return CelT("map", (STRING, DYN), tuple(sorted(fields.items())))


# Timestamps and durations are protobuf messages (well-known types) to the CEL checkers,
# and null is assignable to a message type (the comparison or call then fails at run time).
_NULLABLE = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})

#: An overload: argument types (a method's receiver first) and the result type.
Signature = tuple[tuple[CelT, ...], CelT]

_Bindings = dict[str, CelT]


def _bound(t: CelT, bindings: _Bindings) -> CelT:
    while t.kind.startswith("$") and t.kind in bindings:
        t = bindings[t.kind]
    return t


def _unify(want: CelT, got: CelT, bindings: _Bindings) -> bool:
    """Whether ``got`` fits ``want``, binding ``want``'s parameters (in ``bindings``)."""
    if want.kind.startswith("$"):
        bound = bindings.get(want.kind)
        if bound is None:
            if want != got:
                bindings[want.kind] = got
            return True
        if not _unify(bound, got, bindings):
            return False
        # A parameter met as int then as dyn is dyn: the value may be anything.
        bindings[want.kind] = _most_general(
            _substitute(bound, bindings), _substitute(got, bindings)
        )
        return True
    got = _bound(got, bindings)
    if got.kind.startswith("$"):
        bindings[got.kind] = want
        return True
    if want.kind == "dyn" or got.kind == "dyn":
        return True
    if (got.kind == "null_type" and want.kind in _NULLABLE) or (
        want.kind == "null_type" and got.kind in _NULLABLE
    ):
        return True
    if want.kind != got.kind or len(want.params) != len(got.params):
        return False
    return all(_unify(w, g, bindings) for w, g in zip(want.params, got.params, strict=True))


def _substitute(t: CelT, bindings: _Bindings) -> CelT:
    t = _bound(t, bindings)
    if t.kind.startswith("$"):
        return DYN
    if not t.params:
        return t
    return CelT(t.kind, tuple(_substitute(p, bindings) for p in t.params), t.fields)


def _most_general(a: CelT, b: CelT) -> CelT:
    """The more general of two unifiable types (dyn wins, parameter by parameter)."""
    if a == b:
        return a
    if a.kind == "dyn" or b.kind == "dyn":
        return DYN
    if a.kind == b.kind and len(a.params) == len(b.params):
        pairs = zip(a.params, b.params, strict=True)
        return CelT(a.kind, tuple(_most_general(x, y) for x, y in pairs))
    return DYN


def _fresh(signature: Signature, tag: int) -> Signature:
    """The signature with its parameters renamed apart from the argument types'."""
    names: dict[str, CelT] = {}

    def rename(t: CelT) -> CelT:
        if t.kind.startswith("$"):
            return names.setdefault(t.kind, CelT(f"{t.kind}#{tag}"))
        if not t.params:
            return t
        return CelT(t.kind, tuple(rename(p) for p in t.params), t.fields)

    arguments, result = signature
    return tuple(rename(a) for a in arguments), rename(result)


def join(types: Iterable[CelT]) -> CelT | None:
    """The common type of several values (a list literal's elements, a ternary's branches),
    or None when two of them cannot be the same type."""
    bindings: _Bindings = {}
    out: CelT | None = None
    for t in types:
        if out is None:
            out = t
            continue
        if not _unify(out, t, bindings):
            return None
        out = _most_general(_substitute(out, bindings), _substitute(t, bindings))
    return out


# resolve()'s answers by (id of the signatures, argument types): the signatures are the
# long-lived tables of the operators and functions, and a policy set asks the same few
# questions thousands of times. Bounded; cleared when full.
_RESOLVED: dict[tuple[int, tuple[CelT, ...]], tuple[Sequence[Signature], CelT | None]] = {}
_MAX_RESOLVED = 4096


def resolve(signatures: Sequence[Signature], arguments: Sequence[CelT]) -> CelT | None:
    """The result type of a call with ``arguments``: the common result of every overload
    they fit (dyn if those differ), or None when none fits (the checker's refusal)."""
    key = (id(signatures), tuple(arguments))
    known = _RESOLVED.get(key)
    if known is not None and known[0] is signatures:
        return known[1]
    found = _resolve(signatures, key[1])
    if len(_RESOLVED) >= _MAX_RESOLVED:
        _RESOLVED.clear()
    _RESOLVED[key] = (signatures, found)  # holding the signatures keeps their id unique
    return found


def _resolve(signatures: Sequence[Signature], arguments: Sequence[CelT]) -> CelT | None:
    results: list[CelT] = []
    for tag, signature in enumerate(signatures):
        wanted, result = _fresh(signature, tag)
        if len(wanted) != len(arguments):
            continue
        bindings: _Bindings = {}
        if all(_unify(w, a, bindings) for w, a in zip(wanted, arguments, strict=True)):
            results.append(_substitute(result, bindings))
    if not results:
        return None
    first = results[0]
    return first if all(r == first for r in results) else DYN


def elements(t: CelT) -> CelT:
    """What a comprehension over a value of type ``t`` ranges over: a list's elements, a
    map's keys; dyn otherwise."""
    if t.kind in ("list", "map"):
        return t.params[0]
    return DYN


def of_declaration(types: Mapping[str, CelT], name: str) -> CelT:
    return types.get(name, DYN)
