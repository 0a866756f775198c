"""A JWKS listing many keys under one `kid` cannot make a forged token cost a check per key.

Verification tries every key under a token's `kid`. An identity provider (or a JWKS file)
listing 2,300 RSA keys under one `kid` let anyone holding a forged token with that `kid`
spend 0.13 s of the event loop per token, every organization's answers and health waiting
(a batch of them: minutes). At most `MAX_KEYS_PER_KID` usable keys are kept per `kid`; the
rest are skipped with a reason, and the bound holds through a real fetch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from jwt.utils import base64url_encode

from policy_engine.api import pdp_pb2
from policy_engine.auth.keys import MAX_KEYS_PER_KID, RemoteKeySets, parse_jwks
from policy_engine.lifecycle import deadline_in
from tests.auth.material import rsa_key
from tests.auth.test_jwks_async import KEY, Idp, acme_keys, load
from tests.cache.support import servicer_for, serving, settings
from tests.cache.test_key_sets import codes, policy_dir, with_token

FLOOD = 2000


def flood(kid: str, count: int = FLOOD) -> list[dict[str, object]]:
    """`count` distinct RSA public keys under `kid` (one modulus, different exponents: each a
    valid key, none signing anything)."""
    jwk = rsa_key(kid).public_jwk()
    return [
        {**jwk, "e": base64url_encode((65537 + 2 * i).to_bytes(3, "big")).decode()}
        for i in range(count)
    ]


def test_at_most_a_few_keys_are_kept_under_one_kid() -> None:
    kept = KEY.public_jwk()
    document = json.dumps({"keys": [kept, *flood(KEY.kid), rsa_key("other").public_jwk()]})
    keys = parse_jwks(document, log_skipped=False)
    assert len(keys.keys_for(KEY.kid, "RS256")) == MAX_KEYS_PER_KID
    assert keys.size == MAX_KEYS_PER_KID + 1  # another kid is not affected
    assert len(keys.skipped) == FLOOD + 1 - MAX_KEYS_PER_KID
    assert all("share this kid" in entry.reason for entry in keys.skipped)
    assert keys.keys_for("other", "RS256")


@pytest.fixture
def idp() -> Iterator[Idp]:
    server = Idp()
    yield server
    server.close()


def test_a_flooded_kid_from_an_idp_costs_a_forged_token_a_few_checks(
    tmp_path: Path, idp: Idp
) -> None:
    # The IdP lists the real key first, then thousands more under its kid.
    idp.document = json.dumps({"keys": [KEY.public_jwk(), *flood(KEY.kid)]})
    key_sets = RemoteKeySets()
    try:
        policies = load(policy_dir(tmp_path / "policies", idp.url), key_sets)
        keys = acme_keys(policies)
        assert len(keys.keys_for(KEY.kid, "RS256")) == MAX_KEYS_PER_KID
        config = settings()
        with serving(servicer_for(policies, config), config) as stub:
            assert stub.Check(with_token(KEY), timeout=10).effect == pdp_pb2.EFFECT_ALLOW
            forged = with_token(rsa_key(KEY.kid))  # same kid, a key the IdP never listed
            answer = stub.Check(forged, timeout=10)
            assert answer.effect == pdp_pb2.EFFECT_DENY, codes(answer)
    finally:
        assert key_sets.stop(deadline_in(5))
