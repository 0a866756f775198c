"""Whoever can write to Redis still cannot change an answer: forged, copied and replayed values
are misses, and the server answers what its policies say. Every attack writes raw bytes into a
real redis-server with a plain client, then asks the real gRPC server."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.cache import SigningKeys
from policy_engine.cache.entry import Codec, Entry
from policy_engine.config import ConfigError
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.service import PolicyDecisionServicer
from tests.cache.support import (
    KEY,
    NEW_KEY,
    NONE,
    OLD_KEY,
    REDIS,
    Clock,
    admin,
    answer,
    servicer_for,
    serving,
    settings,
    tuple_request,
)
from tests.metrics import sample as _sample
from tests.policy_builder import allow_all, write_organization
from tests.server.harness import EXAMPLE_POLICIES, running

ALLOW = pdp_pb2.EFFECT_ALLOW
START = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
# Requests the example policies deny, for which a planted allow would be a wrongful allow.
DENIED = {
    "service account": tuple_request(
        subject=pdp_pb2.Subject(kind=pdp_pb2.SUBJECT_KIND_SERVICE_ACCOUNT)
    ),
    "no connection": tuple_request(
        context=pdp_pb2.RequestContext(connection=pdp_pb2.CONNECTION_STATE_ABSENT)
    ),
    "denied scope": tuple_request(scope="delete_repo"),
    "org default": tuple_request("bob", ["sales"]),
}
# Keys an attacker may know or guess: none at all, a short weak one, one of their own.
GUESSES = ("", "s3cret", "attacker-key-" * 4)


@pytest.fixture(scope="module")
def policies() -> CompiledPolicySet:
    return load_policy_set(EXAMPLE_POLICIES)


def _token(expires: datetime) -> str:
    return jwt.encode({"sub": "alice", "exp": int(expires.timestamp())}, "k" * 32, "HS256")


def _forgeries(key: str, template: bytes, expires_at: float) -> list[bytes]:
    """Allow entries for `key` that anyone can compute without the deployment's key: the
    previous format's digest, unkeyed or keyed with a guess, and this format with a guess."""
    values = []
    for guess in GUESSES:
        header = struct.pack(">BdBB", 2, expires_at, ALLOW, 0)
        mac = hashlib.blake2b(digest_size=16, key=guess.encode())
        for part in (key.encode(), b"\0", header, template):
            mac.update(part)
        values.append(header + mac.digest() + template)
        entry = Entry(template, expires_at, ALLOW, "")
        values.append(Codec(SigningKeys.of(guess)).encode(key, entry))
    return values


@pytest.mark.parametrize("configured", ["no key", "short key", "key", "key file"])
def test_a_redis_writer_cannot_change_an_answer(
    configured: str, policies: CompiledPolicySet, shared_redis: RedisServer, tmp_path: Path
) -> None:
    """Whatever the operator configured: either the server refuses to start, or every forged,
    copied and replayed value is a miss and the answer is the policies' own."""
    key_file = tmp_path / "cache.key"
    key_file.write_text(KEY + "\n")
    keys_as_configured = {
        "no key": {"redis_signing_key": ""},
        "short key": {"redis_signing_key": "s3cret"},
        "key": {},  # the suite's KEY
        "key file": {"redis_signing_key": "", "redis_signing_key_file": str(key_file)},
    }[configured]
    config = settings(
        shared_redis, local_max_entries=0, redis_ttl_seconds=600, **keys_as_configured
    )
    clock = Clock(START)
    try:
        servicer = servicer_for(policies, config, clock=clock)
    except ConfigError as exc:
        assert configured in ("no key", "short key")
        assert "cache.redis_signing_key" in str(exc)
        return
    assert configured in ("key", "key file"), "started with a key an attacker can know"
    uncached = servicer_for(policies, settings(), cache=None).decider
    honest = {name: answer(uncached.decide_sync([msg]).only()) for name, msg in DENIED.items()}
    assert all(a[0] == pdp_pb2.EFFECT_DENY for a in honest.values())
    client = admin(shared_redis)
    rejected_before = _sample("pdp_cache_lookups_total", level="redis", result="rejected")
    attempts = 0

    def plant_and_ask(planted: dict[str, bytes]) -> int:
        """Writes each value under its denied tuple's key, asks by Check and by CheckBatch
        (planting again before each: a miss writes the honest deny back); the answers must be
        the policies' own. Returns the number of lookups that met a planted value."""
        for name, msg in DENIED.items():
            for method in ("Check", "CheckBatch"):
                client.set(keys[name], planted[name], px=600_000)
                if method == "Check":
                    resp = stub.Check(msg, timeout=10)
                else:
                    batch = pdp_pb2.CheckBatchRequest(items=[msg])
                    resp = stub.CheckBatch(batch, timeout=10).results[0]
                assert answer(resp) == honest[name], (name, method)
                assert (resp.cached, resp.cache_level) == (False, NONE), (name, method)
                assert servicer.cache is not None and servicer.cache.flush()
        return len(DENIED) * 2

    with serving(servicer, config) as stub:
        assert servicer.cache is not None
        revision = policies.revision
        keys = {name: servicer.cache.key(msg, revision) for name, msg in DENIED.items()}
        # An honest allow, read back from Redis: the attacker's template for every forgery.
        allowed = tuple_request()
        assert stub.Check(allowed, timeout=10).effect == ALLOW and servicer.cache.flush()
        allow_key = servicer.cache.key(allowed, revision)
        allow_value = client.get(allow_key)
        assert allow_value is not None
        template = allow_value[15 + 16 :]  # header, tag, then code (empty for an allow)
        assert pdp_pb2.CheckResponse.FromString(template).effect == ALLOW

        # Forged: computed without the key, for each denied tuple.
        later = (START + timedelta(days=1)).timestamp()
        forged = {name: _forgeries(key, template, later) for name, key in keys.items()}
        for index in range(len(GUESSES) * 2):
            attempts += plant_and_ask({name: values[index] for name, values in forged.items()})

        # Copied: the honest allow onto each deny's key.
        attempts += plant_and_ask(dict.fromkeys(keys, allow_value))

        # Copied: an allow written under another revision (another replica's policies that
        # let bob in, same key) onto this revision's key for the same request.
        opened = write_organization(
            tmp_path / "opened",
            "acme",
            applications=["pr-reviewer"],
            policies=[allow_all("org"), allow_all("user"), allow_all("application")],
        )
        other_policies = load_policy_set(opened.parent)
        other = servicer_for(other_policies, config, clock=clock)
        with serving(other, config) as other_stub:
            assert other_stub.Check(DENIED["org default"], timeout=10).effect == ALLOW
            assert other.cache is not None and other.cache.flush()
        other_key = other.cache.key(DENIED["org default"], other_policies.revision)
        assert other_key != keys["org default"] and client.get(other_key) is not None
        client.set(keys["org default"], client.get(other_key), px=600_000)
        resp = stub.Check(DENIED["org default"], timeout=10)
        assert answer(resp) == honest["org default"] and not resp.cached
        attempts += 1

        # Replayed: an allow for a token, written back after the token expired and its
        # entry was replaced by the expired token's deny.
        with_token = tuple_request(subject=pdp_pb2.Subject(access_token=_token(START)))
        assert stub.Check(with_token, timeout=10).effect == ALLOW and servicer.cache.flush()
        token_key = servicer.cache.key(with_token, revision)
        assert token_key is not None
        old_allow = client.get(token_key)
        clock.advance(31)  # past exp + 30 s leeway
        denied = stub.Check(with_token, timeout=10)
        assert denied.effect == pdp_pb2.EFFECT_DENY and servicer.cache.flush()
        assert client.get(token_key) != old_allow  # replaced by the deny
        client.set(token_key, old_allow, px=600_000)
        replayed = stub.Check(with_token, timeout=10)
        assert answer(replayed) == answer(denied)
        assert replayed.reasons[0].code == "kontext_authorization_required"

        # Replayed: an entry written back after it expired (its own expiry is signed).
        clock.advance(600)
        client.set(allow_key, allow_value, px=600_000)
        assert not stub.Check(allowed, timeout=10).cached
    rejected = _sample("pdp_cache_lookups_total", level="redis", result="rejected")
    assert rejected - rejected_before == attempts


@contextmanager
def _replicas(
    servicers: dict[str, PolicyDecisionServicer],
) -> Iterator[Callable[[str, pdp_pb2.CheckRequest], int]]:
    """Each servicer on its own real gRPC server; yields `ask(replica, request)`, which returns
    the cache level that answered once the replica's Redis write (if any) has landed."""
    with ExitStack() as stack:
        stubs = {
            name: pdp_pb2_grpc.PolicyDecisionServiceStub(stack.enter_context(running(s)))
            for name, s in servicers.items()
        }

        def ask(name: str, msg: pdp_pb2.CheckRequest) -> int:
            resp = stubs[name].Check(msg, timeout=10)
            cache = servicers[name].cache
            assert cache is not None and cache.flush()
            return int(resp.cache_level)

        try:
            yield ask
        finally:
            for servicer in servicers.values():
                servicer.close()


def test_replicas_interoperate_while_the_signing_key_rotates(
    policies: CompiledPolicySet, shared_redis: RedisServer
) -> None:
    """Replica A on the old key, B on the new key that still verifies the old one: B reads
    A's entries; A treats B's as misses (and decides). Staging the new key as verify-only on A
    first makes both read each other. Once the old key is retired, its entries are misses."""

    def replica(signing: str, *verify: str) -> PolicyDecisionServicer:
        config = settings(
            shared_redis,
            local_max_entries=0,
            redis_signing_key=signing,
            redis_verify_keys=",".join(verify),
        )
        return servicer_for(policies, config)

    client = admin(shared_redis)
    from_a, from_b = tuple_request(), tuple_request(scope="delete_repo")
    replicas = {
        "a": replica(OLD_KEY),
        "b": replica(NEW_KEY, OLD_KEY),
        "staged": replica(OLD_KEY, NEW_KEY),
        "retired": replica(NEW_KEY),
    }
    with _replicas(replicas) as ask:
        assert ask("a", from_a) == NONE  # written with the old key
        assert ask("b", from_a) == REDIS  # B still verifies the old key
        assert ask("b", from_b) == NONE  # written with the new key
        before = _sample("pdp_cache_lookups_total", level="redis", result="rejected")
        assert ask("a", from_b) == NONE  # A cannot verify it: a miss, decided anew
        assert _sample("pdp_cache_lookups_total", level="redis", result="rejected") > before

        # Phase 1 of a rotation without misses: A verifies the new key before anyone signs
        # with it; phase 2, B signs with it and still verifies the old.
        client.flushall()
        assert ask("b", from_b) == NONE
        assert ask("staged", from_b) == REDIS
        assert ask("staged", from_a) == NONE
        assert ask("b", from_a) == REDIS

        # Phase 3: the old key retired. Entries it signed are misses; the new key's serve.
        assert ask("retired", from_a) == NONE
        assert ask("retired", from_b) == REDIS
