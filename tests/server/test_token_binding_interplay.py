"""Token binding (organization_claim, issuer and audience, client_id) against external
identity mapping, RFC 8693 delegation and the decision cache, through a real gRPC server on
an ephemeral port with its in-process decision cache.

Two organizations trust one issuer for one audience and bind tokens with `org_id`. No cached
ALLOW may answer another organization, another token, or an external ID whose token names the
external ID instead of the person; an inner actor's `org_id` binds nothing (RFC 8693 section
4.1: `act` only describes who acts), it only reaches the policies in `subject.actors`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import Settings
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.service import PolicyDecisionServicer
from tests.auth.material import AUDIENCE, ISSUER, claims, ed_key, jwks
from tests.policy_builder import allow_all, write_organization
from tests.server.harness import running

KEY = ed_key("shared-idp")
SETTINGS = Settings()
MAPPING = {
    "kind": "IdentityMapping",
    "namespace": "partners",
    "applications": ["app"],
    "identities": {"partner-1": "alice"},
}
# Members only, and no agent of another organization acting for them.
ORG_POLICY = {
    "name": "org",
    "layer": "org",
    "rules": [
        {"name": "members", "effect": "allow", "condition": 'subject.claims.role == "member"'},
        {
            "name": "foreign-agents",
            "effect": "deny",
            "condition": 'subject.actors.exists(a, "org_id" in a && a.org_id != "acme")',
        },
    ],
}


def write_policies(root: Path) -> Path:
    for org in ("acme", "globex"):
        folder = write_organization(
            root, org, policies=[ORG_POLICY, allow_all("user"), allow_all("application")]
        )
        (folder / "partners.yaml").write_text(yaml.safe_dump(MAPPING))
        (folder / "jwks.json").write_text(jwks(KEY))
        config = yaml.safe_load((folder / "organization.yaml").read_text())
        tokens = {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_file": "jwks.json",
            "organization_claim": "org_id",
            "external_subject_claim": "ext_id",
        }
        (folder / "organization.yaml").write_text(yaml.safe_dump({**config, "tokens": tokens}))
    return root


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    return load_policy_set(write_policies(tmp_path_factory.mktemp("binding")))


@pytest.fixture(scope="module")
def stub(policies: CompiledPolicySet) -> Iterator[Any]:
    servicer = PolicyDecisionServicer(lambda: policies, SETTINGS)
    with running(servicer, SETTINGS) as channel:
        yield pdp_pb2_grpc.PolicyDecisionServiceStub(channel)


def check(
    org: str,
    token: str,
    subject: str = "alice",
    kind: Any = pdp_pb2.SUBJECT_KIND_USER,
    namespace: str = "",
) -> pdp_pb2.CheckRequest:
    return pdp_pb2.CheckRequest(
        organization=org,
        subject=pdp_pb2.Subject(id=subject, kind=kind, namespace=namespace, access_token=token),
        application=pdp_pb2.Application(id="app"),
        integration=pdp_pb2.Integration(id="github"),
        scope="repo",
    )


def answer(stub: Any, request: pdp_pb2.CheckRequest) -> tuple[str, bool, str]:
    response = stub.Check(request, timeout=10)
    effect = "ALLOW" if response.effect == pdp_pb2.EFFECT_ALLOW else "DENY"
    message = response.reasons[0].message if response.reasons else ""
    return effect, response.cached, message


def token(**extra: Any) -> str:
    return KEY.sign(**claims("alice", role="member", **extra))


def test_a_cached_allow_for_one_organization_never_answers_another(stub: Any) -> None:
    acme = token(org_id="acme")
    assert answer(stub, check("acme", acme))[:2] == ("ALLOW", False)
    assert answer(stub, check("acme", acme))[:2] == ("ALLOW", True)
    for _ in range(2):  # decided and then cached as a deny, never the acme allow
        effect, _, message = answer(stub, check("globex", acme))
        assert effect == "DENY" and "does not name organization 'globex'" in message
    globex = token(org_id="globex")
    assert answer(stub, check("globex", globex))[:2] == ("ALLOW", False)
    # Another token for the same request is decided on its own: no org claim, wrong org.
    for other in (token(), token(org_id="globex"), token(org_id=["acme"])):
        assert answer(stub, check("acme", other))[0] == "DENY"


def test_an_external_ids_token_must_name_the_person_not_the_external_id(stub: Any) -> None:
    kind = pdp_pb2.SUBJECT_KIND_EXTERNAL_USER
    person = token(org_id="acme", ext_id="partner-1")
    assert answer(stub, check("acme", person, "partner-1", kind))[0] == "ALLOW"
    assert answer(stub, check("acme", person, "partner-1", kind))[:2] == ("ALLOW", True)
    as_external = KEY.sign(**claims("partner-1", role="member", org_id="acme", ext_id="partner-1"))
    for _ in range(2):
        effect, _, message = answer(stub, check("acme", as_external, "partner-1", kind))
        assert effect == "DENY" and "not the person the external user ID maps to" in message
    # The person's token presented for another external ID, or for the person directly with
    # the mapping's namespace, is not the cached allow.
    assert answer(stub, check("acme", person, "partner-2", kind))[0] == "DENY"
    named = check("acme", person, namespace="partners")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Check(named, timeout=10)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_an_inner_actors_organization_binds_nothing_but_reaches_the_policies(stub: Any) -> None:
    inner_globex = {"sub": "agent:a", "act": {"sub": "agent:b", "org_id": "globex"}}
    # Bound to acme by its own org_id; the inner actor's org_id is no binding (so globex's
    # organization check does not accept it either) ...
    assert answer(stub, check("globex", token(org_id="acme", act=inner_globex)))[0] == "DENY"
    # ... and acme's own policy words, reading subject.actors, deny the foreign agent.
    effect, _, message = answer(stub, check("acme", token(org_id="acme", act=inner_globex)))
    assert effect == "DENY", message
    inner_acme = {"sub": "agent:a", "act": {"sub": "agent:b", "org_id": "acme"}}
    assert answer(stub, check("acme", token(org_id="acme", act=inner_acme)))[0] == "ALLOW"
    # An `act` naming the other organization at the top of the chain binds nothing either.
    assert answer(stub, check("globex", token(org_id="acme", act={"org_id": "globex"})))[0] == (
        "DENY"
    )
