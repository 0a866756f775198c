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
from policy_engine.domain.request import CheckRequest

ORGANIZATION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
# Printable, no whitespace, no control characters (IdP IDs look like "auth0|123", emails, UUIDs).
IDENTIFIER_PATTERN = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]+")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
SCOPE_PATTERN = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")
MAX_ACCESS_TOKEN_LENGTH = 16 * 1024


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
    elif not pattern.fullmatch(value):
        violations.append(FieldViolation(field, f"contains characters not allowed in {field}"))


class _AttributeChecker:
    """Walks one attribute map iteratively, so no nesting can exhaust the stack."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits

    def check(self, field: str, attributes: Mapping[str, Any]) -> FieldViolation | None:
        limits = self.limits
        size = 0
        stack: list[tuple[str, Any, int]] = [(field, attributes, 1)]
        while stack:
            path, value, depth = stack.pop()
            if isinstance(value, Mapping | list | tuple):
                if depth > limits.max_attribute_depth:
                    return FieldViolation(path, f"nested deeper than {limits.max_attribute_depth}")
                if len(value) > limits.max_attributes:
                    return FieldViolation(path, f"more than {limits.max_attributes} entries")
                if isinstance(value, Mapping):
                    for key, item in value.items():
                        if not isinstance(key, str) or not key:
                            return FieldViolation(path, "keys must be non-empty strings")
                        size += len(key)
                        stack.append((f"{path}.{key}", item, depth + 1))
                else:
                    stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value))
            elif isinstance(value, str):
                if len(value) > limits.max_string_length:
                    return FieldViolation(path, f"longer than {limits.max_string_length} chars")
                size += len(value)
            elif isinstance(value, float):
                if not math.isfinite(value):
                    return FieldViolation(path, "must be a finite number")
                size += 8
            elif value is None or isinstance(value, bool | int):
                size += 8
            else:
                return FieldViolation(path, f"unsupported value type {type(value).__name__}")
            if size > limits.max_attribute_bytes:
                return FieldViolation(field, f"larger than {limits.max_attribute_bytes} bytes")
        return None


def validate_request(request: CheckRequest, limits: RequestLimits) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    ids = limits.max_id_length
    _check_identifier(violations, "organization", request.organization, ids, ORGANIZATION_PATTERN)
    _check_identifier(violations, "subject.id", request.subject.id, ids)
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
    if request.context.client_ip:
        try:
            ipaddress.ip_address(request.context.client_ip)
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
