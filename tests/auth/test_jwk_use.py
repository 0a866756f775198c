"""Keys verify tokens only as their JWK says (RFC 7517 sections 4.2-4.5, RFC 7518 sections 3.1
and 6, RFC 8037): one test per rule, with real keys, real signatures and real JWKS files."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from policy_engine.auth.keys import KeySetError, StaticKeySet, parse_jwks
from policy_engine.auth.tokens import TokenRules, check_token
from policy_engine.config import CallerAuthSettings
from policy_engine.domain.decision import Effect
from policy_engine.engine import decide
from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.server.security import BearerVerifier
from tests.auth.material import AUDIENCE, ISSUER, SigningKey, claims, ec_key, ed_key, rsa_key
from tests.auth.test_tokens import TOKENS, org_with_tokens, with_token

RSA, EC, ED = rsa_key("rsa-1"), ec_key("ec-1"), ed_key("ed-1")
ALGORITHMS = ("RS256", "RS384", "PS256", "ES256", "ES384", "EdDSA")


def document(*jwks: dict[str, Any]) -> str:
    return json.dumps({"keys": list(jwks)})


def jwk(key: SigningKey, **changes: Any) -> dict[str, Any]:
    """The key's public JWK with members changed; a member set to None is removed."""
    data = {**key.public_jwk(), **changes}
    return {name: value for name, value in data.items() if value is not None}


def verdict(token: str, *jwks: dict[str, Any], subject: str = "alice") -> str | None:
    rules = TokenRules(
        keys=StaticKeySet(parse_jwks(document(*jwks))),
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=ALGORITHMS,
    )
    return check_token(token, datetime.now(UTC), rules, subject, application_id="app").problem


def sign(key: SigningKey, algorithm: str | None = None, kid: str | None = "same") -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(), key.private, algorithm=algorithm or key.algorithm, headers=headers)


# -- use (RFC 7517 section 4.2) ---------------------------------------------------------------


def test_an_encryption_key_never_verifies_a_signature() -> None:
    """Issue 9, finding 6: a token signed with a key published for encryption is denied."""
    enc = rsa_key("enc-1")
    token = enc.sign(**claims())
    problem = verdict(token, jwk(enc, use="enc"), jwk(EC))
    assert problem is not None and "unknown key" in problem
    keys = parse_jwks(document(jwk(enc, use="enc"), jwk(EC)))
    assert [(s.kid, s.reason) for s in keys.skipped] == [
        ("enc-1", "'use' is 'enc', not 'sig' (RFC 7517 section 4.2)")
    ]


def test_a_key_without_use_verifies() -> None:
    assert verdict(RSA.sign(**claims()), jwk(RSA, use=None)) is None


def test_use_sig_verifies() -> None:
    assert verdict(RSA.sign(**claims()), jwk(RSA, use="sig")) is None


# -- key_ops (RFC 7517 section 4.3) -----------------------------------------------------------


def test_key_ops_without_verify_never_verify() -> None:
    token = RSA.sign(**claims())
    problem = verdict(token, jwk(RSA, use=None, key_ops=["encrypt", "wrapKey"]), jwk(EC))
    assert problem is not None and "unknown key" in problem
    (skipped,) = parse_jwks(document(jwk(RSA, key_ops=["sign"]), jwk(EC))).skipped
    assert "'key_ops' does not contain 'verify'" in skipped.reason


def test_key_ops_with_verify_verifies() -> None:
    assert verdict(RSA.sign(**claims()), jwk(RSA, use=None, key_ops=["verify"])) is None


def test_key_ops_that_is_not_an_array_of_strings_is_skipped() -> None:
    (skipped,) = parse_jwks(document(jwk(RSA, key_ops="verify"), jwk(EC))).skipped
    assert "not an array of strings" in skipped.reason


# -- alg (RFC 7517 section 4.4) ---------------------------------------------------------------


def test_a_key_with_alg_verifies_only_that_algorithm() -> None:
    # The same RSA key may sign RS256 and RS384; its JWK says RS384 only.
    token = sign(RSA, "RS256", kid="rsa-1")
    problem = verdict(token, jwk(RSA, alg="RS384"))
    assert problem is not None and "unknown key" in problem and "RS256" in problem
    assert verdict(sign(RSA, "RS384", kid="rsa-1"), jwk(RSA, alg="RS384")) is None


def test_a_key_without_alg_verifies_what_its_kty_allows() -> None:
    assert verdict(sign(RSA, "PS256", kid="rsa-1"), jwk(RSA, alg=None)) is None
    assert verdict(sign(RSA, "RS384", kid="rsa-1"), jwk(RSA, alg=None)) is None


def test_an_alg_that_does_not_fit_the_kty_is_skipped() -> None:
    (skipped,) = parse_jwks(document(jwk(EC, alg="RS256"), jwk(RSA))).skipped
    assert skipped.kid == "ec-1"
    assert "'alg' 'RS256' does not fit kty 'EC'" in skipped.reason


# -- kty and crv (RFC 7518 sections 3.1 and 6.1, RFC 8037) -----------------------------------


def test_the_kty_must_fit_the_tokens_algorithm() -> None:
    """An EC key (no alg) under the token's kid is never tried for an RS256 token."""
    token = sign(RSA, "RS256", kid="ec-1")
    problem = verdict(token, jwk(EC, alg=None))
    assert problem is not None and "unknown key" in problem


def test_the_curve_must_fit_the_algorithm() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    data = {**json.loads(ECAlgorithm.to_jwk(p384.public_key())), "kid": "p384", "alg": "ES256"}
    (skipped,) = parse_jwks(document(data, jwk(RSA))).skipped
    assert "does not fit kty 'EC'" in skipped.reason
    token = jwt.encode(claims(), p384, algorithm="ES384", headers={"kid": "p384"})
    assert verdict(token, jwk(EC), data) is not None  # skipped: it verifies nothing
    assert verdict(token, {k: v for k, v in data.items() if k != "alg"}) is None  # ES384 only


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kty": "oct", "k": "c2VjcmV0"}, "symmetric key"),
        ({"kty": "XYZ"}, "unsupported kty 'XYZ'"),
        ({"kty": None}, "unsupported kty None"),
        ({"crv": "P-999"}, "unsupported curve 'P-999'"),
        ({"x": "!!!"}, "invalid key material"),
        ({"kid": 7}, "'kid' is not a string"),
    ],
    ids=["oct", "unknown kty", "no kty", "unknown curve", "bad material", "kid not a string"],
)
def test_keys_that_can_never_verify_are_skipped_with_a_reason(
    changes: dict[str, Any], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        keys = parse_jwks(document(jwk(EC, alg=None, **changes), jwk(RSA)), source="jwks.json")
    (skipped,) = keys.skipped
    assert skipped.position == 0 and reason in skipped.reason, skipped.reason
    assert f"jwks.json: {skipped}; skipped" in caplog.text
    assert verdict(RSA.sign(**claims()), jwk(EC, alg=None, **changes), jwk(RSA)) is None


def test_a_private_key_is_skipped_not_a_crash() -> None:
    private = json.loads(RSAAlgorithm.to_jwk(RSA.private))
    private.pop("key_ops", None)  # as an IdP that leaks its signing key might publish it
    entry = {**private, "kid": "rsa-1", "use": "sig"}
    (skipped,) = parse_jwks(document(entry, jwk(EC))).skipped
    assert "private key members" in skipped.reason
    problem = verdict(RSA.sign(**claims()), entry, jwk(EC))
    assert problem is not None and "unknown key" in problem


# -- several keys under one kid (RFC 7517 section 4.5) ---------------------------------------


def test_one_kid_with_several_keys_selects_by_algorithm_and_key_type() -> None:
    jwks = (jwk(RSA, kid="same"), jwk(EC, kid="same"), jwk(ED, kid="same"))
    for key in (RSA, EC, ED):
        assert verdict(sign(key), *jwks) is None, key.algorithm


def test_one_kid_with_two_keys_of_one_type_tries_both() -> None:
    other = rsa_key("other")
    jwks = (jwk(RSA, kid="same"), jwk(other, kid="same"))
    assert verdict(sign(RSA), *jwks) is None
    assert verdict(sign(other), *jwks) is None
    problem = verdict(sign(rsa_key("stranger")), *jwks)
    assert problem is not None and "bad signature" in problem


def test_a_token_without_kid_uses_the_one_key_that_fits() -> None:
    enc = rsa_key("enc-1")
    assert verdict(sign(RSA, kid=None), jwk(RSA), jwk(enc, use="enc")) is None
    problem = verdict(sign(RSA, kid=None), jwk(RSA), jwk(rsa_key("rsa-2")))
    assert problem is not None and "unknown key" in problem  # ambiguous: two RSA keys


# -- a set with nothing usable ----------------------------------------------------------------


def test_a_jwks_without_any_usable_key_is_refused_with_the_reasons() -> None:
    with pytest.raises(KeySetError) as error:
        parse_jwks(document(jwk(RSA, use="enc"), jwk(EC, key_ops=["encrypt"])))
    assert "no usable signature key" in str(error.value)
    assert "'use' is 'enc'" in str(error.value) and "key_ops" in str(error.value)


@pytest.mark.parametrize(
    "text",
    ["[]", '{"keys": {}}', '{"keys": []}', "[" * 100_000, "not json"],
    ids=["array", "keys not an array", "no keys", "deep", "not json"],
)
def test_a_document_that_is_no_jwks_is_refused(text: str) -> None:
    with pytest.raises(KeySetError, match="invalid JWKS"):
        parse_jwks(text)


def test_an_organization_whose_jwks_has_only_an_encryption_key_does_not_load(
    tmp_path: Path,
) -> None:
    root = org_with_tokens(tmp_path, TOKENS)
    (root / "acme" / "jwks.json").write_text(document(jwk(RSA, use="enc")))
    with pytest.raises(PolicyLoadError) as error:
        load_policy_set(root)
    assert "no usable signature key" in str(error.value)


def test_through_the_engine_an_encryption_key_token_is_denied(tmp_path: Path) -> None:
    enc = rsa_key("enc-1")
    root = org_with_tokens(tmp_path, TOKENS)
    (root / "acme" / "jwks.json").write_text(document(jwk(RSA), jwk(enc, use="enc")))
    policies = load_policy_set(root)
    now = datetime.now(UTC)
    assert decide(policies, with_token(RSA.sign(**claims())), now=now).effect is Effect.ALLOW
    denied = decide(policies, with_token(enc.sign(**claims())), now=now)
    assert denied.effect is Effect.DENY
    assert denied.reasons[0].code.value == "kontext_authorization_required"


# -- the same rules for callers' bearer tokens ------------------------------------------------


def test_bearer_tokens_honour_the_jwk_use_too(tmp_path: Path) -> None:
    enc = rsa_key("enc-1")
    path = tmp_path / "callers.json"
    path.write_text(document(jwk(RSA), jwk(enc, use="enc")))
    verifier = BearerVerifier(
        CallerAuthSettings(jwks_file=str(path), audience=AUDIENCE, issuer=ISSUER)
    )
    assert verifier.problem(f"Bearer {RSA.sign(**claims())}") is None
    assert verifier.problem(f"Bearer {enc.sign(**claims())}") == (
        "bearer token signed with an unknown key"
    )


def test_bearer_tokens_with_an_overflowing_exp_are_refused_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "callers.json"
    path.write_text(document(jwk(RSA)))
    verifier = BearerVerifier(
        CallerAuthSettings(jwks_file=str(path), audience=AUDIENCE, issuer=ISSUER)
    )
    header = jwt.utils.base64url_encode(b'{"alg":"RS256","kid":"rsa-1"}')
    payload = jwt.utils.base64url_encode(b'{"exp": 1%s, "sub": "svc"}' % (b"0" * 400))
    signing_input = header + b"." + payload
    signature = jwt.algorithms.RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing_input, RSA.private)
    token = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    assert verifier.problem(f"Bearer {token}") is not None
