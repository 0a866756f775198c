"""A token minted for someone else is never accepted: not for another audience, not by the
caller check for another service, not by an organization for another one that trusts the same
issuer, and discovery never fetches keys from a host the issuer's metadata merely names.

Real parts only: tokens signed with real keys (PyJWT), real policy folders, the real engine,
real gRPC servers on ephemeral ports, identity providers on real local HTTP sockets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.auth.discovery import DiscoveryError, origin_problem, parse_metadata
from policy_engine.auth.keys import StaticKeySet, parse_jwks
from policy_engine.auth.tokens import TokenRules, check_token
from policy_engine.client import PdpClient, check_request
from policy_engine.config import CallerAuthSettings, ConfigError, Settings, load_settings
from policy_engine.domain.decision import Effect
from policy_engine.engine import decide
from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.server.app import RunningServer, build_server, start_server
from policy_engine.server.service import PolicyDecisionServicer
from tests.auth.material import AUDIENCE, ISSUER, SigningKey, claims, jwks, rsa_key
from tests.auth.test_discovery import OAUTH, TENANT, Site, acme_keys, discovery_dir, pdp_server
from tests.auth.test_tokens import with_token
from tests.auth.verified_examples import examples_verifying_tokens
from tests.policy_builder import allow_all, write_organization
from tests.scenarios import EXAMPLE_POLICIES
from tests.server.harness import DOCS
from tests.store.support import wait_for, write_text_atomically

KEY = rsa_key("shared-idp")
AUTHORIZATION_REQUIRED = "kontext_authorization_required"
OPEN = [allow_all("org"), allow_all("user"), allow_all("application")]


def now() -> datetime:
    return datetime.now(UTC)


def write_org(root: Path, org: str, **tokens: Any) -> Path:
    """Organization `org` under `root`, open to everyone, verifying tokens with KEY's JWKS
    file and `tokens` (no `tokens:` at all when empty)."""
    folder = write_organization(root, org, policies=OPEN)
    if tokens:
        (folder / "jwks.json").write_text(jwks(KEY))
        config = yaml.safe_load((folder / "organization.yaml").read_text())
        config["tokens"] = {"jwks_file": "jwks.json", **tokens}
        write_text_atomically(folder / "organization.yaml", yaml.safe_dump(config))
    return root


def load_errors(root: Path) -> str:
    with pytest.raises(PolicyLoadError) as raised:
        load_policy_set(root)
    return str(raised.value)


# --- 1. an audience is required ------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens",
    [
        {"jwks_file": "jwks.json", "issuer": ISSUER},
        {"jwks_url": "https://idp.acme.test/jwks", "issuer": ISSUER},
        {"jwks_file": ..., "issuer": "http://127.0.0.1:1/tenant"},  # discovered keys
    ],
    ids=["jwks_file", "jwks_url", "discovery"],
)
def test_tokens_without_an_audience_are_a_load_error(tmp_path: Path, tokens: dict) -> None:
    """Before: the organization loaded and accepted a token for any audience."""
    root = write_org(tmp_path, "acme", issuer=ISSUER)
    config_file = root / "acme" / "organization.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["tokens"] = {k: v for k, v in tokens.items() if v is not ...}
    config_file.write_text(yaml.safe_dump(config))
    errors = load_errors(root)
    assert "organization.yaml" in errors and "tokens need an 'audience'" in errors


@pytest.mark.parametrize("keys", ["jwks_file", "jwks_url"])
def test_tokens_verified_with_named_keys_need_an_issuer(tmp_path: Path, keys: str) -> None:
    """Before: keys alone accepted a token from any issuer they verify (a multi-tenant IdP
    signs every tenant's tokens with the same keys)."""
    root = write_org(tmp_path, "acme", issuer=ISSUER, audience=AUDIENCE)
    config_file = root / "acme" / "organization.yaml"
    config = yaml.safe_load(config_file.read_text())
    source = "jwks.json" if keys == "jwks_file" else "https://idp.acme.test/jwks"
    config["tokens"] = {keys: source, "audience": AUDIENCE}
    config_file.write_text(yaml.safe_dump(config))
    errors = load_errors(root)
    assert "tokens need an 'issuer'" in errors and "need an 'audience'" not in errors


def test_a_token_from_another_issuer_is_denied_by_the_engine(tmp_path: Path) -> None:
    policies = load_policy_set(write_org(tmp_path, "acme", issuer=ISSUER, audience=AUDIENCE))
    tenant = decide(
        policies, with_token(KEY.sign(**claims(iss="https://other-tenant.test"))), now=now()
    )
    assert tenant.effect is Effect.DENY and "wrong issuer" in tenant.reasons[0].message
    no_iss = {k: v for k, v in claims().items() if k != "iss"}
    assert decide(policies, with_token(KEY.sign(**no_iss)), now=now()).effect is Effect.DENY


def test_a_token_for_another_audience_is_denied_by_the_engine(tmp_path: Path) -> None:
    policies = load_policy_set(write_org(tmp_path, "acme", issuer=ISSUER, audience=AUDIENCE))
    assert decide(policies, with_token(KEY.sign(**claims())), now=now()).effect is Effect.ALLOW
    for aud in ("billing-service", ["billing-service", "crm"], []):
        foreign = decide(policies, with_token(KEY.sign(**claims(aud=aud))), now=now())
        assert foreign.effect is Effect.DENY
        assert "wrong audience" in foreign.reasons[0].message
    no_aud = {k: v for k, v in claims().items() if k != "aud"}
    assert decide(policies, with_token(KEY.sign(**no_aud)), now=now()).effect is Effect.DENY


def test_rules_with_keys_but_no_audience_or_issuer_accept_no_token() -> None:
    """A `TokenRules` built by hand (not by the loader) without an audience or issuer:
    before, every audience and issuer was accepted."""
    keys = StaticKeySet(parse_jwks(jwks(KEY)))
    for rules, missing in [
        (TokenRules(keys=keys, issuer=ISSUER), "audience"),
        (TokenRules(keys=keys, audience=AUDIENCE), "issuer"),
    ]:
        check = check_token(
            KEY.sign(**claims(aud="billing-service", iss="https://other-tenant.test")),
            now(),
            rules,
            "alice",
            application_id="app",
        )
        assert check.problem is not None and f"name no {missing}" in check.problem
        assert not check.claims  # nothing of the token reaches a policy


def _pdp_eval(token: str, *flags: str) -> dict[str, Any]:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "policy_engine.cli.main",
            "eval",
            "--policies",
            str(EXAMPLE_POLICIES),
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
            "--json",
            "--token",
            token,
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode in (0, 1, 2) and "Traceback" not in run.stderr, run.stderr
    return json.loads(run.stdout) if run.stdout else {"error": run.stderr}


def test_pdp_eval_with_a_jwks_checks_an_audience_too(tmp_path: Path) -> None:
    """`--jwks` alone used to verify the token's signature and accept any audience (its claims
    then reached the policies). It now verifies with the organization's own issuer and audience
    (or --issuer and --audience), and refuses an organization without `tokens:` (example acme),
    whose tokens the server never verifies."""
    keys = tmp_path / "jwks.json"
    keys.write_text(jwks(KEY))
    policies = ("--policies", str(examples_verifying_tokens(tmp_path)))
    foreign = KEY.sign(**claims(aud="billing-service", client_id="pr-reviewer"))
    ours = KEY.sign(**claims(client_id="pr-reviewer"))
    unverifying = _pdp_eval(ours, "--jwks", str(keys), "--issuer", ISSUER, "--audience", AUDIENCE)
    assert "organization 'acme' has no 'tokens:' section" in unverifying["error"]
    alone = _pdp_eval(foreign, "--jwks", str(keys), *policies)
    assert alone["decision"] == "DENY" and "wrong audience" in alone["reasons"][0]["message"]
    assert _pdp_eval(ours, "--jwks", str(keys), *policies)["decision"] == "ALLOW"
    # The organization's own issuer and audience may be named; no other (the server checks
    # for its own: another would allow `foreign` here, which the server refuses).
    named = ("--jwks", str(keys), "--issuer", ISSUER, "--audience", AUDIENCE)
    assert _pdp_eval(ours, *named, *policies)["decision"] == "ALLOW"
    other = _pdp_eval(foreign, "--jwks", str(keys), "--audience", "billing-service", *policies)
    assert "--audience 'billing-service' is not organization 'acme''s own" in other["error"]
    wrong_issuer = _pdp_eval(ours, "--jwks", str(keys), "--issuer", "x", *policies)
    assert "--issuer 'x' is not organization 'acme''s own" in wrong_issuer["error"]
    other_issuer = KEY.sign(**claims(client_id="pr-reviewer", iss="x"))
    wrong = _pdp_eval(other_issuer, "--jwks", str(keys), *policies)
    assert wrong["decision"] == "DENY" and "wrong issuer" in wrong["reasons"][0]["message"]
    assert "--audience and --issuer apply only with --jwks" in _pdp_eval(
        ours, "--audience", AUDIENCE
    ).get("error", "")


# --- 2. caller auth needs an audience and an issuer ----------------------------------------

BROKER = rsa_key("broker-idp")
CALLER_AUDIENCE = "pdp"
CALLER_ISSUER = "https://broker-idp.test"
ALICE = check_request(
    "acme", "alice", "pr-reviewer", "github", "repo", subject_attributes={"groups": ["engineering"]}
)


def _caller_keys(tmp_path: Path) -> str:
    path = tmp_path / "callers.jwks"
    path.write_text(jwks(BROKER))
    return str(path)


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({}, ["caller_auth.audience", "caller_auth.issuer"]),
        ({"AUDIENCE": CALLER_AUDIENCE}, ["caller_auth.issuer"]),
        ({"ISSUER": CALLER_ISSUER}, ["caller_auth.audience"]),
        ({"AUDIENCE": " ", "ISSUER": CALLER_ISSUER}, ["caller_auth.audience"]),
    ],
)
def test_caller_auth_without_audience_or_issuer_is_a_settings_error(
    tmp_path: Path, given: dict[str, str], missing: list[str]
) -> None:
    """Before: only `jwks_file` loaded, and any token those keys signed for any other service
    authenticated as the broker."""
    environ = {"PDP_CALLER_AUTH__JWKS_FILE": _caller_keys(tmp_path)}
    environ.update({f"PDP_CALLER_AUTH__{name}": value for name, value in given.items()})
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=environ)
    message = str(raised.value)
    for name in missing:
        assert f"setting {name}: required with caller_auth.jwks_file" in message
    assert len(message.splitlines()) == len(missing)
    # Complete, it loads; without jwks_file nothing is required.
    complete = {
        **environ,
        "PDP_CALLER_AUTH__AUDIENCE": CALLER_AUDIENCE,
        "PDP_CALLER_AUTH__ISSUER": CALLER_ISSUER,
    }
    assert load_settings(environ=complete).caller_auth.audience == CALLER_AUDIENCE
    assert load_settings(environ={}).caller_auth.jwks_file == ""


def test_a_server_with_caller_auth_but_no_audience_does_not_start(tmp_path: Path) -> None:
    settings = Settings(
        address="127.0.0.1:0",
        docs_base_url=DOCS,
        caller_auth=CallerAuthSettings(jwks_file=_caller_keys(tmp_path)),
    )
    servicer = PolicyDecisionServicer(lambda: load_policy_set(EXAMPLE_POLICIES), settings)
    with pytest.raises(ConfigError, match=r"caller_auth\.audience"):
        build_server(servicer, settings, policy_ready=True)


def _broker_token(**changes: Any) -> str:
    issued = int(time.time())
    token = {
        "sub": "broker",
        "aud": CALLER_AUDIENCE,
        "iss": CALLER_ISSUER,
        "iat": issued,
        "exp": issued + 300,
        **changes,
    }
    return BROKER.sign(**{k: v for k, v in token.items() if v is not ...})


def test_a_grpc_server_refuses_callers_tokens_minted_for_others(tmp_path: Path) -> None:
    settings = Settings(
        address="127.0.0.1:0",
        docs_base_url=DOCS,
        caller_auth=CallerAuthSettings(
            jwks_file=_caller_keys(tmp_path), audience=CALLER_AUDIENCE, issuer=CALLER_ISSUER
        ),
    )
    servicer = PolicyDecisionServicer(lambda: load_policy_set(EXAMPLE_POLICIES), settings)
    grpc_server, port = build_server(servicer, settings, policy_ready=True)
    grpc_server.start()
    try:
        target = f"127.0.0.1:{port}"
        for token, why in [
            (_broker_token(aud="billing-service"), "InvalidAudience"),
            (_broker_token(iss="https://other-idp.test"), "InvalidIssuer"),
            (_broker_token(aud=...), "MissingRequiredClaim"),
            (_broker_token(iss=...), "MissingRequiredClaim"),
        ]:
            with PdpClient(target, bearer_token=token, insecure_bearer=True) as client:
                with pytest.raises(grpc.RpcError) as refused:
                    client.check(ALICE)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert why in refused.value.details()
        with PdpClient(target, bearer_token=_broker_token(), insecure_bearer=True) as client:
            assert client.decide(ALICE).allowed
    finally:
        grpc_server.stop(grace=None)


# --- 3. organizations trusting one issuer for one audience ---------------------------------


def test_two_organizations_sharing_issuer_and_audience_are_a_load_error(tmp_path: Path) -> None:
    """Before: both loaded, and acme accepted a token the IdP minted for globex's alice."""
    root = write_org(tmp_path / "a", "acme", issuer=ISSUER, audience=AUDIENCE)
    write_org(root, "globex", issuer=ISSUER, audience=AUDIENCE)
    errors = load_errors(root)
    assert "organizations 'acme' and 'globex'" in errors
    assert f"issuer {ISSUER!r}" in errors and f"audience {AUDIENCE!r}" in errors
    assert "organization_claim" in errors
    # One binding is not enough: the other still accepts the first's tokens.
    root = write_org(tmp_path / "c", "acme", issuer=ISSUER, audience=AUDIENCE)
    write_org(root, "globex", issuer=ISSUER, audience=AUDIENCE, organization_claim="org_id")
    assert "organizations 'acme' and 'globex'" in load_errors(root)
    # Their own audiences, or other issuers, or both bound: no conflict.
    for folder, acme, globex in [
        ("d", {"audience": "acme-pdp"}, {"audience": "globex-pdp"}),
        ("e", {"issuer": ISSUER}, {"issuer": "https://idp.globex.test"}),
        ("f", {"organization_claim": "org_id"}, {"organization_claim": "tenant"}),
    ]:
        root = write_org(
            tmp_path / folder, "acme", **{"issuer": ISSUER, "audience": AUDIENCE, **acme}
        )
        write_org(root, "globex", **{"issuer": ISSUER, "audience": AUDIENCE, **globex})
        assert set(load_policy_set(root).organizations) == {"acme", "globex"}


def test_many_organizations_sharing_are_reported_in_bounded_lines(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    for index in range(25):
        write_org(root, f"org{index:02d}", issuer=ISSUER, audience=AUDIENCE)
    errors = load_errors(root)
    assert errors.count("verify tokens from issuer") == 20
    assert "and 280 more pairs of organizations" in errors  # 25 * 24 / 2 = 300 pairs
    # All bound: one set, loaded.
    bound = tmp_path / "bound"
    for index in range(25):
        write_org(
            bound, f"org{index:02d}", issuer=ISSUER, audience=AUDIENCE, organization_claim="org"
        )
    assert len(load_policy_set(bound).organizations) == 25


def test_rules_binding_an_organization_claim_but_naming_none_accept_no_token() -> None:
    rules = TokenRules(
        keys=StaticKeySet(parse_jwks(jwks(KEY))),
        issuer=ISSUER,
        audience=AUDIENCE,
        organization_claim="org",
    )
    check = check_token(KEY.sign(**claims(org="")), now(), rules, "alice", application_id="app")
    assert check.problem is not None and "'org' claim does not name" in check.problem


def _check(stub: Any, org: str, token: str) -> pdp_pb2.CheckResponse:
    return stub.Check(  # type: ignore[no-any-return]
        pdp_pb2.CheckRequest(
            organization=org,
            subject=pdp_pb2.Subject(id="alice", kind=pdp_pb2.SUBJECT_KIND_USER, access_token=token),
            application=pdp_pb2.Application(id="app"),
            integration=pdp_pb2.Integration(id="github"),
            scope="repo",
        ),
        timeout=10,
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RunningServer, Any, Path]]:
    """A real server for `tmp_path/policies` (acme and globex, both binding `org_id`), its
    stub and the policy folder; reloads only when asked."""
    root = write_org(
        tmp_path / "policies", "acme", issuer=ISSUER, audience=AUDIENCE, organization_claim="org_id"
    )
    write_org(root, "globex", issuer=ISSUER, audience=AUDIENCE, organization_claim="org_id")
    running = start_server(
        Settings(address="127.0.0.1:0", policy_dir=root, metrics_address="", docs_base_url=DOCS)
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pdp_pb2_grpc.PolicyDecisionServiceStub(channel), root
    finally:
        running.stop(grace=None)


def test_the_organization_claim_binds_tokens_through_grpc(
    served: tuple[RunningServer, Any, Path],
) -> None:
    _, stub, _ = served
    for_acme = KEY.sign(**claims(org_id="acme"))
    assert _check(stub, "acme", for_acme).effect == pdp_pb2.EFFECT_ALLOW
    for_globex = KEY.sign(**claims(org_id="globex"))
    assert _check(stub, "globex", for_globex).effect == pdp_pb2.EFFECT_ALLOW
    for org, token, why in [
        ("acme", for_globex, "'org_id' claim does not name organization 'acme'"),
        ("globex", for_acme, "'org_id' claim does not name organization 'globex'"),
        ("acme", KEY.sign(**claims()), "no 'org_id' claim"),
        ("acme", KEY.sign(**claims(org_id=["acme"])), "'org_id' claim does not name"),
        ("acme", KEY.sign(**claims(org_id="ACME")), "'org_id' claim does not name"),
    ]:
        answer = _check(stub, org, token)
        assert answer.effect == pdp_pb2.EFFECT_DENY
        assert [r.code for r in answer.reasons] == [AUTHORIZATION_REQUIRED]
        assert why in answer.reasons[0].message
        assert token not in answer.reasons[0].message


def _status(running: RunningServer) -> pdp_pb2.GetStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        return pdp_pb2_grpc.PolicyStatusServiceStub(channel).GetStatus(  # type: ignore[no-any-return]
            pdp_pb2.GetStatusRequest(), timeout=10
        )


def test_a_reload_adding_an_unbound_organization_keeps_the_last_good_set(
    served: tuple[RunningServer, Any, Path],
) -> None:
    running, stub, root = served
    good = _status(running).revision
    write_org(root, "initech", issuer=ISSUER, audience=AUDIENCE)  # binds nothing
    attempts = running.store.status().attempts if running.store else 0
    running.reload("SIGHUP")
    wait_for(
        lambda: running.store is not None and running.store.status().attempts > attempts,
        timeout=15,
        what="the reload attempt",
    )
    status = _status(running)
    assert status.revision == good and not status.last_reload_ok
    assert "organizations 'acme' and 'initech'" in status.last_error
    assert "organizations 'globex' and 'initech'" in status.last_error
    assert _check(stub, "acme", KEY.sign(**claims(org_id="acme"))).effect == pdp_pb2.EFFECT_ALLOW
    assert _check(stub, "initech", KEY.sign(**claims())).effect == pdp_pb2.EFFECT_DENY


# --- 4. discovery fetches keys from the issuer's own origin --------------------------------


@pytest.fixture
def sites() -> Iterator[tuple[Site, Site]]:
    """The issuer's site, and an "internal" one on another port the PDP must not reach."""
    issuer, internal = Site(), Site()
    yield issuer, internal
    issuer.close()
    internal.close()


def _publish_elsewhere(issuer: Site, internal: Site, keys: SigningKey = KEY) -> str:
    """The issuer's RFC 8414 metadata names a jwks_uri on `internal`, which serves keys."""
    jwks_uri = internal.base + "/keys"
    issuer.answers[OAUTH + TENANT] = json.dumps(
        {"issuer": issuer.issuer, "jwks_uri": jwks_uri}
    ).encode()
    internal.answers["/keys"] = jwks(keys).encode()
    return jwks_uri


def _jwks_detail(channel: grpc.Channel) -> pdp_pb2.ComponentStatus:
    stub = pdp_pb2_grpc.PolicyStatusServiceStub(channel)
    status = stub.GetStatus(pdp_pb2.GetStatusRequest(), timeout=10)
    return next(c for c in status.components if c.name == "jwks")


def _discovery_token(issuer: str, key: SigningKey = KEY) -> str:
    issued = int(time.time())
    return key.sign(
        sub="alice", iss=issuer, aud=AUDIENCE, iat=issued, exp=issued + 600, client_id="pr-reviewer"
    )


def _discovery_check(stub: Any, token: str) -> pdp_pb2.CheckResponse:
    from tests.cache.support import tuple_request

    msg = tuple_request()
    msg.organization = "acme"
    msg.subject.access_token = token
    return stub.Check(msg, timeout=10)  # type: ignore[no-any-return]


def test_a_jwks_uri_on_another_host_is_never_fetched_through_grpc(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    """Before: the PDP fetched the internal URL, and tokens signed with what it served were
    allowed."""
    issuer, internal = sites
    jwks_uri = _publish_elsewhere(issuer, internal)
    root = discovery_dir(tmp_path / "policies", issuer=issuer.issuer, discovery="oauth")
    with pdp_server(root) as (channel, stub):
        wait_for(
            lambda: "failing" in _jwks_detail(channel).detail,
            timeout=15,
            what="the refused discovery",
        )
        component = _jwks_detail(channel)
        assert component.state == "degraded" and component.ready
        assert f"jwks_uri {jwks_uri!r} is refused" in component.detail
        assert "tokens.jwks_hosts" in component.detail
        answer = _discovery_check(stub, _discovery_token(issuer.issuer))
        assert answer.effect == pdp_pb2.EFFECT_DENY
        assert "signing keys are not available" in answer.reasons[0].message
    assert sum(internal.hits.values()) == 0


def test_jwks_hosts_allow_a_jwks_uri_on_another_host(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    issuer, internal = sites
    jwks_uri = _publish_elsewhere(issuer, internal)
    host = internal.base.removeprefix("http://")  # 127.0.0.1:PORT
    root = discovery_dir(
        tmp_path / "policies", issuer=issuer.issuer, discovery="oauth", jwks_hosts=[host]
    )
    with pdp_server(root) as (channel, stub):
        wait_for(
            lambda: "ok," in _jwks_detail(channel).detail, timeout=15, what="the discovered keys"
        )
        assert f"jwks_uri {jwks_uri} from" in _jwks_detail(channel).detail
        answer = _discovery_check(stub, _discovery_token(issuer.issuer))
        assert (answer.effect, list(answer.reasons)) == (pdp_pb2.EFFECT_ALLOW, [])
    assert internal.hits["/keys"] >= 1


def test_a_refused_jwks_uri_is_escaped_and_cut_in_the_status(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    issuer, _ = sites
    hostile = "http://169.254.169.254/latest/meta-data/" + "a" * 300
    issuer.answers[OAUTH + TENANT] = json.dumps(
        {"issuer": issuer.issuer, "jwks_uri": hostile}
    ).encode()
    policies = load_policy_set(
        discovery_dir(tmp_path / "policies", issuer=issuer.issuer, discovery="oauth")
    )
    keys = acme_keys(policies)
    assert not keys.available
    detail = keys.describe(time.monotonic())[1]
    assert "'http://169.254.169.254/latest/meta-data/aaa" in detail
    assert "aaa... is refused" in detail
    assert "a" * 100 not in detail


@pytest.mark.parametrize(
    ("jwks_uri", "allowed"),
    [
        ("https://idp.example/keys", True),
        ("https://IDP.example:443/tenant/keys", True),  # the same origin, spelled otherwise
        ("http://idp.example/keys", False),  # a downgrade
        ("https://idp.example:6379/keys", False),
        ("https://localhost/keys", False),
        ("https://169.254.169.254/latest/meta-data/", False),
        ("https://idp.example@169.254.169.254/keys", False),  # user information
        ("https://idp.example\\@169.254.169.254/keys", False),
        ("https://idp.example.evil.test/keys", False),
        ("https://keys.idp.example/jwks", False),  # a subdomain is another host
    ],
)
def test_only_the_issuers_origin_is_fetched_without_jwks_hosts(
    jwks_uri: str, allowed: bool
) -> None:
    issuer = "https://idp.example/tenant"
    document = json.dumps({"issuer": issuer, "jwks_uri": jwks_uri}).encode()
    if allowed:
        assert parse_metadata(document, issuer) == jwks_uri
    else:
        with pytest.raises(DiscoveryError, match="is refused"):
            parse_metadata(document, issuer)


def test_jwks_hosts_entries_match_host_and_port_exactly() -> None:
    issuer = "https://idp.example"
    assert origin_problem("https://keys.idp.example/jwks", issuer, ("keys.idp.example",)) is None
    assert origin_problem("https://KEYS.idp.example:443/", issuer, ("keys.idp.example",)) is None
    assert origin_problem("https://keys.idp.example:8443/", issuer, ("keys.idp.example",))
    assert (
        origin_problem("https://keys.idp.example:8443/", issuer, ("keys.idp.example:8443",)) is None
    )
    assert origin_problem("https://[::1]:8443/", issuer, ("[::1]:8443",)) is None
    assert origin_problem("http://keys.idp.example/", issuer, ("keys.idp.example",))  # scheme
    assert origin_problem("https://169.254.169.254/", issuer, ("keys.idp.example",))


def test_jwks_hosts_that_cannot_be_used_are_load_errors(tmp_path: Path) -> None:
    for index, (tokens, error) in enumerate(
        [
            (
                {"jwks_url": "https://idp.example/jwks", "jwks_hosts": ["k.example"]},
                "'jwks_hosts' applies only to tokens naming no 'jwks_file' or 'jwks_url'",
            ),
            (
                {"issuer": "https://idp.example", "jwks_hosts": ["https://k.example"]},
                "jwks_hosts: 'https://k.example' is not a host name",
            ),
            (
                {"issuer": "https://idp.example", "jwks_hosts": ["k.example:70000"]},
                "a port from 1 to 65535",
            ),
            ({"issuer": "https://idp.example", "jwks_hosts": []}, "'jwks_hosts' must list 1 to"),
        ]
    ):
        root = discovery_dir(tmp_path / str(index), **tokens)
        errors = load_errors(root)
        assert "organization.yaml" in errors and error in errors


def test_discovered_sets_with_different_jwks_hosts_are_kept_apart(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    """One organization's allow list must not widen another's: each gets its own set."""
    issuer, internal = sites
    _publish_elsewhere(issuer, internal)
    root = discovery_dir(
        tmp_path / "policies",
        issuer=issuer.issuer,
        discovery="oauth",
        jwks_hosts=[internal.base.removeprefix("http://")],
    )
    config_file = root / "globex" / "organization.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["tokens"] = {
        "issuer": issuer.issuer,
        "audience": "globex-pdp",
        "discovery": "oauth",
    }
    config_file.write_text(yaml.safe_dump(config))
    policies = load_policy_set(root)
    acme, globex = (policies.organizations[org].tokens.keys for org in ("acme", "globex"))
    assert acme is not globex
    assert acme is not None and acme.available
    assert globex is not None and not globex.available
