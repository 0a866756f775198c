"""A cached decision never outlives the JWKS keys it was decided with.

An organization whose tokens are verified with a `jwks_url` gets its keys refreshed in the
background while the policy revision stays the same. The cache keys token decisions by the
key set's content fingerprint as well (policy_engine.cache.key), so when the identity provider
removes a key, the next request is decided with the keys the PDP now holds, on both levels,
not answered by an ALLOW cached before. Real parts: a JWKS HTTP endpoint, gRPC servers on
ephemeral ports and a real redis-server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy_engine.api import pdp_pb2
from policy_engine.auth.keys import (
    KeySetError,
    RemoteKeySet,
    StaticKeySet,
    key_set_fingerprint,
    parse_jwks,
)
from policy_engine.bench.redis_server import RedisServer
from policy_engine.cache import KeyBuilder
from policy_engine.policy import CompiledPolicySet
from policy_engine.store import DirectoryBackend
from tests.auth.material import AUDIENCE, ISSUER, SigningKey, claims, ec_key, jwks, rsa_key
from tests.auth.test_tokens import JwksServer
from tests.cache.support import LOCAL, NONE, REDIS, servicer_for, serving, settings, tuple_request
from tests.policy_builder import allow_all, write_organization

KEPT, REMOVED, ADDED = rsa_key("kept"), ec_key("removed"), rsa_key("added")
AUTHORIZATION_REQUIRED = "kontext_authorization_required"


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    """The identity provider's JWKS endpoint, publishing KEPT and REMOVED to begin with."""
    server = JwksServer()
    server.document = jwks(KEPT, REMOVED)
    yield server
    server.close()


def policy_dir(root: Path, jwks_url: str) -> Path:
    """`acme` (tokens verified with `jwks_url`) and `globex` (no tokens), both open."""
    for org in ("acme", "globex"):
        folder = write_organization(
            root,
            org,
            applications=["pr-reviewer"],
            policies=[allow_all("org"), allow_all("user"), allow_all("application")],
        )
    config_file = root / "acme" / "organization.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["tokens"] = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": jwks_url}
    config_file.write_text(yaml.safe_dump(config))
    return folder.parent


def with_token(key: SigningKey, organization: str = "acme") -> pdp_pb2.CheckRequest:
    msg = tuple_request()
    msg.organization = organization
    msg.subject.access_token = key.sign(**claims(client_id=msg.application.id))
    return msg


def fetched(root: Path) -> CompiledPolicySet:
    """The policy set as a server holds it once its first JWKS fetch is done (a load takes
    the key set at once and fetches it in the background)."""
    backend = DirectoryBackend(root)
    policies = backend.load()
    backend.remote_keys.wait_for_fetches(time.monotonic() + 10)
    assert remote(policies).available
    return policies


def remote(policies: CompiledPolicySet) -> RemoteKeySet:
    keys = policies.organizations["acme"].tokens.keys
    assert isinstance(keys, RemoteKeySet)
    return keys


def codes(resp: Any) -> list[str]:
    return [reason.code for reason in resp.reasons]


# --- the fingerprint -------------------------------------------------------------------------


def test_the_fingerprint_follows_the_usable_keys_and_nothing_else() -> None:
    a, b = KEPT.public_jwk(), REMOVED.public_jwk()
    base = parse_jwks(json.dumps({"keys": [a, b]})).fingerprint
    assert len(base) == 32
    # Same keys: another order, whitespace, member order, a repeated key, a skipped key.
    same = [
        json.dumps({"keys": [b, a]}, indent=2),
        json.dumps({"keys": [dict(reversed(a.items())), b, a]}),
        json.dumps({"keys": [a, b, {**a, "kid": "enc", "use": "enc"}]}),
    ]
    assert {parse_jwks(doc).fingerprint for doc in same} == {base}
    # Different keys: one removed, one added, one's kid, alg or use changed.
    different = [
        json.dumps({"keys": [a]}),
        json.dumps({"keys": [a, b, ADDED.public_jwk()]}),
        json.dumps({"keys": [{**a, "kid": "other"}, b]}),
        json.dumps({"keys": [{**a, "alg": "PS256"}, b]}),
        json.dumps({"keys": [{k: v for k, v in a.items() if k != "use"}, b]}),
    ]
    prints = [parse_jwks(doc).fingerprint for doc in different]
    assert base not in prints and len(set(prints)) == len(prints)
    assert key_set_fingerprint([a, b]) == base  # the function the docs name


@pytest.mark.parametrize("depth", [10, 900, 991, 992, 5000, 200_000])
@pytest.mark.parametrize("extra", ["NaN", "1e999", '"\\ud800"', "-0.0"])
def test_hostile_members_are_fingerprinted_or_refused_never_a_traceback(
    depth: int, extra: str
) -> None:
    """Extra members of a usable JWK (nested to json's limit, NaN, unpaired surrogates)."""
    member = "[" * depth + "]" * depth
    jwk = json.dumps(KEPT.public_jwk())[:-1]
    document = f'{{"keys":[{jwk},"nested":{member},"extra":{extra}}}]}}'
    try:
        fingerprint = parse_jwks(document).fingerprint
    except KeySetError as exc:
        assert "invalid JWKS" in str(exc)
    else:
        assert len(fingerprint) == 32
        assert fingerprint == parse_jwks(document).fingerprint  # deterministic


def test_a_failed_refresh_keeps_the_fingerprint_a_successful_one_moves_it(idp: JwksServer) -> None:
    keys = RemoteKeySet(idp.url, min_refresh_interval=0.0, timeout=2.0)
    empty = keys.fingerprint  # nothing fetched yet: the empty set's
    keys.refresh_now()
    fetched = keys.fingerprint
    assert fetched not in (empty, key_set_fingerprint(()))
    idp.document = "not json"
    keys.refresh_now()
    assert keys.last_error and keys.fingerprint == fetched
    idp.document = jwks(KEPT)
    keys.refresh_now()
    assert not keys.last_error and keys.fingerprint == parse_jwks(jwks(KEPT)).fingerprint


def test_a_key_set_salts_only_its_own_organizations_keys() -> None:
    builder = KeyBuilder("pdp:v1", b"settings-salt-16")
    first, second = StaticKeySet(parse_jwks(jwks(KEPT))), StaticKeySet(parse_jwks(jwks(ADDED)))
    token, other_org = with_token(KEPT), with_token(KEPT, organization="globex")
    no_token = tuple_request()
    messages = [token, other_org, no_token]
    under_first = [builder.key(m, "rev", {"acme": first}) for m in messages]
    under_second = [builder.key(m, "rev", {"acme": second}) for m in messages]
    assert under_first[0] != under_second[0]  # acme's key set changed: acme's keys change
    assert under_first[1] == under_second[1] == builder.key(other_org, "rev")  # globex's don't
    # The batch form agrees with the single one, and keys do not depend on the builder.
    assert builder.keys(messages, "rev", {"acme": second}) == under_second
    fresh = KeyBuilder("pdp:v1", b"settings-salt-16")
    assert fresh.keys(messages, "rev", {"acme": first}) == under_first
    # Another settings salt, another key for the same key set.
    assert (
        KeyBuilder("pdp:v1", b"other-settings16").key(token, "rev", {"acme": first})
        != (under_first[0])
    )


# --- through the gRPC server -----------------------------------------------------------------


def test_a_removed_key_is_denied_at_once_not_served_from_the_local_level(
    tmp_path: Path, idp: JwksServer
) -> None:
    policies = fetched(policy_dir(tmp_path / "policies", idp.url))
    config = settings(local_ttl_seconds=300)  # far longer than the test: only keys can miss
    servicer = servicer_for(policies, config)
    signed_removed, signed_kept = with_token(REMOVED), with_token(KEPT)
    other_org = tuple_request()
    other_org.organization = "globex"
    with serving(servicer, config) as stub:
        for msg in (signed_removed, signed_kept, other_org):
            first, again = stub.Check(msg, timeout=10), stub.Check(msg, timeout=10)
            assert (first.effect, first.cache_level) == (pdp_pb2.EFFECT_ALLOW, NONE)
            assert (again.effect, again.cache_level) == (pdp_pb2.EFFECT_ALLOW, LOCAL)

        idp.document = jwks(KEPT)  # the IdP removes a key (revoked, compromised)
        remote(policies).refresh_now()  # what the server's background refresh runs

        for resp in (
            stub.Check(signed_removed, timeout=10),
            stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=[signed_removed]), timeout=10).results[
                0
            ],
        ):
            assert resp.effect == pdp_pb2.EFFECT_DENY
            assert resp.cache_level == NONE
            assert codes(resp) == [AUTHORIZATION_REQUIRED]
            assert resp.policy_revision == policies.revision  # still the policy revision
        # The kept key's token is decided again once under the new keys, then cached again.
        kept = [stub.Check(signed_kept, timeout=10) for _ in range(2)]
        assert [(r.effect, r.cache_level) for r in kept] == [
            (pdp_pb2.EFFECT_ALLOW, NONE),
            (pdp_pb2.EFFECT_ALLOW, LOCAL),
        ]

        # A refresh that fails keeps the keys, hence the entries; a key added is a new key
        # set: the entries are decided again (and allowed), never wrongly kept or denied.
        idp.document = "<html>502 Bad Gateway</html>"
        remote(policies).refresh_now()
        assert remote(policies).last_error
        assert stub.Check(signed_kept, timeout=10).cache_level == LOCAL
        idp.document = jwks(KEPT, ADDED)
        remote(policies).refresh_now()
        added = [stub.Check(msg, timeout=10) for msg in (signed_kept, with_token(ADDED))]
        assert [(r.effect, r.cache_level) for r in added] == [(pdp_pb2.EFFECT_ALLOW, NONE)] * 2
        # An organization without tokens never depended on acme's keys: its entry, made
        # before any of this, is still served.
        assert stub.Check(other_org, timeout=10).cache_level == LOCAL


def test_replicas_share_redis_entries_until_one_sees_the_key_removed(
    tmp_path: Path, idp: JwksServer, shared_redis: RedisServer
) -> None:
    root = policy_dir(tmp_path / "policies", idp.url)
    # Two replicas, each with its own policy store and JWKS fetch, no local level: every
    # answer they do not decide comes from Redis.
    config = settings(shared_redis, local_max_entries=0)
    policies_a = fetched(root)
    idp.document = json.dumps(  # the same keys, served in another order and layout
        {"keys": [REMOVED.public_jwk(), KEPT.public_jwk()]}, indent=2
    )
    policies_b = fetched(root)
    assert remote(policies_a) is not remote(policies_b)
    assert remote(policies_a).fingerprint == remote(policies_b).fingerprint
    replica_a, replica_b = servicer_for(policies_a, config), servicer_for(policies_b, config)
    msg = with_token(REMOVED)
    with serving(replica_a, config) as stub_a, serving(replica_b, config) as stub_b:
        decided = stub_a.Check(msg, timeout=10)
        assert (decided.effect, decided.cache_level) == (pdp_pb2.EFFECT_ALLOW, NONE)
        assert replica_a.cache is not None and replica_a.cache.flush()
        shared = stub_b.Check(msg, timeout=10)  # the same JWKS content: the same entry
        assert (shared.effect, shared.cache_level) == (pdp_pb2.EFFECT_ALLOW, REDIS)

        idp.document = jwks(KEPT)
        remote(policies_b).refresh_now()  # B's refresh comes first
        for resp in (
            stub_b.Check(msg, timeout=10),
            stub_b.CheckBatch(pdp_pb2.CheckBatchRequest(items=[msg, msg]), timeout=10).results[1],
        ):
            assert (resp.effect, resp.cache_level) == (pdp_pb2.EFFECT_DENY, NONE)
            assert codes(resp) == [AUTHORIZATION_REQUIRED]
        # A, which still holds the removed key and would allow it itself, still shares the
        # entry with replicas that hold the same keys; once it has refreshed, it denies too.
        assert stub_a.Check(msg, timeout=10).cache_level == REDIS
        remote(policies_a).refresh_now()
        denied = stub_a.Check(msg, timeout=10)
        assert (denied.effect, denied.cache_level) == (pdp_pb2.EFFECT_DENY, NONE)
        assert codes(denied) == [AUTHORIZATION_REQUIRED]
