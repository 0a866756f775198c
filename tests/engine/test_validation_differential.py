"""Validation against the implementation before its fast paths (commit acf4f3e, copied here as
the oracle): every request, built of hostile values, gets the same violations, or the same
exception type, from both. `decide()` is public, so a library caller's values count too:
str subclasses (whose methods may lie), address objects, ints and bytes."""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.config import RequestLimits
from policy_engine.domain.decision import Effect
from policy_engine.domain.request import CheckRequest, SubjectKind
from policy_engine.engine import decide
from policy_engine.engine.validation import validate_request
from policy_engine.policy import CompiledPolicySet, load_policy_set
from tests.policy_builder import request
from tests.scenarios import EXAMPLE_POLICIES

LIMITS = RequestLimits()
BASE = request("repo", application="pr-reviewer", groups=["engineering"])
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@functools.cache
def _policies() -> CompiledPolicySet:
    return load_policy_set(EXAMPLE_POLICIES)


# ---- The oracle: acf4f3e's policy_engine/engine/validation.py, as it was. ----------------------

_ORGANIZATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_IDENTIFIER = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]+")
_SCOPE = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")
_MAX_ACCESS_TOKEN_LENGTH = 16 * 1024


def _old_identifier(
    violations: list[tuple[str, str]],
    field: str,
    value: Any,
    max_length: int,
    pattern: re.Pattern[str] = _IDENTIFIER,
    required: bool = True,
) -> None:
    if not value:
        if required:
            violations.append((field, "must not be empty"))
        return
    if len(value) > max_length:
        violations.append((field, f"must be at most {max_length} characters"))
    elif not pattern.fullmatch(value):
        violations.append((field, f"contains characters not allowed in {field}"))


class _OldViolation(Exception):
    def __init__(self, description: str) -> None:
        self.description = description
        self.path: list[str] = []


class _OldChecker:
    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits

    def check(self, field: str, attributes: Mapping[str, Any]) -> tuple[str, str] | None:
        try:
            size = self._walk(attributes, 1)
        except _OldViolation as violation:
            return field + "".join(reversed(violation.path)), violation.description
        if size > self.limits.max_attribute_bytes:
            return field, f"larger than {self.limits.max_attribute_bytes} bytes"
        return None

    def _walk(self, value: Any, depth: int) -> int:
        kind = type(value)
        if kind is str:
            if len(value) > self.limits.max_string_length:
                raise _OldViolation(f"longer than {self.limits.max_string_length} characters")
            return len(value)
        if kind is bool or kind is int or value is None:
            return 8
        if kind is float:
            if not math.isfinite(value):
                raise _OldViolation("must be a finite number")
            return 8
        if isinstance(value, Mapping | list | tuple):
            if depth > self.limits.max_attribute_depth:
                raise _OldViolation(f"nested deeper than {self.limits.max_attribute_depth} levels")
            if len(value) > self.limits.max_attributes:
                raise _OldViolation(f"has more than {self.limits.max_attributes} entries")
            size = 0
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in items:
                if isinstance(value, Mapping):
                    if type(key) is not str or not key:
                        raise _OldViolation("keys must be non-empty strings")
                    size += len(key)
                try:
                    size += self._walk(item, depth + 1)
                except _OldViolation as violation:
                    violation.path.append(f".{key}" if isinstance(value, Mapping) else f"[{key}]")
                    raise
                if size > self.limits.max_attribute_bytes:
                    raise _OldViolation(f"larger than {self.limits.max_attribute_bytes} bytes")
            return size
        raise _OldViolation(f"unsupported value type {kind.__name__}")


def _old_validate(request: CheckRequest, limits: RequestLimits) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []
    ids = limits.max_id_length
    _old_identifier(violations, "organization", request.organization, ids, _ORGANIZATION)
    _old_identifier(violations, "subject.id", request.subject.id, ids)
    if request.subject.namespace and request.subject.kind is not SubjectKind.EXTERNAL_USER:
        violations.append(("subject.namespace", "is only for subjects of kind external_user"))
    else:
        _old_identifier(
            violations, "subject.namespace", request.subject.namespace, ids, required=False
        )
    _old_identifier(violations, "application.id", request.application.id, ids)
    _old_identifier(violations, "integration.id", request.integration.id, ids)
    _old_identifier(violations, "scope", request.scope, limits.max_scope_length, _SCOPE)
    _old_identifier(
        violations, "context.session_id", request.context.session_id, ids, required=False
    )
    _old_identifier(violations, "request_id", request.request_id, ids, required=False)
    if len(request.subject.access_token) > _MAX_ACCESS_TOKEN_LENGTH:
        violations.append(
            ("subject.access_token", f"longer than {_MAX_ACCESS_TOKEN_LENGTH} characters")
        )
    if request.context.client_ip:
        try:
            ipaddress.ip_address(request.context.client_ip)
        except ValueError:
            violations.append(("context.client_ip", "is not an IP address"))
    checker = _OldChecker(limits)
    for field, attributes in (
        ("subject.attributes", request.subject.attributes),
        ("application.attributes", request.application.attributes),
        ("integration.attributes", request.integration.attributes),
        ("context.attributes", request.context.attributes),
    ):
        if attributes:
            violation = checker.check(field, attributes)
            if violation is not None:
                violations.append(violation)
    return violations


# ---- Comparing. ----------------------------------------------------------------------------------


def _outcome(validate: Any, checked: CheckRequest, limits: RequestLimits) -> object:
    try:
        return [(v[0], v[1]) if isinstance(v, tuple) else (v.field, v.description)
                for v in validate(checked, limits)]  # fmt: skip
    except Exception as error:  # the type is what is compared
        return type(error).__name__


def _same(checked: CheckRequest, limits: RequestLimits = LIMITS) -> None:
    assert _outcome(validate_request, checked, limits) == _outcome(
        _old_validate, checked, limits
    ), checked


# Values whose methods lie: a str subclass is still a str to the regex engine (it reads the
# characters), but `isprintable`, `isascii`, `in` or `split` answer what the class says.
class _Printable(str):
    def isprintable(self) -> bool:
        return True


class _Ascii(str):
    def isascii(self) -> bool:
        return True


class _NoSpace(str):
    def __contains__(self, item: object) -> bool:
        return False


class _Short(str):
    def __len__(self) -> int:
        return 1


class _Digits(str):
    def split(self, *args: Any, **kwargs: Any) -> list[str]:
        return ["1", "2", "3", "4"]


class _Dict(dict[Any, Any]):
    pass


class _List(list[Any]):
    pass


class _Str(str):
    pass


class _Int(int):
    pass


SUBCLASSES = [_Printable, _Ascii, _NoSpace, _Short, _Digits, _Str]

SPECIAL = [
    "\x7f", "\x80", "\x9f", "\xa0", "\u2028", "\u2029", "\u200b", "\u200d", "\ufeff", "\u3000",
    "\u0301", "\ud800", "\udc80", "\U0001f680", " ", "\t", "\n", "\x00", "\x1f", "|", "@", "é",
    "\u0663", "\uff11", "\x85", "\x1c",
]  # fmt: skip
_IDENT_TEXT = st.text(
    st.one_of(st.sampled_from(SPECIAL), st.characters(min_codepoint=0x20, max_codepoint=0x7E)),
    max_size=8,
)


@st.composite
def identifiers(draw: st.DrawFn) -> Any:
    text = draw(_IDENT_TEXT)
    if draw(st.booleans()):
        # At, just under and just over the length limit.
        pad = LIMITS.max_id_length - len(text) + draw(st.integers(-1, 1))
        text = "a" * max(pad, 0) + text
    kind = draw(st.sampled_from([str, str, str, *SUBCLASSES]))
    return kind(text)


_OCTETS = st.one_of(
    st.integers(0, 300).map(str),
    st.sampled_from(["00", "01", "010", "0255", "1_0", "+1", "-1", "0x1", "1e1", "", "\u0661",
                     "\uff11", "1 ", " 1", "1\n", "२५५"]),
)  # fmt: skip


@st.composite
def client_ips(draw: st.DrawFn) -> Any:
    shape = draw(st.integers(0, 3))
    if shape == 0:
        text = ".".join(draw(st.lists(_OCTETS, min_size=3, max_size=5)))
    elif shape == 1:
        text = draw(st.text(st.sampled_from("0123456789.....:%af \n\u0663x/[]"), max_size=20))
    elif shape == 2:
        text = draw(st.sampled_from(["::1", "fe80::1%eth0", "::ffff:1.2.3.4", "1.2.3.4%x"]))
    else:
        return draw(
            st.sampled_from(
                [
                    ipaddress.ip_address("1.2.3.4"),
                    ipaddress.ip_address("::1"),
                    16909060,
                    0,
                    b"\x01\x02\x03\x04",
                    b"1.2.3.4",
                    b"\x00" * 16,
                    1.5,
                ]
            )
        )
    kind = draw(st.sampled_from([str, str, str, *SUBCLASSES]))
    return kind(text)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(
        ["x" * LIMITS.max_string_length, "x" * (LIMITS.max_string_length + 1), "", b"b"]
    ),
    st.builds(_Int, st.integers(-5, 5)),
    st.builds(_Str, st.text(max_size=4)),
    st.builds(_Short, st.just("x" * (LIMITS.max_string_length + 1))),
)
_KEYS = st.one_of(st.text(max_size=4), st.builds(_Str, st.text(min_size=1, max_size=3)), st.just(1))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.dictionaries(_KEYS, inner, max_size=4),
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_KEYS, inner, max_size=3).map(_Dict),
        st.lists(inner, max_size=3).map(_List),
    ),
    max_leaves=20,
)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for index in range(depth):
        value = {"n": value} if index % 2 else [value]
    return value


@st.composite
def attribute_maps(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        depth = LIMITS.max_attribute_depth + draw(st.integers(-2, 1))
        return {"deep": _nested(depth - 1, draw(_SCALARS))}
    return draw(st.dictionaries(_KEYS, _VALUES, max_size=5))


@st.composite
def requests(draw: st.DrawFn) -> CheckRequest:
    checked = BASE
    if draw(st.booleans()):
        checked = replace(checked, organization=draw(identifiers()))
    subject = replace(
        checked.subject,
        id=draw(identifiers()),
        attributes=draw(attribute_maps()),
    )
    context = replace(
        checked.context,
        client_ip=draw(client_ips()),
        session_id=draw(identifiers()),
        attributes=draw(attribute_maps()),
    )
    return replace(
        checked,
        subject=subject,
        application=replace(checked.application, id=draw(identifiers())),
        scope=draw(identifiers()),
        request_id=draw(identifiers()),
        context=context,
    )


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests())
def test_validation_is_the_old_validation(checked: CheckRequest) -> None:
    _same(checked)


LYING = [
    ("subject.id", _Printable("al\x07ice")),
    ("subject.id", _Printable("al\x7fice")),
    ("subject.id", _NoSpace("al ice")),
    ("subject.id", _Ascii("al\u00a0ice")),
    ("context.session_id", _Printable("s\x00")),
    ("request_id", _NoSpace("a b")),
]


@pytest.mark.parametrize(("field", "value"), LYING, ids=[repr(v) for _, v in LYING])
def test_a_str_subclass_that_lies_is_still_refused(field: str, value: str) -> None:
    """A str subclass whose `isprintable` or `in` lies took the printable-ASCII shortcut
    (commit 8ae300f): control characters and spaces in an ID were accepted, and `decide`
    went on to the policies (an allow here) where it had denied the request as invalid."""
    if field == "subject.id":
        checked = replace(BASE, subject=replace(BASE.subject, id=value))
    elif field == "context.session_id":
        checked = replace(BASE, context=replace(BASE.context, session_id=value))
    else:
        checked = replace(BASE, request_id=value)
    _same(checked)
    assert field in {violation.field for violation in validate_request(checked, LIMITS)}
    decision = decide(_policies(), checked, now=NOW, limits=LIMITS)
    assert decision.effect is Effect.DENY
    assert [reason.field for reason in decision.reasons] == [field]


ADDRESSES: list[Any] = [
    ipaddress.ip_address("1.2.3.4"),
    ipaddress.ip_address("2001:db8::1"),
    16909060,
    b"\x01\x02\x03\x04",
    _Digits("x.y.z.w"),
    _Str("1.2.3.4"),
    _Str("01.2.3.4"),
]


@pytest.mark.parametrize("value", ADDRESSES, ids=repr)
def test_a_client_ip_that_is_not_a_plain_str_is_judged_as_before(value: Any) -> None:
    """The dotted-quad shortcut raised TypeError (a traceback out of `decide`) for what
    `ipaddress.ip_address` accepts besides text: an address object, an int, packed bytes."""
    checked = replace(BASE, context=replace(BASE.context, client_ip=value))
    _same(checked)
    decide(_policies(), checked, now=NOW, limits=LIMITS)
