"""Structural and time checks of a subject's access token.

These checks can only ever deny: an unverified token never grants anything and its claims are
not shown to policies. Signature, issuer and audience verification against the organization's
keys (JWKS) build on this.
"""

from __future__ import annotations

from datetime import datetime
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


def token_problem(token: str, now: datetime, leeway: int = DEFAULT_LEEWAY_SECONDS) -> str | None:
    """None when the token is a well-formed JWT inside its validity window; else what is wrong."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return "the access token is malformed (not a JWT)"
    try:
        expires = _numeric_claim(claims, "exp")
        not_before = _numeric_claim(claims, "nbf")
        issued_at = _numeric_claim(claims, "iat")
    except ValueError as exc:
        return f"the access token is malformed: {exc}"
    current = now.timestamp()
    if expires is None:
        return "the access token has no expiry ('exp')"
    if current > expires + leeway:
        return "the access token has expired"
    if not_before is not None and current + leeway < not_before:
        return "the access token is not valid yet ('nbf' is in the future)"
    if issued_at is not None and current + leeway < issued_at:
        return "the access token was issued in the future ('iat')"
    return None
