"""`pdp eval --token` decides what the server decides for the same token, or refuses.

The same request, with a token really signed (PyJWT), goes through `pdp eval --json` (a real
subprocess) and through the broker's client to a real gRPC server on an ephemeral port. The
server verifies tokens only for an organization with `tokens:`; for one without, it reads them
for structure and time only and shows policies none of their claims. A dry run given a JWKS
for such an organization used to verify its tokens anyway and answer ALLOW on claims where
the server answers DENY: it now refuses, saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from policy_engine.api import pdp_pb2
from policy_engine.client import PdpClient, check_request
from tests.auth.material import AUDIENCE, ISSUER, SigningKey, claims, ed_key, jwks
from tests.cli.support import serving_client
from tests.policy_builder import allow_all, write_organization

KEY = ed_key("idp-1")
FETCHED_ISSUER = "https://idp.fetched.test"  # one issuer and audience per organization
# Allowed only for a token whose verified claims put the subject among the admins.
ADMINS_ONLY = {
    "name": "org",
    "layer": "org",
    "rules": [
        {"name": "admins", "effect": "allow", "condition": '"admins" in subject.claims.groups'}
    ],
}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("policies")
    fetched = "https://idp.invalid/jwks.json"  # never fetched: --jwks stands in for it
    for org, tokens in (
        ("signed", {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"}),
        ("fetched", {"issuer": FETCHED_ISSUER, "audience": AUDIENCE, "jwks_url": fetched}),
        ("plain", None),
    ):
        folder = write_organization(
            root, org, policies=[ADMINS_ONLY, allow_all("user"), allow_all("application")]
        )
        if tokens is not None:
            (folder / "jwks.json").write_text(jwks(KEY))
            config = yaml.safe_load((folder / "organization.yaml").read_text())
            (folder / "organization.yaml").write_text(yaml.safe_dump({**config, "tokens": tokens}))
    (root.parent / f"{root.name}-operator.jwks").write_text(jwks(KEY))
    return root


@pytest.fixture(scope="module")
def client(policy_dir: Path) -> Iterator[PdpClient]:
    """The broker's client, connected to a real server on an ephemeral port."""
    with serving_client(policy_dir) as pdp:
        yield pdp


def server_effect(client: PdpClient, org: str, token: str) -> str:
    request = check_request(org, "alice", "app", "github", "repo", access_token=token)
    return "ALLOW" if client.check(request).effect == pdp_pb2.EFFECT_ALLOW else "DENY"


def pdp_eval(policy_dir: Path, org: str, token: str, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "policy_engine.cli.main", "eval", "--policies", str(policy_dir),
        "--org", org, "--subject", "alice", "--application", "app",
        "--integration", "github", "--scope", "repo", "--token", token, "--json", *extra,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def admins_token(key: SigningKey = KEY) -> str:
    return key.sign(**claims("alice", groups=["admins"]))


def test_a_verified_organization_gets_the_servers_answer(
    policy_dir: Path, client: PdpClient
) -> None:
    token = admins_token()
    assert server_effect(client, "signed", token) == "ALLOW"
    result = pdp_eval(policy_dir, "signed", token)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["decision"] == "ALLOW"
    # A token of another key: the server refuses it, and so does the dry run, which used to
    # verify it with the operator's JWKS instead of the organization's own jwks_file.
    other_key = ed_key("idp-1")  # same kid, another key
    stranger = admins_token(other_key)
    assert server_effect(client, "signed", stranger) == "DENY"
    result = pdp_eval(policy_dir, "signed", stranger)
    assert result.returncode == 0 and json.loads(result.stdout)["decision"] == "DENY"
    stranger_jwks = policy_dir.parent / f"{policy_dir.name}-stranger.jwks"
    stranger_jwks.write_text(jwks(other_key))
    result = pdp_eval(policy_dir, "signed", stranger, "--jwks", str(stranger_jwks))
    assert result.returncode == 2, result.stdout
    assert "organization 'signed' verifies its tokens with its own jwks_file" in result.stderr


def test_an_organization_without_tokens_is_never_decided_on_claims_the_server_never_shows(
    policy_dir: Path, client: PdpClient
) -> None:
    token = admins_token()
    # The server reads the token unverified: no claims, so the admins rule cannot match.
    assert server_effect(client, "plain", token) == "DENY"
    result = pdp_eval(policy_dir, "plain", token)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["decision"] == "DENY"
    # With the operator's JWKS and an issuer and audience it used to verify the token and
    # answer ALLOW: now it refuses, naming why, and decides nothing.
    jwks_file = policy_dir.parent / f"{policy_dir.name}-operator.jwks"
    for extra in (
        ("--jwks", str(jwks_file), "--audience", AUDIENCE, "--issuer", ISSUER),
        ("--jwks", str(jwks_file)),
    ):
        result = pdp_eval(policy_dir, "plain", token, *extra)
        assert result.returncode == 2, result.stdout
        assert result.stdout == ""
        assert "organization 'plain' has no 'tokens:' section" in result.stderr
        assert "Traceback" not in result.stderr


def test_another_audience_or_issuer_than_the_organizations_is_refused(
    policy_dir: Path, client: PdpClient
) -> None:
    """The server checks an organization's own issuer and audience: a token for another
    audience is denied (shown on `signed`; `fetched` has the same settings but keys the server
    would fetch, for which --jwks stands in). A dry run told to check another audience or
    issuer used to allow it."""
    foreign = KEY.sign(**claims("alice", groups=["admins"], aud="billing"))
    assert server_effect(client, "signed", foreign) == "DENY"
    assert server_effect(client, "signed", admins_token()) == "ALLOW"
    jwks_file = policy_dir.parent / f"{policy_dir.name}-operator.jwks"
    foreign = KEY.sign(**claims("alice", groups=["admins"], aud="billing", iss=FETCHED_ISSUER))
    result = pdp_eval(policy_dir, "fetched", foreign, "--jwks", str(jwks_file))
    assert result.returncode == 0 and json.loads(result.stdout)["decision"] == "DENY"
    for extra in (("--audience", "billing"), ("--issuer", "https://other.test")):
        result = pdp_eval(policy_dir, "fetched", foreign, "--jwks", str(jwks_file), *extra)
        assert result.returncode == 2, result.stdout
        assert f"{extra[0]} {extra[1]!r} is not organization 'fetched''s own" in result.stderr
    same = ("--audience", AUDIENCE, "--issuer", FETCHED_ISSUER)
    ours = KEY.sign(**claims("alice", groups=["admins"], iss=FETCHED_ISSUER))
    result = pdp_eval(policy_dir, "fetched", ours, "--jwks", str(jwks_file), *same)
    assert result.returncode == 0 and json.loads(result.stdout)["decision"] == "ALLOW"
