"""What the PDP answers: an effect, the reasons behind a deny, and optionally how it got there."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from policy_engine.domain.codes import ErrorCode


class Effect(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class Layer(StrEnum):
    SYSTEM = "system"  # built-in checks that no policy can switch off
    ORG = "org"
    USER = "user"
    APPLICATION = "application"


POLICY_LAYERS: tuple[Layer, ...] = (Layer.ORG, Layer.USER, Layer.APPLICATION)


class RuleResult(StrEnum):
    MATCHED = "matched"
    NOT_MATCHED = "not_matched"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reason:
    code: ErrorCode
    layer: Layer
    policy: str
    rule: str
    message: str
    field: str = ""  # the offending request field, for validation errors
    # For kontext_rate_limited from a quota: milliseconds until it frees (0: not said).
    retry_after_ms: int = 0

    @property
    def http_status(self) -> int:
        return self.code.http_status


def reason_to_dict(reason: Reason) -> dict[str, Any]:
    """A reason as JSON-ready data (`field` only when set), for the CLI and the audit log."""
    data: dict[str, Any] = {
        "code": reason.code.value,
        "http_status": reason.http_status,
        "layer": reason.layer.value,
        "policy": reason.policy,
        "rule": reason.rule,
        "message": reason.message,
    }
    if reason.field:
        data["field"] = reason.field
    return data


@dataclass(frozen=True, slots=True)
class RuleTrace:
    policy: str
    rule: str
    effect: Effect
    result: RuleResult
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """A rule whose condition held: what the audit log records as having decided."""

    layer: Layer
    policy: str
    rule: str
    effect: Effect


@dataclass(frozen=True, slots=True)
class LayerTrace:
    layer: Layer
    effect: Effect
    by_default: bool
    rules: tuple[RuleTrace, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    effect: Effect
    reasons: tuple[Reason, ...]
    revision: str
    trace: tuple[LayerTrace, ...] = ()
    # The rules that matched (for an allow: the allow rule of each layer that had one).
    matched_rules: tuple[RuleMatch, ...] = ()
    # True when a condition read the clock: the decision may change with no input changing.
    time_dependent: bool = False
    # The instant the decision may flip because of the clock alone (a subject token expiring
    # or becoming valid); a cached copy must not outlive it.
    valid_until: datetime | None = None
    # False when a policy opted out of caching, or for validation failures.
    cacheable: bool = True
    # For an external user ID: the person (IdP user ID) it maps to, whom the policies decided
    # for; "" for other kinds or when the ID could not be mapped.
    mapped_subject_id: str = ""
    # The fingerprint (`KeySource.fingerprint`, 32 bytes) of the key set that verified the
    # subject token; b"" when no token was verified. Audit records keep it for `pdp replay`.
    token_key_set: bytes = b""

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW
