"""Who may ask the PDP at all: TLS, mutual TLS, and bearer JWTs in call metadata.

Mutual TLS is enforced by the handshake itself (a client without a certificate signed by the
configured CA cannot connect, so under mutual TLS probes use `health_address`, a plaintext port
serving only health). A bearer token is checked per call by an interceptor; the health service
is exempt, so load balancers and probes can reach it without credentials. A call that fails
gets UNAUTHENTICATED and no decision.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from policy_engine.auth.keys import StaticKeySet
from policy_engine.auth.tokens import DEFAULT_ALGORITHMS
from policy_engine.config import (
    CallerAuthSettings,
    ConfigError,
    TlsSettings,
    caller_auth_problems,
)

log = logging.getLogger(__name__)

BEARER_PREFIX = "bearer "
_EXEMPT_PREFIXES = (f"/{health.SERVICE_NAME}/", "/grpc.reflection.")
_VERIFIED_CACHE_SIZE = 1024


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from exc


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """None for plaintext; TLS with a certificate; mutual TLS when a client CA is set."""
    if not tls.cert_file and not tls.key_file:
        if tls.client_ca_file:
            raise ConfigError("tls.client_ca_file needs tls.cert_file and tls.key_file")
        return None
    if not (tls.cert_file and tls.key_file):
        raise ConfigError("TLS needs both tls.cert_file and tls.key_file")
    pair = (_read(tls.key_file, "tls.key_file"), _read(tls.cert_file, "tls.cert_file"))
    client_ca = _read(tls.client_ca_file, "tls.client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _refuse_caller_auth_problems(settings: CallerAuthSettings) -> None:
    """Raises ConfigError with one `setting caller_auth.<field>: ...` line per problem
    `caller_auth_problems` finds in `settings` (as the settings loader words them)."""
    problems = caller_auth_problems(settings)
    if problems:
        raise ConfigError("\n".join(f"setting {name}: {what}" for name, what in problems))


def _audience_issuer_problem(claims: dict[str, Any], audience: str, issuer: str) -> str | None:
    """Why a verified caller token is not for this PDP, or None: its `iss` must be exactly
    `issuer` (RFC 7519 section 4.1.1, a case-sensitive string) and its `aud` exactly
    `audience` or an array of strings holding it (RFC 7519 section 4.1.3). `exp`, `nbf` and
    `iat` must be JSON numbers (RFC 7519 section 2, NumericDate): PyJWT reads a string
    through int(), so "99999999999" was a valid expiry, remembered until the year 5138."""
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"invalid bearer token: claim {name!r} is not a number (RFC 7519 section 2)"
    if claims.get("iss") != issuer:
        return "invalid bearer token: InvalidIssuerError"
    aud = claims.get("aud")
    if aud == audience or (
        isinstance(aud, list) and all(isinstance(a, str) for a in aud) and audience in aud
    ):
        return None
    return "invalid bearer token: InvalidAudienceError"


class BearerVerifier:
    """Verifies callers' JWTs; a verified token is remembered until it expires (an LRU), so the
    signature is checked once per token, not once per call."""

    def __init__(self, settings: CallerAuthSettings) -> None:
        """Raises ConfigError naming the setting when `audience` or `issuer` is empty (the
        settings loader refuses that too: this guards any other way of building one), or
        the JWKS file cannot be read."""
        _refuse_caller_auth_problems(settings)
        self._keys = StaticKeySet.from_file(Path(settings.jwks_file))
        self._audience = settings.audience
        self._issuer = settings.issuer
        self._verified: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def problem(self, authorization: str | None) -> str | None:
        # Imported here: a server without caller auth never loads PyJWT and cryptography
        # (~8 MB of RSS); with it, StaticKeySet has imported it already (a dict lookup).
        import jwt

        if not authorization or not authorization.lower().startswith(BEARER_PREFIX):
            return "missing bearer token"
        token = authorization[len(BEARER_PREFIX) :].strip()
        with self._lock:
            expires = self._verified.get(token)
            if expires is not None and expires > time.time():
                self._verified.move_to_end(token)
                return None
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if not isinstance(algorithm, str) or algorithm not in DEFAULT_ALGORITHMS:
                return "bearer token algorithm not accepted"
            # Only keys whose JWK allows this algorithm for signatures (see auth.keys).
            keys = self._keys.keys_for(header.get("kid"), algorithm)
            if not keys:
                return "bearer token signed with an unknown key"
            for index, key in enumerate(keys):  # several only when a kid has several keys
                try:
                    claims = jwt.decode(
                        token,
                        key,
                        algorithms=[algorithm],
                        audience=self._audience,
                        issuer=self._issuer,
                        # RFC 8725 section 3.9: `aud` and `iss` are always checked.
                        options={"require": ["exp", "aud", "iss"]},
                    )
                    break
                except jwt.InvalidSignatureError:
                    if index == len(keys) - 1:
                        raise
            # Compared here too, exactly: PyJWT 2.10.0 matched `iss` as a substring of the
            # configured issuer (CVE-2024-53861), so another tenant of the same IdP whose
            # issuer is a prefix of ours authenticated as the broker; no PyJWT release the
            # dependency range admits may decide this alone.
            problem = _audience_issuer_problem(claims, self._audience, self._issuer)
            if problem is not None:
                return problem
            expires = float(claims["exp"])
        except (jwt.PyJWTError, ArithmeticError, ValueError, TypeError) as exc:
            # PyJWT accepts any integer exp; a 400-digit one overflows float().
            return f"invalid bearer token: {type(exc).__name__}"
        with self._lock:
            self._verified[token] = expires
            while len(self._verified) > _VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return None


class CallerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection without a valid bearer token.

    Runs on the server's event loop: checking a token is CPU work (a signature, once per token
    thanks to the verifier's memory), never a wait."""

    def __init__(self, verifier: BearerVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT_PREFIXES):
            return handler
        authorization = next(
            (
                value
                for key, value in handler_call_details.invocation_metadata or ()
                if key == "authorization"
            ),
            None,
        )
        problem = self._verifier.problem(authorization if isinstance(authorization, str) else None)
        if problem is None:
            return handler
        log.info("refused %s: %s", method, problem)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return grpc.unary_unary_rpc_method_handler(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def interceptors(settings: CallerAuthSettings) -> list[grpc.aio.ServerInterceptor]:
    """The caller-auth interceptor, or none when `jwks_file` is empty. Raises ConfigError
    naming each setting `caller_auth_problems` finds, whichever way `settings` were built: an
    audience or issuer without keys means bearer tokens were meant to be checked, and a
    server started without the interceptor would answer every caller."""
    _refuse_caller_auth_problems(settings)
    return [CallerAuthInterceptor(BearerVerifier(settings))] if settings.jwks_file else []
