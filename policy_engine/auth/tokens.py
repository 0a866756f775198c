"""Structural and time checks of a subject's access token.

These checks can only ever deny: an unverified token never grants anything and its claims are
not shown to policies. Signature, issuer and audience verification against the organization's
keys (JWKS) build on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

DEFAULT_LEEWAY_SECONDS = 30


def _numeric_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"claim '{name}' is not a number")
    return float(value)


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """What the token says about this decision: a problem, and until when the verdict holds."""

    problem: str | None
    # The instant the verdict may flip (expiry for a valid token, `nbf` for a premature one);
    # None when it never will (malformed, already expired). Caches must not outlive it.
    changes_at: datetime | None


def check_token(token: str, now: datetime, leeway: int = DEFAULT_LEEWAY_SECONDS) -> TokenCheck:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return TokenCheck("the access token is malformed (not a JWT)", None)
    try:
        expires = _numeric_claim(claims, "exp")
        not_before = _numeric_claim(claims, "nbf")
        issued_at = _numeric_claim(claims, "iat")
    except ValueError as exc:
        return TokenCheck(f"the access token is malformed: {exc}", None)
    current = now.timestamp()
    if expires is None:
        return TokenCheck("the access token has no expiry ('exp')", None)
    if current > expires + leeway:
        return TokenCheck("the access token has expired", None)
    if not_before is not None and current + leeway < not_before:
        return TokenCheck(
            "the access token is not valid yet ('nbf' is in the future)",
            _instant(not_before - leeway),
        )
    if issued_at is not None and current + leeway < issued_at:
        return TokenCheck(
            "the access token was issued in the future ('iat')", _instant(issued_at - leeway)
        )
    return TokenCheck(None, _instant(expires + leeway))


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
