"""Checking the subject's access token (a JWT) before any policy sees the request.

With the organization's token settings (issuer, audience, keys), the token is fully verified:
signature (RS256, ES256, EdDSA), `exp`/`nbf`/`iat` with a small leeway, issuer, audience, and
that it belongs to the subject. Without them, only structure and time are checked: such a
token can only ever deny, and its claims are never shown to policies.

Reasons say what failed; they never contain key material or the token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import jwt

from policy_engine.auth.keys import KeySource
from policy_engine.domain.request import SubjectKind

DEFAULT_LEEWAY_SECONDS = 30
DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TokenRules:
    """An organization's token settings (`tokens:` in its Organization document)."""

    keys: KeySource | None = None  # None: tokens are checked for structure and time only
    issuer: str | None = None
    audience: str | None = None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS
    required: bool = False  # a request without a token is refused
    # For external user IDs ("userId mode"): the claim that carries the external ID.
    external_subject_claim: str | None = None


UNVERIFIED = TokenRules()


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """What the token says about this decision: a problem, and until when the verdict holds."""

    problem: str | None
    # The instant the verdict may flip (expiry for a valid token, `nbf` for a premature one);
    # None when it never will (malformed, already expired). Caches must not outlive it.
    changes_at: datetime | None
    # Verified claims, shown to CEL as subject.claims; empty unless the signature was verified.
    claims: Mapping[str, Any] = field(default_factory=lambda: _NO_CLAIMS)


def _numeric_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"claim '{name}' is not a number")
    return float(value)


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _time_check(claims: Mapping[str, Any], now: datetime, leeway: int) -> TokenCheck:
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


_SKIP_CLAIM_CHECKS = {
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
}


def _verified_claims(
    token: str, rules: TokenRules, keys: KeySource, now: datetime
) -> dict[str, Any] | TokenCheck:
    """The signed claims, or what is wrong with the signature side of the token."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return TokenCheck("the access token is malformed (not a JWT)", None)
    algorithm = header.get("alg")
    if algorithm not in rules.algorithms:
        return TokenCheck(f"the access token's algorithm {algorithm!r} is not accepted", None)
    kid = header.get("kid")
    key = keys.key_for(kid if isinstance(kid, str) else None)
    if key is None:
        # A key refresh may make it known any moment: this verdict must not be cached.
        return TokenCheck(f"the access token is signed with an unknown key (kid {kid!r})", now)
    try:
        return jwt.decode(token, key, algorithms=[algorithm], options=_SKIP_CLAIM_CHECKS)
    except jwt.InvalidSignatureError:
        return TokenCheck("the access token has a bad signature", None)
    except jwt.PyJWTError:
        return TokenCheck(
            "the access token is malformed or its key does not fit its algorithm", None
        )


def _audience_matches(claim: Any, audience: str) -> bool:
    if isinstance(claim, str):
        return claim == audience
    return isinstance(claim, list) and audience in claim


def _subject_problem(
    claims: Mapping[str, Any], subject_id: str, kind: SubjectKind, rules: TokenRules
) -> str | None:
    if kind is SubjectKind.EXTERNAL_USER:
        if rules.external_subject_claim is None:
            return (
                "external user IDs need an identity mapping "
                "(tokens.external_subject_claim) for this organization"
            )
        if claims.get(rules.external_subject_claim) != subject_id:
            return (
                f"the access token's '{rules.external_subject_claim}' claim does not match "
                "the subject"
            )
        return None
    if claims.get("sub") != subject_id:
        return "the access token's subject ('sub') does not match the subject"
    return None


def check_token(
    token: str,
    now: datetime,
    rules: TokenRules = UNVERIFIED,
    subject_id: str = "",
    kind: SubjectKind = SubjectKind.USER,
) -> TokenCheck:
    if rules.keys is None:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return TokenCheck("the access token is malformed (not a JWT)", None)
        return _time_check(claims, now, rules.leeway_seconds)  # never exposes unverified claims
    verified = _verified_claims(token, rules, rules.keys, now)
    if isinstance(verified, TokenCheck):
        return verified
    timing = _time_check(verified, now, rules.leeway_seconds)
    if timing.problem is not None:
        return timing
    if rules.issuer is not None and verified.get("iss") != rules.issuer:
        return TokenCheck("the access token is from the wrong issuer", None)
    if rules.audience is not None and not _audience_matches(verified.get("aud"), rules.audience):
        return TokenCheck("the access token is for the wrong audience", None)
    problem = _subject_problem(verified, subject_id, kind, rules)
    if problem is not None:
        return TokenCheck(problem, None)
    return TokenCheck(None, timing.changes_at, MappingProxyType(verified))
