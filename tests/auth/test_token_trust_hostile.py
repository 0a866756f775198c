"""Hostile review of token trust: what a token minted for someone else, or a blank setting,
could still get through, found and fixed.

Real parts only: tokens signed with real keys (PyJWT), a real gRPC server on an ephemeral
port, real policy folders and the real `pdp` command line.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
import tomllib
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jwt
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement

from policy_engine.auth.discovery import origin_problem
from policy_engine.auth.keys import StaticKeySet, parse_jwks
from policy_engine.auth.tokens import TokenRules, check_token
from policy_engine.client import PdpClient
from policy_engine.config import CallerAuthSettings, ConfigError, Settings, load_settings
from policy_engine.policy import load_policy_set
from policy_engine.policy.loader import MAX_SHARED_TOKEN_ISSUES, _shared_token_audiences
from policy_engine.policy.model import Catalog, OrganizationConfig, Position, TokenSettings
from policy_engine.server.app import build_server
from policy_engine.server.security import BearerVerifier
from policy_engine.server.service import PolicyDecisionServicer
from tests.auth.material import AUDIENCE, ISSUER, claims, jwks, raw_token
from tests.auth.test_token_trust import (
    ALICE,
    BROKER,
    CALLER_AUDIENCE,
    CALLER_ISSUER,
    KEY,
    _broker_token,
    _caller_keys,
    _pdp_eval,
    load_errors,
    write_org,
)
from tests.scenarios import EXAMPLE_POLICIES
from tests.server.harness import DOCS

REPO = Path(__file__).resolve().parents[2]

# --- caller auth: the issuer is compared exactly, whatever PyJWT release is installed ------


def test_the_pyjwt_range_excludes_the_release_matching_issuers_as_substrings() -> None:
    """PyJWT 2.10.0 checked `iss` with `in` against a str issuer (CVE-2024-53861): a token
    whose `iss` is any substring of caller_auth.issuer (another tenant of the same IdP, or
    "") authenticated as the broker. Before: the server extra asked for pyjwt>=2.8."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [
        Requirement(line)
        for line in project["optional-dependencies"]["server"]
        if Requirement(line).name.lower() == "pyjwt"
    ]
    assert len(wanted) == 1
    assert not wanted[0].specifier.contains("2.10.0")
    assert wanted[0].specifier.contains(jwt.__version__)


@pytest.mark.parametrize(
    "issuer",
    [CALLER_ISSUER, CALLER_ISSUER + "/", "tenant", ""],
    ids=["prefix", "slash", "part", "empty"],
)
def test_a_caller_token_whose_issuer_is_part_of_ours_is_refused(
    tmp_path: Path, issuer: str
) -> None:
    """Caller auth configured for a tenant's issuer: a token the same keys signed for another
    tenant, whose issuer is a substring of ours, is UNAUTHENTICATED (PyJWT 2.10.0 let it in;
    the verifier now compares `iss` itself)."""
    settings = Settings(
        address="127.0.0.1:0",
        docs_base_url=DOCS,
        caller_auth=CallerAuthSettings(
            jwks_file=_caller_keys(tmp_path),
            audience=CALLER_AUDIENCE,
            issuer=CALLER_ISSUER + "/tenant-a",
        ),
    )
    servicer = PolicyDecisionServicer(lambda: load_policy_set(EXAMPLE_POLICIES), settings)
    grpc_server, port = build_server(servicer, settings, policy_ready=True)
    grpc_server.start()
    try:
        target = f"127.0.0.1:{port}"
        foreign = _broker_token(iss=issuer)
        with (
            PdpClient(target, bearer_token=foreign, insecure_bearer=True) as client,
            pytest.raises(grpc.RpcError) as refused,
        ):
            client.check(ALICE)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "InvalidIssuer" in str(refused.value.details())
        ours = _broker_token(iss=CALLER_ISSUER + "/tenant-a", aud=["other", CALLER_AUDIENCE])
        with PdpClient(target, bearer_token=ours, insecure_bearer=True) as client:
            assert client.decide(ALICE).allowed
    finally:
        grpc_server.stop(grace=None)


# --- a blank issuer or audience names none ---------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "audience", "missing"),
    [("", AUDIENCE, "issuer"), (ISSUER, "", "audience"), ("  ", "  ", "issuer")],
)
def test_rules_with_a_blank_issuer_or_audience_accept_no_token(
    issuer: str, audience: str, missing: str
) -> None:
    """A hand-built `TokenRules` (pdp eval builds one from --issuer/--audience) with a blank
    issuer or audience: before, a token whose `iss` and `aud` were blank too was accepted and
    its claims shown to the policies."""
    keys = StaticKeySet(parse_jwks(jwks(KEY)))
    token = raw_token(json.dumps(claims(iss=issuer, aud=audience)), KEY)
    check = check_token(
        token,
        datetime.now(UTC),
        TokenRules(keys=keys, issuer=issuer, audience=audience),
        "alice",
        application_id="app",
    )
    assert check.problem is not None and f"name no {missing}" in check.problem
    assert not check.claims


@pytest.mark.parametrize("blank", ["", "   ", " kontext-broker"])
def test_pdp_eval_refuses_a_blank_audience_or_issuer(tmp_path: Path, blank: str) -> None:
    """Before: `pdp eval --jwks K --issuer "" --audience ""` answered ALLOW for a token whose
    `iss` and `aud` were "" (a token for no one in particular)."""
    keys = tmp_path / "jwks.json"
    keys.write_text(jwks(KEY))
    token = KEY.sign(**claims(client_id="pr-reviewer", aud=blank, iss=blank))
    for flags in (
        ("--issuer", blank, "--audience", AUDIENCE),
        ("--issuer", ISSUER, "--audience", blank),
    ):
        answer = _pdp_eval(token, "--jwks", str(keys), *flags)
        assert "decision" not in answer
        assert "must be a non-empty value without surrounding spaces" in answer["error"]


# --- discovery: jwks_hosts and internationalized names ---------------------------------------


@pytest.mark.parametrize(
    "jwks_uri",
    [
        "https://xn--bcher-kva.example/keys",
        "https://bücher.example/keys",
        "https://BÜCHER.example/k",
    ],
)
def test_a_jwks_hosts_entry_in_idna_form_allows_its_host(jwks_uri: str) -> None:
    """`tokens.jwks_hosts` entries are ASCII (an internationalized name in its IDNA form):
    before, httpx's Unicode `host` was compared, so such an entry never matched and the
    issuer's keys could not be fetched at all."""
    assert origin_problem(jwks_uri, ISSUER, ("xn--bcher-kva.example",)) is None
    assert origin_problem(jwks_uri, "https://xn--bcher-kva.example") is None
    refused = origin_problem(jwks_uri, ISSUER, ("xn--bcher-kvb.example", "bucher.example"))
    assert refused is not None and "tokens.jwks_hosts" in refused


# --- caller auth meant but off ------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        (
            {"PDP_CALLER_AUTH__AUDIENCE": "pdp", "PDP_CALLER_AUTH__ISSUER": CALLER_ISSUER},
            ["caller_auth.audience", "caller_auth.issuer"],
        ),
        (
            {"PDP_CALLER_AUTH__JWKS_FILE": "", "PDP_CALLER_AUTH__ISSUER": "x"},
            ["caller_auth.issuer"],
        ),
        ({"PDP_CALLER_AUTH__JWKS_FILE": "   "}, ["caller_auth.jwks_file"]),
        (
            {
                "PDP_CALLER_AUTH__JWKS_FILE": " \t",
                "PDP_CALLER_AUTH__AUDIENCE": "pdp",
                "PDP_CALLER_AUTH__ISSUER": CALLER_ISSUER,
            },
            ["caller_auth.jwks_file"],
        ),
    ],
)
def test_caller_auth_meant_but_without_keys_is_a_settings_error(
    tmp_path: Path, environ: dict[str, str], named: list[str]
) -> None:
    """Before: an empty (or blank) jwks_file beside an audience or issuer loaded, `pdp config
    check` said the settings were fine, and the server answered every caller without a
    token (blank: it refused to start only once serving was under way)."""
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=environ)
    message = str(raised.value)
    assert [line.split(":")[0] for line in message.splitlines()] == [
        f"setting {name}" for name in named
    ]
    assert CALLER_ISSUER not in message  # values may be secrets: never quoted
    checked = subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", "config", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PDP_")}, **environ},
    )
    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    assert all(name in checked.stderr for name in named), checked.stderr
    # No caller auth at all is still allowed.
    assert load_settings(environ={}).caller_auth.jwks_file == ""


# --- organizations sharing issuer and audience: found without building every pair -----------


def _config(name: str, issuer: str | None, audience: str, bound: bool) -> OrganizationConfig:
    return OrganizationConfig(
        name=name,
        defaults={},
        catalog=Catalog(frozenset(), frozenset()),
        position=Position(Path(f"/policies/{name}/organization.yaml"), 1),
        tokens=TokenSettings(
            issuer=issuer,
            audience=audience,
            jwks_file="jwks.json",
            organization_claim="org_id" if bound else None,
            line=7,
        ),
    )


def _every_sharing_pair(configs: list[OrganizationConfig]) -> list[tuple[str, str]]:
    """The oracle: every pair, looked at one by one."""
    found = []
    for one, other in itertools.combinations(configs, 2):
        a, b = one.tokens, other.tokens
        assert a is not None and b is not None
        if a.audience != b.audience:
            continue
        if a.issuer is not None and b.issuer is not None and a.issuer != b.issuer:
            continue
        if a.organization_claim and b.organization_claim:
            continue
        found.append(tuple(sorted((one.name, other.name))))
    return sorted(found)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([None, "https://a.test", "https://b.test"]),
            st.sampled_from(["pdp", "crm"]),
            st.booleans(),
        ),
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
@settings(max_examples=300, deadline=None)
def test_shared_issuer_and_audience_pairs_are_those_of_every_pair(
    orgs: list[tuple[str | None, str, bool]], order: random.Random
) -> None:
    """The grouped search reports the same first pairs, and counts the same rest, as
    comparing every pair of organizations does."""
    configs = [_config(f"org{i:02d}", *org) for i, org in enumerate(orgs)]
    order.shuffle(configs)
    pairs = _every_sharing_pair(configs)
    issues = _shared_token_audiences(configs)
    shown = [
        m.group(1, 2)
        for i in issues
        if (m := re.match(r"organizations '(\w+)' and '(\w+)'", i.message))
    ]
    assert shown == pairs[:MAX_SHARED_TOKEN_ISSUES]
    rest = len(pairs) - MAX_SHARED_TOKEN_ISSUES
    assert len(issues) == len(shown) + (rest > 0)
    if rest > 0:
        assert issues[-1].message.startswith(f"and {rest} more pairs of organizations")


def test_a_thousand_organizations_sharing_unbound_are_found_without_every_pair() -> None:
    """Before: every one of the 499,500 pairs was built as an issue before 20 were kept
    (a policy set written before audiences were compared: minutes and GiBs at every load
    and reload for a few thousand organizations). Memory, not time, is measured."""
    configs = [_config(f"org{i:04d}", ISSUER, AUDIENCE, bound=i % 2 == 0) for i in range(1000)]
    tracemalloc.start()
    try:
        issues = _shared_token_audiences(configs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"
    everyone, bound = 1000 * 999 // 2, 500 * 499 // 2
    assert issues[-1].message.startswith(f"and {everyone - bound - 20} more pairs")
    assert "organizations 'org0000' and 'org0001'" in issues[0].message


@pytest.mark.parametrize(
    "issuer", ["https://user:secret@idp.test", "https://idp.test:99999", "https://idp.test:0"]
)
def test_an_issuer_with_user_information_or_no_usable_port_is_a_load_error(
    tmp_path: Path, issuer: str
) -> None:
    """Before: it loaded; its metadata was fetched with the credentials (shown in every
    status line) or never at all, and every jwks_uri was refused as if it were at fault."""
    root = write_org(tmp_path, "acme", issuer=ISSUER, audience=AUDIENCE)
    config_file = root / "acme" / "organization.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["tokens"] = {"issuer": issuer, "audience": AUDIENCE}
    config_file.write_text(yaml.safe_dump(config))
    errors = load_errors(root)
    assert "without user information and with a port from 1 to 65535" in errors
    refused = origin_problem("https://idp.test:65536/keys", "https://idp.test")
    assert refused is not None and "port from 1 to 65535" in refused


@pytest.mark.parametrize(
    "times",
    ['"exp": "99999999999"', '"exp": 99999999999, "nbf": "1"', '"exp": 9999999999, "iat": "1"'],
)
def test_a_caller_token_whose_times_are_strings_is_refused(tmp_path: Path, times: str) -> None:
    """RFC 7519 section 2: a NumericDate is a JSON number. Before: PyJWT read a string `exp`
    through int(), the token authenticated and was remembered until the year 5138."""
    verifier = BearerVerifier(
        CallerAuthSettings(
            jwks_file=_caller_keys(tmp_path), audience=CALLER_AUDIENCE, issuer=CALLER_ISSUER
        )
    )
    ours = f'"sub": "broker", "aud": "{CALLER_AUDIENCE}", "iss": "{CALLER_ISSUER}"'
    problem = verifier.problem("Bearer " + raw_token(f"{{{ours}, {times}}}", BROKER))
    assert problem is not None and "is not a number" in problem
    fine = raw_token(f'{{{ours}, "exp": 9999999999, "nbf": 1, "iat": 1.5}}', BROKER)
    assert verifier.problem("Bearer " + fine) is None


def test_a_server_built_with_an_audience_but_no_caller_keys_does_not_start() -> None:
    """Settings built directly (not by the loader, which refuses them): before, the server
    started without the interceptor and answered every caller without a token."""
    settings = Settings(
        address="127.0.0.1:0",
        docs_base_url=DOCS,
        caller_auth=CallerAuthSettings(audience=CALLER_AUDIENCE, issuer=CALLER_ISSUER),
    )
    servicer = PolicyDecisionServicer(lambda: load_policy_set(EXAMPLE_POLICIES), settings)
    with pytest.raises(ConfigError, match=r"caller_auth\.audience: applies only with"):
        build_server(servicer, settings, policy_ready=True)
