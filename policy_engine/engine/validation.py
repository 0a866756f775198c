"""Request validation: every field bounded and well-formed before any policy sees it."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policy_engine.config import RequestLimits
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Layer, Reason
from policy_engine.domain.request import CheckRequest, SubjectKind

ORGANIZATION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
# Printable, no whitespace, no control characters (IdP IDs look like "auth0|123", emails, UUIDs).
IDENTIFIER_PATTERN = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]+")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
SCOPE_PATTERN = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")
MAX_ACCESS_TOKEN_LENGTH = 16 * 1024
# A dotted-quad IPv4 address that `ipaddress.ip_address` accepts: four ASCII decimal octets of
# 0 to 255 without leading zeros (what it accepts since Python 3.9.5; a test checks every
# octet string of up to 3 digits against it). A match is accepted at once, at a fraction of
# ip_address's cost; anything else (IPv6, zone IDs, every malformed text) is left to it, so
# the set of addresses accepted is exactly ip_address's.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


def _check_identifier(
    violations: list[FieldViolation],
    field: str,
    value: str,
    max_length: int,
    pattern: re.Pattern[str] = IDENTIFIER_PATTERN,
    required: bool = True,
) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(field, "must not be empty"))
        return
    if len(value) > max_length:
        violations.append(FieldViolation(field, f"must be at most {max_length} characters"))
    elif not (
        # Printable ASCII but the space (0x21-0x7E) is all in IDENTIFIER_PATTERN's set: the
        # common case, decided without the regex engine (the other patterns are narrower).
        # Only for a str itself: a subclass may override isprintable or `in` (the regex reads
        # its characters), and anything else is refused by the regex as it always was.
        pattern is IDENTIFIER_PATTERN
        and type(value) is str
        and value.isascii()
        and value.isprintable()
        and " " not in value
    ) and not pattern.fullmatch(value):
        violations.append(FieldViolation(field, f"contains characters not allowed in {field}"))


class _Violation(Exception):
    """Raised deep inside an attribute walk; the path is assembled only on the way out."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.path: list[str] = []


class _AttributeChecker:
    """Bounds one attribute map: entries, depth, string lengths and total size.

    Recursion is safe: a container deeper than the limit is refused before it is entered.
    Paths are only built for the one violation reported, keeping the common case cheap.
    """

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits

    def check(self, field: str, attributes: Mapping[str, Any]) -> FieldViolation | None:
        try:
            size = self._walk(attributes, 1)
        except _Violation as violation:
            return FieldViolation(field + "".join(reversed(violation.path)), violation.description)
        if size > self.limits.max_attribute_bytes:
            return FieldViolation(field, f"larger than {self.limits.max_attribute_bytes} bytes")
        return None

    def _walk(self, value: Any, depth: int) -> int:
        kind = type(value)
        if kind is str:
            if len(value) > self.limits.max_string_length:
                raise _Violation(f"longer than {self.limits.max_string_length} characters")
            return len(value)
        if kind is bool or kind is int or value is None:
            return 8
        if kind is float:
            if not math.isfinite(value):
                raise _Violation("must be a finite number")
            return 8
        mapping = kind is dict or isinstance(value, Mapping)  # (an ABC check costs more)
        if mapping or kind is list or isinstance(value, list | tuple):
            limits = self.limits
            if depth > limits.max_attribute_depth:
                raise _Violation(f"nested deeper than {limits.max_attribute_depth} levels")
            if len(value) > limits.max_attributes:
                raise _Violation(f"has more than {limits.max_attributes} entries")
            longest, most = limits.max_string_length, limits.max_attribute_bytes
            size = 0
            items = value.items() if mapping else enumerate(value)
            for key, item in items:
                if mapping:
                    if type(key) is not str or not key:
                        raise _Violation("keys must be non-empty strings")
                    size += len(key)
                # A string, the most common value, is sized here: as `_walk` sizes it.
                if type(item) is str and len(item) <= longest:
                    size += len(item)
                else:
                    try:
                        size += self._walk(item, depth + 1)
                    except _Violation as violation:
                        violation.path.append(f".{key}" if mapping else f"[{key}]")
                        raise
                if size > most:
                    raise _Violation(f"larger than {most} bytes")
            return size
        raise _Violation(f"unsupported value type {kind.__name__}")


def session_id_valid(session_id: str, limits: RequestLimits) -> bool:
    """Whether `validate_request` accepts `session_id` as `context.session_id` (the same
    check: empty, or at most `limits.max_id_length` printable characters without spaces)."""
    violations: list[FieldViolation] = []
    _check_identifier(
        violations, "context.session_id", session_id, limits.max_id_length, required=False
    )
    return not violations


def validate_request(request: CheckRequest, limits: RequestLimits) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    ids = limits.max_id_length
    _check_identifier(violations, "organization", request.organization, ids, ORGANIZATION_PATTERN)
    _check_identifier(violations, "subject.id", request.subject.id, ids)
    if request.subject.namespace and request.subject.kind is not SubjectKind.EXTERNAL_USER:
        violations.append(
            FieldViolation("subject.namespace", "is only for subjects of kind external_user")
        )
    else:
        _check_identifier(
            violations, "subject.namespace", request.subject.namespace, ids, required=False
        )
    _check_identifier(violations, "application.id", request.application.id, ids)
    _check_identifier(violations, "integration.id", request.integration.id, ids)
    _check_identifier(violations, "scope", request.scope, limits.max_scope_length, SCOPE_PATTERN)
    _check_identifier(
        violations, "context.session_id", request.context.session_id, ids, required=False
    )
    _check_identifier(violations, "request_id", request.request_id, ids, required=False)
    if len(request.subject.access_token) > MAX_ACCESS_TOKEN_LENGTH:
        violations.append(
            FieldViolation(
                "subject.access_token", f"longer than {MAX_ACCESS_TOKEN_LENGTH} characters"
            )
        )
    client_ip = request.context.client_ip
    # Only a str itself takes the shortcut: `ip_address` also accepts an int, bytes or an
    # address object from a library caller, and reads a str subclass through its methods.
    if client_ip and not (type(client_ip) is str and _IPV4.fullmatch(client_ip)):
        try:
            ipaddress.ip_address(client_ip)
        except ValueError:
            violations.append(FieldViolation("context.client_ip", "is not an IP address"))
    checker = _AttributeChecker(limits)
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


def validation_reasons(violations: list[FieldViolation]) -> tuple[Reason, ...]:
    return tuple(
        Reason(
            code=ErrorCode.VALIDATION_ERROR,
            layer=Layer.SYSTEM,
            policy="request-validation",
            rule=violation.field,
            message=f"{violation.field} {violation.description}",
            field=violation.field,
        )
        for violation in violations
    )


def is_validation_failure(decision: Decision) -> bool:
    return any(reason.code is ErrorCode.VALIDATION_ERROR for reason in decision.reasons)
