"""Checking the subject's access token (a JWT) before any policy sees the request.

With the organization's token settings (issuer, audience, keys), the token is fully verified:
signature (RS256, ES256, EdDSA, ...) with a key whose JWK allows it (see `keys`), `exp`/`nbf`/
`iat` with a small leeway, issuer, audience, and that it belongs to the subject. Without them,
only structure and time are checked: such a token can only ever deny, and its claims are never
shown to policies.

Claims are read strictly, whatever the mode, before anything uses them: the payload must be
I-JSON (RFC 7493: no NaN or Infinity, no repeated member names, no unpaired surrogates,
integers within 64 bits, finite numbers), nested at most `MAX_CLAIM_DEPTH` levels; NumericDate
claims (`exp`, `nbf`, `iat`, RFC 7519 section 2) are numbers from 0 to 9999-12-31T00:00:00Z;
`iss`, `sub` and `jti` are strings and `aud` a string or an array of strings (RFC 7519 section
4.1); `act` (RFC 8693 section 4.1), when present, is an object whose nested `act` is one too,
at most `MAX_ACTORS` deep. A token that breaks any of these is refused with a reason naming the
claim and what is wrong with it, so no claim value can make the time arithmetic, a cache
expiry, a CEL condition or an answer's encoding fail later.

A verified token must be for this PDP: its `iss` must be the organization's `issuer` and its
`aud` hold the organization's `audience` (RFC 9068 section 4, RFC 8725 section 3.9). Rules
with keys but no issuer or no audience verify nothing: every token is refused (the loader
demands both, so only a hand-built `TokenRules` can lack one; a blank one counts as none).
With an `organization_claim`, that claim must be the organization's name, so that
organizations trusting one issuer and one audience do not accept each other's tokens.

A verified token is bound to its application: the claim the organization names
(`application_claim`: `client_id`, RFC 9068 section 2.2, by default; or `azp`, OpenID Connect
Core section 2) must be the presenting application's ID. For an external user ("userId
mode"), the token's `sub` must be the person the organization's identity mapping maps the
external ID to, and the `external_subject_claim`, when set, the external ID itself.

Reasons say what failed; they never contain key material or the token.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from policy_engine.auth.keys import KeySource, supported_algorithms
from policy_engine.domain.request import SubjectKind
from policy_engine.strict_json import DuplicateKeyError, unique_keys

if TYPE_CHECKING:
    from jwt.api_jws import PyJWS
    from jwt.types import SigOptions

DEFAULT_LEEWAY_SECONDS = 30
DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
MAX_CLAIM_DEPTH = 32  # objects and arrays inside the claims set, counting the set itself
# NumericDate bounds: 1970-01-01 to 9999-12-31T00:00:00Z, so that adding or subtracting any
# accepted leeway (at most 300 s) still gives an instant a datetime can hold.
MIN_NUMERIC_DATE = 0
MAX_NUMERIC_DATE = 253_402_214_400
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
# RFC 8693 section 4.1 delegation chains deeper than this are refused as malformed: a real
# chain of agents acting for agents is a few links long.
MAX_ACTORS = 8
# What `tokens.application_claim` may name: the claim carrying the application a token was
# issued to (RFC 9068 section 2.2; OpenID Connect Core 1.0 section 2), or no binding.
APPLICATION_CLAIMS: tuple[str, ...] = ("client_id", "azp", "none")
DEFAULT_APPLICATION_CLAIM = "client_id"
_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})
_NO_ACTORS: tuple[Mapping[str, Any], ...] = ()
_JWS: PyJWS | None = None  # see _jws()
_NO_SIGNATURE: SigOptions = {"verify_signature": False}


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
    # The claim naming the application a token was issued to, which must be the one that
    # presents it; None: tokens are not bound to applications (`application_claim: none`).
    application_claim: str | None = DEFAULT_APPLICATION_CLAIM
    # The claim binding a token to its organization (`tokens.organization_claim`), whose value
    # must be `organization`; None: tokens are not bound to an organization.
    organization_claim: str | None = None
    organization: str = ""


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
    # The verified delegation chain (RFC 8693 `act`), current actor first, each without its
    # nested `act`: CEL's subject.actors. Empty unless the signature was verified.
    actors: tuple[Mapping[str, Any], ...] = _NO_ACTORS
    # The `KeySource.fingerprint` of the keys that verified the token (read before verifying);
    # b"" unless the signature was verified. The audit record keeps it for `pdp replay`.
    key_set: bytes = b""


def _malformed(problem: str) -> TokenCheck:
    return TokenCheck(f"the access token is malformed: {problem}", None)


def _shown(value: Any, limit: int = 40) -> str:
    """A value from the token, short enough for a reason."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- reading the claims set -------------------------------------------------------------------


class _NonFinite:
    """Stands for NaN, Infinity or -Infinity, which JSON has no notation for (RFC 8259 s. 6)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _HugeInteger:
    """An integer literal too long for Python to convert (more than 4300 digits)."""

    __slots__ = ()


def _integer(text: str) -> int | _HugeInteger:
    try:
        return int(text)
    except ValueError:
        return _HugeInteger()


def _claim_name(path: tuple[str | int, ...]) -> str:
    """`path` as written in reasons: 'address.country', 'groups[3]'."""
    text = str(path[0])
    for step in path[1:]:
        text += f"[{step}]" if isinstance(step, int) else f".{step}"
    return _shown(text, 60)


def _is_unicode(text: str) -> bool:
    """False for a string with an unpaired surrogate, which JSON escapes can make (RFC 7493
    section 2.1) but UTF-8, and so protobuf and the audit log, cannot carry."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _value_problem(value: Any, path: tuple[str | int, ...]) -> str | None:
    """What makes `value` (at `path` in the claims set) unacceptable, or None."""
    kind = type(value)
    if kind is str:
        if _is_unicode(value):
            return None
        return f"claim {_claim_name(path)} holds an unpaired surrogate (RFC 7493 section 2.1)"
    if kind is bool or value is None:
        return None
    if kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return None
        return f"claim {_claim_name(path)} is an integer outside the 64-bit range"
    if kind is float:
        if math.isfinite(value):
            return None
        return f"claim {_claim_name(path)} is a number too large to represent"
    if kind is _NonFinite:
        return f"claim {_claim_name(path)} is {value.text}, which is not a JSON number"
    if kind is _HugeInteger:
        return f"claim {_claim_name(path)} is an integer with too many digits"
    if len(path) >= MAX_CLAIM_DEPTH:
        return f"claim {_claim_name(path)} is nested more than {MAX_CLAIM_DEPTH} levels deep"
    items = value.items() if kind is dict else enumerate(value)
    for key, item in items:
        if type(key) is str and not _is_unicode(key):  # a member name (not a list index)
            return f"a member name in claim {_claim_name(path)} holds an unpaired surrogate"
        problem = _value_problem(item, (*path, key))
        if problem is not None:
            return problem
    return None


def parse_claims(payload: bytes) -> dict[str, Any]:
    """The claims set of a JWS payload, read as I-JSON (RFC 7493, RFC 7519 section 7.2 step 10).

    Raises ValueError naming the claim and what is wrong with it (see the module docstring).
    """
    try:
        claims = json.loads(
            payload,
            parse_constant=_NonFinite,
            parse_int=_integer,
            object_pairs_hook=unique_keys,
        )
    except DuplicateKeyError as exc:
        # RFC 7519 section 4: a claims set with duplicate names must be rejected (or last-wins);
        # rejecting means no two parsers can read different claims out of one token.
        raise ValueError(f"the member name {_shown(exc.key)} appears more than once") from None
    except RecursionError:
        raise ValueError(
            f"the claims set is nested more than {MAX_CLAIM_DEPTH} levels deep"
        ) from None
    except ValueError:
        raise ValueError("the claims set is not JSON") from None
    if not isinstance(claims, dict):
        raise ValueError("the claims set is not a JSON object")
    for name, value in claims.items():
        if not _is_unicode(name):
            raise ValueError("a claim name holds an unpaired surrogate (RFC 7493 section 2.1)")
        problem = _value_problem(value, (name,))
        if problem is not None:
            raise ValueError(problem)
    for name in ("iss", "sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise ValueError(f"claim {name!r} is not a string (RFC 7519 section 4.1)")
    audience = claims.get("aud", "")
    if not isinstance(audience, str) and not (
        isinstance(audience, list) and all(isinstance(a, str) for a in audience)
    ):
        raise ValueError("claim 'aud' is not a string or an array of strings (RFC 7519 4.1.3)")
    actor_chain(claims)  # a malformed `act` refuses the token in both modes
    return claims


def actor_chain(claims: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
    """The delegation chain of RFC 8693 section 4.1: the outermost `act` (the current actor)
    first, then each prior actor from its nested `act`, each as its claims without `act`.
    Empty without `act`. Raises ValueError naming the claim (`act`, `act.act`, ...) when one
    is not a JSON object or the chain is longer than MAX_ACTORS."""
    actors: list[Mapping[str, Any]] = []
    current: Any = claims
    name = "act"
    while "act" in current:
        actor = current["act"]
        if not isinstance(actor, dict):
            raise ValueError(f"claim {name!r} is not a JSON object (RFC 8693 section 4.1)")
        if len(actors) == MAX_ACTORS:
            raise ValueError(
                f"claim {_shown(name, 60)} nests more than {MAX_ACTORS} actors (RFC 8693 4.1)"
            )
        actors.append(MappingProxyType({k: v for k, v in actor.items() if k != "act"}))
        current, name = actor, f"{name}.act"
    return tuple(actors)


# -- time -------------------------------------------------------------------------------------


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"claim {name!r} is not a number (RFC 7519 section 2, NumericDate)")
    if not MIN_NUMERIC_DATE <= value <= MAX_NUMERIC_DATE:
        raise ValueError(
            f"claim {name!r} is out of range (a NumericDate from {MIN_NUMERIC_DATE} "
            f"to {MAX_NUMERIC_DATE})"
        )
    return float(value)


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _time_check(claims: Mapping[str, Any], now: datetime, leeway: int) -> TokenCheck:
    try:
        expires = _numeric_date(claims, "exp")
        not_before = _numeric_date(claims, "nbf")
        issued_at = _numeric_date(claims, "iat")
    except ValueError as exc:
        return _malformed(str(exc))
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


def _jws() -> PyJWS:
    """PyJWT's JWS decoder, imported with the first token: PyJWT imports cryptography (~8 MB of
    RSS, ~25 ms once), which a server whose requests carry no token never needs."""
    global _JWS
    if _JWS is None:
        from jwt.api_jws import PyJWS

        _JWS = PyJWS()  # a race builds two equal, stateless decoders: harmless
    return _JWS


@functools.cache
def warm_imports() -> None:
    """Import PyJWT and cryptography and build the decoder now (~50 ms, once per process).

    The policy loader calls it, off the event loop, for every organization with `tokens:`, so
    the first token a server verifies does not stall the loop (and every other caller) with
    those imports."""
    _jws()
    supported_algorithms()


# -- signature --------------------------------------------------------------------------------


def _verified_payload(
    token: str, rules: TokenRules, keys: KeySource, now: datetime
) -> bytes | TokenCheck:
    """The signed payload, or what is wrong with the signature side of the token."""
    import jwt  # already loaded once any key set exists (keys.py); a dict lookup then

    decoder = _jws()
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return TokenCheck("the access token is malformed (not a JWT)", None)
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in rules.algorithms:
        return TokenCheck(f"the access token's algorithm {_shown(algorithm)} is not accepted", None)
    kid = header.get("kid")  # a string when present (PyJWT refuses any other kid)
    candidates = keys.keys_for(kid, algorithm)
    if not candidates and not keys.available:
        # The JWKS URL's first fetch has not landed (or keeps failing): deny, never cached.
        return TokenCheck(
            "the access token cannot be verified: the organization's signing keys are not "
            f"available yet (unknown key, kid {_shown(kid)}, alg {algorithm!r})",
            now,
        )
    if not candidates:
        # A key refresh may make it known any moment: this verdict must not be cached.
        return TokenCheck(
            f"the access token is signed with an unknown key (kid {_shown(kid)}, "
            f"alg {algorithm!r})",
            now,
        )
    for key in candidates:  # several only when a JWKS lists more than one key for this kid
        try:
            return decoder.decode_complete(token, key, algorithms=[algorithm])["payload"]
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError:
            return TokenCheck(
                "the access token is malformed or its key does not fit its algorithm", None
            )
    return TokenCheck("the access token has a bad signature", None)


def _audience_matches(claim: Any, audience: str) -> bool:
    if isinstance(claim, str):
        return claim == audience
    return isinstance(claim, list) and audience in claim


def _subject_problem(
    claims: Mapping[str, Any],
    subject_id: str,
    kind: SubjectKind,
    rules: TokenRules,
    external_id: str,
) -> str | None:
    """For a user, `sub` must be `subject_id`; for an external user, `subject_id` is the
    person the identity mapping maps `external_id` to: `sub` must be that person, and the
    `external_subject_claim`, when the organization names one, the external ID."""
    if kind is SubjectKind.EXTERNAL_USER:
        name = rules.external_subject_claim
        if name is not None:
            if name in claims and not isinstance(claims[name], str):
                return f"the access token is malformed: claim {name!r} is not a string"
            if claims.get(name) != external_id:
                return f"the access token's '{name}' claim does not match the external user ID"
        if claims.get("sub") != subject_id:
            return (
                "the access token's subject ('sub') is not the person the external user ID maps to"
            )
        return None
    if claims.get("sub") != subject_id:
        return "the access token's subject ('sub') does not match the subject"
    return None


def _application_problem(
    claims: Mapping[str, Any], application_id: str, rules: TokenRules
) -> str | None:
    """The token must have been issued to the presenting application (RFC 9068 section 2.2
    `client_id`, or OIDC `azp`): a token leaked to, or shared with, another application is
    refused. The reason names the application the token belongs to, quoted and cut short."""
    name = rules.application_claim
    if name is None:
        return None
    if name not in claims:
        return (
            f"the access token does not say which application it was issued to (no {name!r} "
            f"claim), and organization tokens are bound to their application"
        )
    holder = claims[name]
    if not isinstance(holder, str):
        return f"the access token is malformed: claim {name!r} is not a string"
    if not application_id or holder != application_id:
        return (
            f"the access token was issued to application {_shown(holder, 80)}, "
            f"not to {_shown(application_id, 80)} ({name!r} claim)"
        )
    return None


def _organization_problem(claims: Mapping[str, Any], rules: TokenRules) -> str | None:
    """With an `organization_claim`, the token must name this organization in it: two
    organizations that trust one issuer for one audience then refuse each other's tokens.
    The reason names the claim and the organization, never the token's value."""
    name = rules.organization_claim
    if name is None:
        return None
    if name not in claims:
        return (
            f"the access token does not say which organization it was issued for (no "
            f"{_shown(name, 80)} claim), and organization {rules.organization!r} binds its "
            "tokens to it"
        )
    if not rules.organization or claims[name] != rules.organization:
        return (
            f"the access token's {_shown(name, 80)} claim does not name organization "
            f"{rules.organization!r}"
        )
    return None


def check_token(
    token: str,
    now: datetime,
    rules: TokenRules = UNVERIFIED,
    subject_id: str = "",
    kind: SubjectKind = SubjectKind.USER,
    *,
    application_id: str,
    external_id: str = "",
) -> TokenCheck:
    """What `token` means for a decision at `now` under the organization's `rules`, presented
    by application `application_id` for `subject_id` (for an external user: the person
    `external_id` maps to).

    Never raises: every problem, including any malformed claim value, is a `TokenCheck` whose
    `problem` names the cause (the engine answers it with kontext_authorization_required).
    """
    if rules.keys is None:
        decoder = _jws()  # imports jwt
        import jwt

        try:
            payload = decoder.decode_complete(token, options=_NO_SIGNATURE)["payload"]
        except jwt.PyJWTError:
            return TokenCheck("the access token is malformed (not a JWT)", None)
        key_set = b""
    else:
        key_set = rules.keys.fingerprint  # before verifying, as the decision cache reads it
        verified = _verified_payload(token, rules, rules.keys, now)
        if isinstance(verified, TokenCheck):
            return verified
        payload = verified
    try:
        claims = parse_claims(payload)
    except ValueError as exc:
        return _malformed(str(exc))
    timing = _time_check(claims, now, rules.leeway_seconds)
    if rules.keys is None or timing.problem is not None:
        return timing  # unverified claims are never exposed
    issuer, audience = rules.issuer or "", rules.audience or ""
    if not issuer.strip() or not audience.strip():
        # Checking no issuer or no audience would accept a token the same keys signed for
        # another tenant or service (RFC 9068 section 4, RFC 8725 section 3.9): refuse. A
        # blank one (`pdp eval --audience ""`) names none either: a token whose claim is
        # blank too is not for this PDP.
        missing = "issuer" if not issuer.strip() else "audience"
        return TokenCheck(
            "the access token cannot be accepted: the organization's token settings name no "
            f"{missing} (RFC 9068 section 4)",
            None,
        )
    if claims.get("iss") != issuer:
        return TokenCheck("the access token is from the wrong issuer", None)
    if not _audience_matches(claims.get("aud"), audience):
        return TokenCheck("the access token is for the wrong audience", None)
    problem = (
        _subject_problem(claims, subject_id, kind, rules, external_id)
        or _application_problem(claims, application_id, rules)
        or _organization_problem(claims, rules)
    )
    if problem is not None:
        return TokenCheck(problem, None)
    return TokenCheck(
        None, timing.changes_at, MappingProxyType(claims), actor_chain(claims), key_set
    )
