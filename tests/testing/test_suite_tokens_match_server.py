"""`pdp test` decides a case's token as the server decides it, or it is a known divergence.

The same token (claims really signed with the suite's fixture key, PyJWT) goes through a
suite case and through a real gRPC server on an ephemeral port. For an organization without
`tokens:` the server verifies no token and shows policies none of its claims; `pdp test`
installs the suite's fixture keys (and an issuer and audience of its own) and verifies them,
so a case whose policy allows on a claim passes as ALLOW where the server answers DENY.

Known, not yet fixed: deciding such cases as the server does makes the example suite
(policies/acme/tests/acme.test.yaml) fail, because example acme has no `tokens:` yet its
suite tests token binding and delegation (agents.yaml can never match on the server). The
fix is to give example acme a `tokens:` section, which changes what several cache, import and
README tests send to acme (HS256 tokens read unverified). Strict xfail until then.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import Settings
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.service import PolicyDecisionServicer
from policy_engine.testing.runner import find_suites, run_suites
from tests.server.harness import running

ORGANIZATION = """\
kind: Organization
defaults: {org: deny, user: allow, application: allow}
catalog:
  integrations: [github]
  applications: [bot]
"""
POLICY = """\
kind: Policy
name: members
layer: org
rules:
  - name: members
    effect: allow
    condition: 'subject.claims.role == "member"'
"""
SUITE = """\
kind: TestSuite
name: claims
fixtures:
  keys:
    idp: {private_key_file: idp.pem, kid: k1}
cases:
  - name: a-member-by-claim
    subject: {id: alice}
    application: bot
    integration: github
    scope: repo
    token: {key: idp, claims: {role: member}}
    expect: {decision: deny}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suite-tokens") / "policies"
    folder = root / "acme"
    folder.mkdir(parents=True)
    (folder / "organization.yaml").write_text(ORGANIZATION)
    (folder / "org.yaml").write_text(POLICY)
    (folder / "claims.test.yaml").write_text(SUITE)
    key = ed25519.Ed25519PrivateKey.generate()
    (folder / "idp.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return root


@pytest.fixture(scope="module")
def policies(root: Path) -> CompiledPolicySet:
    return load_policy_set(root)


@pytest.fixture(scope="module")
def stub(policies: CompiledPolicySet) -> Iterator[Any]:
    settings = Settings()
    with running(PolicyDecisionServicer(lambda: policies, settings), settings) as channel:
        yield pdp_pb2_grpc.PolicyDecisionServiceStub(channel)


def test_the_server_reads_an_unverified_organizations_token_without_claims(
    root: Path, stub: Any
) -> None:
    key = serialization.load_pem_private_key((root / "acme" / "idp.pem").read_bytes(), None)
    now = int(datetime.now(UTC).timestamp())
    claims = {"sub": "alice", "iat": now, "exp": now + 600, "client_id": "bot", "role": "member"}
    token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "k1"})
    request = pdp_pb2.CheckRequest(
        organization="acme",
        subject=pdp_pb2.Subject(id="alice", access_token=token),
        application=pdp_pb2.Application(id="bot"),
        integration=pdp_pb2.Integration(id="github"),
        scope="repo",
    )
    assert stub.Check(request, timeout=10).effect == pdp_pb2.EFFECT_DENY


@pytest.mark.xfail(
    strict=True,
    reason="pdp test verifies fixture-key tokens for an organization without tokens: "
    "(see the module docstring)",
)
def test_pdp_test_decides_the_same_token_as_the_server(
    root: Path, policies: CompiledPolicySet, stub: Any
) -> None:
    outcome = run_suites(policies, find_suites(root))
    (result,) = outcome.results
    assert result.decision is not None
    assert result.decision.effect.value.upper() == "DENY", result.problems
    assert result.passed
