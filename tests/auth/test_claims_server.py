"""A property test over claim values through the real gRPC server (issue 9, item 7).

Whatever a token's claims hold (NaN, infinities, numbers past any range, wrong types, unpaired
surrogates, nesting) in exp/nbf/iat/iss/aud/sub/the external-subject claim or in claims shown to
CEL, no answer is `kontext_server_error`: a malformed claims set is a deny with
`kontext_authorization_required` naming the claim. Two organizations: `signed` verifies tokens
with a test key (`tokens:`), `plain` has no `tokens:` and reads them unverified. The server
audits every decision: the records must be written, schema-valid and chained.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit import AuditLog
from policy_engine.auth.tokens import MAX_ACTORS, MAX_NUMERIC_DATE
from policy_engine.config import Settings
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.server.service import PolicyDecisionServicer
from tests.audit.support import assert_audited_intact, module_audit_log
from tests.auth.material import AUDIENCE, ISSUER, jwks, raw_token, rsa_key
from tests.policy_builder import allow_all, write_organization
from tests.server.harness import running

KEY = rsa_key("rsa-1")
SETTINGS = Settings()
PROPERTY = settings(
    max_examples=int(os.environ.get("PDP_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CLAIM_RULES = [
    {
        "name": "level-cap",
        "effect": "deny",
        "condition": '"level" in subject.claims && subject.claims.level > 100',
    },
    {
        "name": "admins",
        "effect": "allow",
        "condition": '"admins" in subject.claims.groups || subject.claims.nested.a == 1 '
        "|| size(subject.claims) > 8",
    },
]


def write_policies(root: Path) -> Path:
    for org, tokens in (
        ("signed", {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json",
                    "external_subject_claim": "external_id"}),
        ("plain", None),
    ):  # fmt: skip
        folder = write_organization(
            root,
            org,
            policies=[
                # Claims reach CEL only when verified: the plain organization allows outright.
                {"name": "org", "layer": "org", "rules": CLAIM_RULES}
                if tokens
                else allow_all("org"),
                allow_all("user"),
                allow_all("application"),
            ],
        )
        # partner-1 is alice's external ID: external-user requests reach the token check.
        (folder / "partners.yaml").write_text(
            yaml.safe_dump({"kind": "IdentityMapping", "namespace": "partners",
                            "applications": ["app"], "identities": {"partner-1": "alice"}})
        )  # fmt: skip
        if tokens is not None:
            (folder / "jwks.json").write_text(jwks(KEY))
            config = yaml.safe_load((folder / "organization.yaml").read_text())
            (folder / "organization.yaml").write_text(yaml.safe_dump({**config, "tokens": tokens}))
    return root


# -- claim values: plausible ones, and every kind of malformed one ----------------------------

special = st.sampled_from(
    [
        1e20, -1e20, 1e308, -1e308, math.nan, math.inf, -math.inf, 0.5, 0, -1,
        2**63 - 1, 2**63, -(2**63) - 1, 10**30, MAX_NUMERIC_DATE, MAX_NUMERIC_DATE + 1,
        "\ud800", "admins", "", True, None,
    ]
)  # fmt: skip
leaf = st.one_of(special, st.floats(), st.integers(), st.text(max_size=6), st.booleans())
value = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
names = st.one_of(
    st.sampled_from(
        [
            "exp",
            "nbf",
            "iat",
            "iss",
            "aud",
            "sub",
            "jti",
            "external_id",
            "groups",
            "level",
            "nested",
            "act",
        ]
    ),
    st.text(max_size=4),
)


@st.composite
def claims_sets(draw: st.DrawFn) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "external_id": "partner-1",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "groups": ["admins"],
        "client_id": "app",
    }
    return {**base, **draw(st.dictionaries(names, value, max_size=4))}


def well_formed(claims: dict[str, Any]) -> bool:
    """The claims set as the module docstring of policy_engine.auth.tokens describes it."""

    def fine(item: Any, depth: int) -> bool:
        if isinstance(item, float):
            return math.isfinite(item)
        if isinstance(item, bool) or item is None:
            return True
        if isinstance(item, int):
            return -(2**63) <= item < 2**63
        if isinstance(item, str):
            return not any(0xD800 <= ord(c) <= 0xDFFF for c in item)
        if depth >= 32:
            return False
        if isinstance(item, dict):
            return all(fine(k, depth) and fine(v, depth + 1) for k, v in item.items())
        return all(fine(v, depth + 1) for v in item)

    def numeric_date(name: str) -> bool:
        item = claims.get(name, 0)
        return (
            not isinstance(item, bool)
            and isinstance(item, int | float)
            and (0 <= item <= MAX_NUMERIC_DATE)
        )

    aud = claims.get("aud", "")
    actor: Any = claims
    for _ in range(MAX_ACTORS + 1):  # RFC 8693 `act`: objects, at most MAX_ACTORS deep
        if "act" not in actor:
            break
        actor = actor["act"]
        if not isinstance(actor, dict):
            return False
    else:
        return False
    return (
        fine(claims, 0)
        and all(numeric_date(name) for name in ("exp", "nbf", "iat"))
        and all(isinstance(claims.get(name, ""), str) for name in ("iss", "sub", "jti"))
        and (
            isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
        )
    )


def check(org: str, token: str, kind: int) -> pdp_pb2.CheckRequest:
    return pdp_pb2.CheckRequest(
        organization=org,
        subject=pdp_pb2.Subject(
            id="partner-1" if kind == pdp_pb2.SUBJECT_KIND_EXTERNAL_USER else "alice",
            kind=kind,
            access_token=token,
        ),
        application=pdp_pb2.Application(id="app"),
        integration=pdp_pb2.Integration(id="github"),
        scope="repo",
    )


# -- the server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    return load_policy_set(write_policies(tmp_path_factory.mktemp("claims-policies")))


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditLog]:
    with module_audit_log(tmp_path_factory.mktemp("claims-audit")) as log:
        yield log


@pytest.fixture(scope="module")
def stub(policies: CompiledPolicySet, audit: AuditLog) -> Iterator[Any]:
    servicer = PolicyDecisionServicer(lambda: policies, SETTINGS, audit=audit)
    with running(servicer, SETTINGS) as channel:
        yield pdp_pb2_grpc.PolicyDecisionServiceStub(channel)


def assert_answer(response: pdp_pb2.CheckResponse, claims: dict[str, Any]) -> None:
    codes = [reason.code for reason in response.reasons]
    assert "kontext_server_error" not in codes, response
    assert response.effect in (pdp_pb2.EFFECT_ALLOW, pdp_pb2.EFFECT_DENY)
    if not well_formed(claims):
        assert response.effect == pdp_pb2.EFFECT_DENY
        assert codes == ["kontext_authorization_required"], response
        assert response.reasons[0].message.startswith("the access token is malformed")


def test_well_formed_tokens_are_allowed(stub: Any) -> None:
    claims = json.dumps({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "groups": ["admins"],
                         "exp": int(time.time()) + 600, "client_id": "app"})  # fmt: skip
    kind = pdp_pb2.SUBJECT_KIND_USER
    assert stub.Check(check("signed", raw_token(claims, KEY), kind), timeout=10).effect == (
        pdp_pb2.EFFECT_ALLOW
    )
    assert stub.Check(check("plain", raw_token(claims), kind), timeout=10).effect == (
        pdp_pb2.EFFECT_ALLOW
    )


@PROPERTY
@given(
    claims=claims_sets(),
    kind=st.sampled_from([pdp_pb2.SUBJECT_KIND_USER, pdp_pb2.SUBJECT_KIND_EXTERNAL_USER]),
)
def test_no_claim_value_gives_a_server_error(stub: Any, claims: dict[str, Any], kind: int) -> None:
    text = json.dumps(claims, allow_nan=True)  # writes NaN and Infinity as JavaScript does
    requests = [check("signed", raw_token(text, KEY), kind), check("plain", raw_token(text), kind)]
    for request in requests:
        assert_answer(stub.Check(request, timeout=10), claims)
    batch = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=requests), timeout=10)
    for result in batch.results:
        assert_answer(result, claims)


def test_every_decision_was_audited_intact(stub: Any, audit: AuditLog) -> None:
    assert_audited_intact(audit)
