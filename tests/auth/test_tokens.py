"""Subject-token verification with real keys, JWKS files and a real JWKS HTTP endpoint."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from policy_engine.api import pdp_pb2
from policy_engine.auth.keys import RemoteKeySet, RemoteKeySets, StaticKeySet, parse_jwks
from policy_engine.auth.pending import await_pending_keys
from policy_engine.auth.tokens import UNVERIFIED, TokenCheck, TokenRules, check_token
from policy_engine.domain.decision import Effect
from policy_engine.domain.request import SubjectKind
from policy_engine.engine import decide
from policy_engine.lifecycle import deadline_in
from policy_engine.policy import CompiledPolicySet, PolicyLoadError, load_policy_set
from policy_engine.store import DirectoryBackend
from tests.auth.material import AUDIENCE, ISSUER, claims, ec_key, ed_key, jwks, rsa_key
from tests.policy_builder import allow_all, request, write_organization

RSA, EC, ED = rsa_key(), ec_key(), ed_key()
KEYS = StaticKeySet(parse_jwks(jwks(RSA, EC, ED)))
RULES = TokenRules(
    keys=KEYS, issuer=ISSUER, audience=AUDIENCE, external_subject_claim="external_id"
)


def now() -> datetime:
    return datetime.now(UTC)


@pytest.mark.parametrize("key", [RSA, EC, ED], ids=["RS256", "ES256", "EdDSA"])
def test_valid_token_is_accepted_with_its_claims(key) -> None:
    check = check_token(
        key.sign(**claims(groups=["eng"])), now(), RULES, "alice", application_id="app"
    )
    assert check.problem is None
    assert check.claims["groups"] == ["eng"]
    assert check.changes_at is not None and check.changes_at > now()


def tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    flipped = "A" if signature[5] != "A" else "B"
    return ".".join([header, payload, signature[:5] + flipped + signature[6:]])


CASES: list[tuple[str, Any, str]] = [
    ("expired", lambda: RSA.sign(**claims(lifetime=-3600)), "expired"),
    ("not yet valid", lambda: RSA.sign(**claims(nbf=int(time.time()) + 3600)), "not valid yet"),
    (
        "issued in the future",
        lambda: RSA.sign(**claims(iat=int(time.time()) + 3600)),
        "issued in the future",
    ),
    ("wrong issuer", lambda: RSA.sign(**claims(iss="https://evil.test")), "wrong issuer"),
    ("wrong audience", lambda: RSA.sign(**claims(aud="someone-else")), "wrong audience"),
    ("tampered", lambda: tamper(RSA.sign(**claims())), "bad signature"),
    ("unknown kid", lambda: rsa_key("rotated").sign(**claims()), "unknown key"),
    ("subject mismatch", lambda: RSA.sign(**claims("mallory")), "does not match"),
    ("no expiry", lambda: RSA.sign(sub="alice", iss=ISSUER, aud=AUDIENCE), "no expiry"),
    ("not a JWT", lambda: "definitely-not-a-jwt", "malformed"),
    (
        "HS256 is refused",
        lambda: __import__("jwt").encode(
            claims(), "a-shared-secret-that-is-long-enough-for-hs256", algorithm="HS256"
        ),
        "not accepted",
    ),
    (
        "alg none is refused",
        lambda: __import__("jwt").encode(claims(), None, algorithm="none"),
        "not accepted",
    ),
]


@pytest.mark.parametrize(("name", "make", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_failure_has_its_precise_cause(name: str, make, expected: str) -> None:
    token = make()
    check = check_token(token, now(), RULES, "alice", application_id="app")
    assert check.problem is not None and expected in check.problem, check.problem
    assert not check.claims
    assert token not in check.problem


def test_an_external_users_token_is_the_mapped_persons() -> None:
    # The engine passes the person the identity mapping gives (alice) and the external ID.
    token = RSA.sign(**claims("alice", external_id="partner-user-123"))

    def problem(person: str, external: str, rules: TokenRules = RULES) -> str | None:
        return check_token(
            token,
            now(),
            rules,
            person,
            SubjectKind.EXTERNAL_USER,
            application_id="app",
            external_id=external,
        ).problem

    assert problem("alice", "partner-user-123") is None
    # The claim naming the external ID, when the organization sets one, must still match.
    assert "'external_id' claim does not match" in str(problem("alice", "partner-user-999"))
    # A token of someone else than the person the ID maps to.
    assert "is not the person the external user ID maps to" in str(
        problem("bob", "partner-user-123")
    )
    # Without external_subject_claim, `sub` alone binds the token to the person.
    unclaimed = replace(RULES, external_subject_claim=None)
    assert problem("alice", "partner-user-999", unclaimed) is None
    assert problem("bob", "partner-user-123", unclaimed) is not None


APPLICATION_CASES: list[tuple[str, dict[str, Any], str | None, str | None]] = [
    # (what, claims over alice's, application_claim, the cause, or None when accepted)
    ("client_id matches", {"client_id": "app"}, "client_id", None),
    (
        "client_id of another app",
        {"client_id": "other-app"},
        "client_id",
        "'other-app', not to 'app'",
    ),
    ("no client_id", {"client_id": None}, "client_id", "no 'client_id' claim"),
    ("client_id a number", {"client_id": 7}, "client_id", "claim 'client_id' is not a string"),
    ("client_id a list", {"client_id": ["app"]}, "client_id", "claim 'client_id' is not a string"),
    ("azp matches", {"azp": "app", "client_id": None}, "azp", None),
    ("azp of another app", {"azp": "evil", "client_id": "app"}, "azp", "'evil', not to 'app'"),
    ("azp missing", {}, "azp", "no 'azp' claim"),
    ("binding off", {"client_id": "other-app"}, None, None),
    ("binding off, none", {"client_id": None}, None, None),
    ("empty client_id", {"client_id": ""}, "client_id", "issued to application ''"),
    (
        "a hostile client_id is quoted and cut",
        {"client_id": "\u202eevil\n" + "x" * 500},
        "client_id",
        "issued to application '\\u202eevil\\n",
    ),
]


@pytest.mark.parametrize(
    ("what", "extra", "claim", "cause"), APPLICATION_CASES, ids=[c[0] for c in APPLICATION_CASES]
)
def test_tokens_are_bound_to_their_application(
    what: str, extra: dict[str, Any], claim: str | None, cause: str | None
) -> None:
    values = {k: v for k, v in {**claims(), **extra}.items() if v is not None}
    token = RSA.sign(**values)
    check = check_token(
        token, now(), replace(RULES, application_claim=claim), "alice", application_id="app"
    )
    if cause is None:
        assert check.problem is None
        return
    assert check.problem is not None and cause in check.problem, check.problem
    assert not check.claims and len(check.problem) < 220


def test_the_delegation_chain_is_read_outermost_first() -> None:
    chain = {
        "sub": "agent-x",
        "client_id": "app",
        "act": {"sub": "orchestrator", "act": {"sub": "alice-cli"}},
    }
    check = check_token(RSA.sign(**claims(act=chain)), now(), RULES, "alice", application_id="app")
    assert check.problem is None
    assert [dict(actor) for actor in check.actors] == [
        {"sub": "agent-x", "client_id": "app"},
        {"sub": "orchestrator"},
        {"sub": "alice-cli"},
    ]
    plain = check_token(RSA.sign(**claims()), now(), RULES, "alice", application_id="app")
    assert plain.problem is None and plain.actors == ()
    # Unverified claims never reach CEL, actors included.
    unverified = check_token(
        RSA.sign(**claims(act=chain)), now(), UNVERIFIED, "alice", application_id="app"
    )
    assert unverified.problem is None and unverified.actors == ()


def test_unknown_key_verdicts_are_never_cacheable() -> None:
    check = check_token(
        rsa_key("rotated").sign(**claims()), now(), RULES, "alice", application_id="app"
    )
    assert check.changes_at is not None and check.changes_at <= now()


# -- through the policy loader and the engine ------------------------------------------------


def org_with_tokens(tmp_path: Path, tokens: dict[str, Any], condition: str | None = None) -> Path:
    rule: dict[str, Any] = {"name": "ok", "effect": "allow"}
    if condition:
        rule["condition"] = condition
    folder = write_organization(
        tmp_path,
        "acme",
        policies=[
            {"name": "org", "layer": "org", "rules": [rule]},
            allow_all("user"),
            allow_all("application"),
        ],
    )
    (folder / "jwks.json").write_text(jwks(RSA))
    import yaml

    config = yaml.safe_load((folder / "organization.yaml").read_text())
    config["tokens"] = tokens
    (folder / "organization.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


TOKENS = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"}


def with_token(token: str, **kwargs: Any):
    base = request(**kwargs)
    return replace(base, subject=replace(base.subject, access_token=token))


def test_verified_claims_reach_cel(tmp_path: Path) -> None:
    policies = load_policy_set(
        org_with_tokens(tmp_path, TOKENS, '"admins" in subject.claims.groups')
    )
    allowed = decide(policies, with_token(RSA.sign(**claims(groups=["admins"]))), now=now())
    assert allowed.effect is Effect.ALLOW
    assert allowed.valid_until is not None
    denied = decide(policies, with_token(RSA.sign(**claims(groups=["staff"]))), now=now())
    assert denied.effect is Effect.DENY


def test_required_tokens(tmp_path: Path) -> None:
    policies = load_policy_set(org_with_tokens(tmp_path, {**TOKENS, "required": True}))
    missing = decide(policies, request(), now=now())
    assert missing.effect is Effect.DENY
    assert missing.reasons[0].code.value == "kontext_authorization_required"
    assert "requires" in missing.reasons[0].message
    assert decide(policies, with_token(RSA.sign(**claims())), now=now()).effect is Effect.ALLOW


def test_jwks_file_counts_in_the_revision(tmp_path: Path) -> None:
    directory = org_with_tokens(tmp_path, TOKENS)
    before = load_policy_set(directory).revision
    (directory / "acme" / "jwks.json").write_text(jwks(RSA, EC))
    assert load_policy_set(directory).revision != before


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ({**TOKENS, "jwks_file": "../outside.json"}, "inside the organization"),
        ({**TOKENS, "jwks_file": "missing.json"}, "cannot read"),
        ({"audience": AUDIENCE}, "tokens need 'jwks_file', 'jwks_url', or an 'issuer'"),
        ({**TOKENS, "algorithms": ["HS256"]}, "algorithms"),
        ({**TOKENS, "leeway_seconds": 9999}, "leeway"),
    ],
)
def test_bad_token_settings_are_load_errors(tmp_path: Path, tokens, message: str) -> None:
    with pytest.raises(PolicyLoadError) as error:
        load_policy_set(org_with_tokens(tmp_path, tokens))
    assert message in str(error.value)
    assert "organization.yaml" in str(error.value)


# -- a real JWKS endpoint ---------------------------------------------------------------------


class JwksServer:
    def __init__(self) -> None:
        self.document = jwks(RSA)
        self.requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                body = owner.document.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def message(token: str) -> pdp_pb2.CheckRequest:
    """A CheckRequest to acme carrying `token` (what the pre-step reads)."""
    return pdp_pb2.CheckRequest(
        organization="acme", subject=pdp_pb2.Subject(id="alice", access_token=token)
    )


def url_policies(tmp_path: Path, url: str, remote_keys: RemoteKeySets) -> CompiledPolicySet:
    """acme, its tokens verified with the keys at `url`, once they are fetched."""
    tokens = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": url}
    policies = DirectoryBackend(org_with_tokens(tmp_path, tokens), remote_keys=remote_keys).load()
    keys = policies.organizations["acme"].tokens.keys
    assert isinstance(keys, RemoteKeySet)
    assert wait_for(lambda: keys.available), keys.last_error
    return policies


def test_remote_keys_rotate_with_one_rate_limited_refresh(
    tmp_path: Path, jwks_server: JwksServer
) -> None:
    remote_keys = RemoteKeySets(min_refresh_interval=0.2)
    policies = url_policies(tmp_path, jwks_server.url, remote_keys)
    rules = policies.organizations["acme"].tokens
    assert (
        check_token(RSA.sign(**claims()), now(), rules, "alice", application_id="app").problem
        is None
    )
    fetched = jwks_server.requests

    jwks_server.document = jwks(RSA, EC)  # the IdP rotates in a new key
    token = EC.sign(**claims())
    time.sleep(0.25)  # past the rate limit that follows the fetch above

    async def one_call(token: str) -> TokenCheck:
        # What the asyncio pipeline does: wait for the refresh the token needs, then verify.
        await await_pending_keys([message(token)], policies, time.monotonic() + 10)
        return check_token(token, now(), rules, "alice", application_id="app")

    async def burst() -> list[TokenCheck]:
        return await asyncio.gather(*(one_call(token) for _ in range(50)))

    # The first call with the new kid waits for the refresh it triggers and passes; the
    # concurrent burst behind it waits for the same refresh and causes no further fetch.
    verdicts = asyncio.run(burst())
    assert [v.problem for v in verdicts] == [None] * 50
    assert jwks_server.requests == fetched + 1

    started = time.monotonic()
    for _ in range(50):  # a kid that never appears: refreshes stay rate-limited
        asyncio.run(one_call(ed_key("never").sign(**claims())))
    elapsed = time.monotonic() - started
    time.sleep(0.1)
    assert jwks_server.requests <= fetched + 2 + int(elapsed / 0.2)
    assert remote_keys.stop(deadline_in(5))


def test_an_unknown_kid_waits_for_a_slow_refresh_only_so_long(tmp_path: Path) -> None:
    release = threading.Event()
    calls: list[str] = []

    async def slow_fetch(url: str, timeout: float) -> bytes:
        calls.append(url)
        if len(calls) == 1:
            return jwks(RSA).encode()
        # The refresh after the rotation: the IdP is slow to answer (the loop goes on).
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return jwks(RSA, EC).encode()

    remote_keys = RemoteKeySets(min_refresh_interval=0, unknown_kid_wait=1.0, fetch=slow_fetch)
    policies = url_policies(tmp_path, "https://idp.test/jwks", remote_keys)
    rules = policies.organizations["acme"].tokens
    token = EC.sign(**claims())

    def wait(deadline: float) -> float:
        started = time.monotonic()
        asyncio.run(await_pending_keys([message(token)], policies, deadline))
        return time.monotonic() - started

    assert 0.9 <= wait(time.monotonic() + 30) < 5  # bounded by unknown_kid_wait, not the fetch
    assert wait(time.monotonic() + 0.05) < 0.9  # and by the caller's deadline
    verdict = check_token(token, now(), rules, "alice", application_id="app")
    assert verdict.problem is not None and "unknown key" in verdict.problem
    release.set()
    assert wait_for(
        lambda: check_token(token, now(), rules, "alice", application_id="app").problem is None
    )
    assert remote_keys.stop(deadline_in(5))


def test_remote_keys_survive_an_unreachable_endpoint(jwks_server: JwksServer) -> None:
    remote = RemoteKeySet(jwks_server.url, min_refresh_interval=0.0, timeout=0.5)
    remote.refresh_now()
    jwks_server.close()
    remote.refresh_now()
    assert remote.last_error
    assert (
        check_token(
            RSA.sign(**claims()), now(), replace(RULES, keys=remote), "alice", application_id="app"
        ).problem
        is None
    )


def test_pdp_eval_dry_runs_tokens_with_a_jwks_file(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.auth.verified_examples import examples_verifying_tokens

    keys = tmp_path / "jwks.json"
    keys.write_text(jwks(RSA))
    policies = examples_verifying_tokens(tmp_path)  # the example acme verifies no tokens
    base = [
        sys.executable,
        "-m",
        "policy_engine.cli.main",
        "eval",
        "--policies",
        str(policies),
        "--org",
        "acme",
        "--subject",
        "alice",
        "--subject-attr",
        'groups=["engineering"]',
        "--application",
        "pr-reviewer",
        "--integration",
        "github",
        "--scope",
        "repo",
        "--jwks",
        str(keys),
        "--issuer",
        ISSUER,
        "--audience",
        AUDIENCE,
        "--json",
        "--token",
    ]
    token = RSA.sign(**claims(client_id="pr-reviewer"))  # pr-reviewer presents it
    good = subprocess.run([*base, token], capture_output=True, text=True)
    assert json.loads(good.stdout)["decision"] == "ALLOW", good.stderr
    bad = subprocess.run([*base, tamper(token)], capture_output=True, text=True)
    reason = json.loads(bad.stdout)["reasons"][0]
    assert reason["code"] == "kontext_authorization_required"
    assert "bad signature" in reason["message"]


def test_jwks_url_keys_are_fetched_once_and_kept_across_reloads(
    tmp_path: Path, jwks_server: JwksServer
) -> None:
    tokens = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": jwks_server.url}
    backend = DirectoryBackend(org_with_tokens(tmp_path, tokens))
    first = backend.load()  # takes the key set at once; its first fetch lands in the background
    assert wait_for(lambda: first.organizations["acme"].tokens.keys.available)
    assert jwks_server.requests == 1
    token = with_token(RSA.sign(**claims()))
    assert decide(first, token, now=now()).effect is Effect.ALLOW
    second = backend.load()  # a reload: same URL, same key set, no new fetch
    assert jwks_server.requests == 1
    assert second.organizations["acme"].tokens.keys is first.organizations["acme"].tokens.keys
    assert decide(second, token, now=now()).effect is Effect.ALLOW
    load_policy_set(backend.directory)  # a one-off load (pdp validate) fetches for itself
    assert jwks_server.requests == 2
