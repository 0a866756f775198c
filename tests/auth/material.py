"""Real key material made in the tests: key pairs, JWKS documents and signed tokens."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from jwt.utils import base64url_encode

ISSUER = "https://idp.acme.test"
AUDIENCE = "kontext-broker"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        codec = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[self.algorithm]
        jwk = json.loads(codec.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def sign(self, **claims: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.algorithm, headers={"kid": self.kid})


def rsa_key(kid: str = "rsa-1") -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str = "ec-1") -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def ed_key(kid: str = "ed-1") -> SigningKey:
    return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def jwks(*keys: SigningKey) -> str:
    return json.dumps({"keys": [key.public_jwk() for key in keys]})


def claims(
    subject: str = "alice", *, lifetime: int = 600, client_id: str = "app", **extra: Any
) -> dict[str, Any]:
    """A token's claims for `subject`, issued to application `client_id` (RFC 9068 section
    2.2: the application tokens are bound to; "app" is tests.policy_builder's default)."""
    now = int(time.time())
    return {
        "sub": subject,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + lifetime,
        "client_id": client_id,
        **extra,
    }


def raw_token(payload: str | bytes, key: SigningKey | None = None) -> str:
    """A JWS whose payload is exactly `payload`: JSON that `jwt.encode` would never write (NaN,
    1e400, 400-digit integers, repeated names). Signed with `key`, or unsigned (alg none)."""
    data = payload.encode() if isinstance(payload, str) else payload
    header = {"alg": key.algorithm, "kid": key.kid} if key else {"alg": "none"}
    signing_input = base64url_encode(json.dumps(header).encode()) + b"." + base64url_encode(data)
    signature = (
        get_default_algorithms()[key.algorithm].sign(signing_input, key.private) if key else b""
    )
    return (signing_input + b"." + base64url_encode(signature)).decode()
