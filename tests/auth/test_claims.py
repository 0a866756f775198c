"""Malformed claim values are denies with a precise cause, never a crash (issue 9, item 7).

Tokens are built from raw JSON text, so they can hold what `jwt.encode` never writes: NaN,
Infinity, 1e400, 400- and 5000-digit integers, repeated names, unpaired surrogates, deep nesting.
Each is checked in both modes (an organization with `tokens:` verifies the signature; one
without reads the token unverified), through `check_token`, the engine and `pdp eval`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy_engine.auth.keys import StaticKeySet, parse_jwks
from policy_engine.auth.tokens import MAX_NUMERIC_DATE, UNVERIFIED, TokenRules, check_token
from policy_engine.domain.decision import Effect
from policy_engine.domain.request import SubjectKind
from policy_engine.engine import decide
from policy_engine.policy import load_policy_set
from tests.auth.material import AUDIENCE, ISSUER, jwks, raw_token, rsa_key
from tests.auth.test_tokens import TOKENS, org_with_tokens, with_token
from tests.auth.verified_examples import examples_verifying_tokens as verified_examples
from tests.scenarios import EXAMPLE_POLICIES

KEY = rsa_key("rsa-1")
VERIFIED = TokenRules(
    keys=StaticKeySet(parse_jwks(jwks(KEY))),
    issuer=ISSUER,
    audience=AUDIENCE,
    external_subject_claim="external_id",
)
NOW = int(time.time())


def payload(**raw: str) -> str:
    """A claims set for alice, valid but for the members given as raw JSON text."""
    members = {
        "sub": '"alice"',
        "iss": json.dumps(ISSUER),
        "aud": json.dumps(AUDIENCE),
        "iat": str(NOW),
        "exp": str(NOW + 600),
        "client_id": '"app"',
        **raw,
    }
    return "{" + ", ".join(f'"{name}": {text}' for name, text in members.items()) + "}"


DEEP = "[" * 40 + "]" * 40
DEEP_ACT = '{"sub": "a", "act": ' * 9 + '{"sub": "z"}' + "}" * 9  # 10 actors: one too many
VERY_DEEP = "[" * 5000 + "]" * 5000
# (what, claims set as raw JSON, the cause the reason must name)
MALFORMED: list[tuple[str, str, str]] = [
    ("exp 1e20", payload(exp="1e20"), "claim 'exp' is out of range"),
    ("exp -1", payload(exp="-1"), "claim 'exp' is out of range"),
    ("exp past year 9999", payload(exp=str(MAX_NUMERIC_DATE + 1)), "claim 'exp' is out of range"),
    ("exp NaN", payload(exp="NaN"), "claim 'exp' is NaN"),
    ("exp Infinity", payload(exp="Infinity"), "claim 'exp' is Infinity"),
    ("exp -Infinity", payload(exp="-Infinity"), "claim 'exp' is -Infinity"),
    ("exp 1e400", payload(exp="1e400"), "claim 'exp' is a number too large"),
    ("exp 400 digits", payload(exp="1" + "0" * 400), "claim 'exp' is an integer outside"),
    ("exp 5000 digits", payload(exp="1" + "0" * 5000), "claim 'exp' is an integer with too many"),
    ("exp a string", payload(exp='"2030-01-01"'), "claim 'exp' is not a number"),
    ("exp true", payload(exp="true"), "claim 'exp' is not a number"),
    ("exp an object", payload(exp='{"at": 1}'), "claim 'exp' is not a number"),
    ("nbf 1e20", payload(nbf="1e20"), "claim 'nbf' is out of range"),
    ("nbf NaN", payload(nbf="NaN"), "claim 'nbf' is NaN"),
    ("iat Infinity", payload(iat="Infinity"), "claim 'iat' is Infinity"),
    ("iat a list", payload(iat="[1]"), "claim 'iat' is not a number"),
    ("iss a number", payload(iss="5"), "claim 'iss' is not a string"),
    ("iss NaN", payload(iss="NaN"), "claim 'iss' is NaN"),
    ("sub a list", payload(sub='["alice"]'), "claim 'sub' is not a string"),
    ("sub null", payload(sub="null"), "claim 'sub' is not a string"),
    ("aud an object", payload(aud='{"a": 1}'), "claim 'aud' is not a string or an array"),
    ("aud numbers", payload(aud="[1, 2]"), "claim 'aud' is not a string or an array"),
    ("jti a number", payload(jti="1"), "claim 'jti' is not a string"),
    ("sub twice", payload(sub='"alice"', extra='"x", "sub": "mallory"'), "'sub' appears more"),
    ("nested NaN", payload(groups='["eng", NaN]'), "claim 'groups[1]' is NaN"),
    ("nested huge", payload(org='{"id": 1e999}'), "claim 'org.id' is a number too large"),
    ("nested int", payload(org='{"n": 9223372036854775808}'), "claim 'org.n' is an integer"),
    ("surrogate", payload(name='"\\ud800"'), "claim 'name' holds an unpaired surrogate"),
    ("surrogate name", payload(meta='{"\\udfff": 1}'), "member name in claim 'meta'"),
    ("deep", payload(groups=DEEP), "nested more than 32 levels"),
    ("very deep", payload(groups=VERY_DEEP), "nested more than 32 levels"),
    ("act a string", payload(act='"agent-x"'), "claim 'act' is not a JSON object"),
    ("act.act a list", payload(act='{"sub": "a", "act": ["b"]}'), "claim 'act.act' is not a JSON"),
    ("act null", payload(act="null"), "claim 'act' is not a JSON object"),
    ("act too deep", payload(act=DEEP_ACT), "nests more than 8 actors"),
    ("not an object", "[1, 2]", "not a JSON object"),
    ("not JSON", "{'sub': 'alice'}", "not JSON"),
]
IDS = [case[0] for case in MALFORMED]


def at_now() -> datetime:
    return datetime.now(UTC)


@pytest.mark.parametrize(("what", "claims_set", "cause"), MALFORMED, ids=IDS)
def test_a_malformed_claim_in_a_signed_token_is_named(
    what: str, claims_set: str, cause: str
) -> None:
    check = check_token(
        raw_token(claims_set, KEY), at_now(), VERIFIED, "alice", application_id="app"
    )
    assert check.problem is not None and cause in check.problem, check.problem
    assert check.problem.startswith("the access token is malformed")
    assert not check.claims and check.changes_at is None
    assert len(check.problem) < 200  # no claim value or huge name is echoed


@pytest.mark.parametrize(("what", "claims_set", "cause"), MALFORMED, ids=IDS)
def test_a_malformed_claim_in_an_unverified_token_is_named(
    what: str, claims_set: str, cause: str
) -> None:
    check = check_token(raw_token(claims_set), at_now(), UNVERIFIED, "alice", application_id="app")
    assert check.problem is not None and cause in check.problem, check.problem


def test_the_external_subject_claim_must_be_a_string() -> None:
    token = raw_token(payload(external_id="123"), KEY)
    check = check_token(
        token, at_now(), VERIFIED, "123", SubjectKind.EXTERNAL_USER, application_id="app"
    )
    assert check.problem == "the access token is malformed: claim 'external_id' is not a string"


def test_the_last_instant_accepted_still_gives_a_cache_expiry() -> None:
    check = check_token(
        raw_token(payload(exp=str(MAX_NUMERIC_DATE)), KEY),
        at_now(),
        VERIFIED,
        "alice",
        application_id="app",
    )
    assert check.problem is None
    assert check.changes_at is not None and check.changes_at.year == 9999
    premature = payload(nbf=str(MAX_NUMERIC_DATE), exp=str(MAX_NUMERIC_DATE))
    check = check_token(
        raw_token(premature, KEY), at_now(), VERIFIED, "alice", application_id="app"
    )
    assert check.problem is not None and "not valid yet" in check.problem
    assert check.changes_at is not None and check.changes_at.year == 9999


def test_well_formed_claims_of_every_json_type_reach_cel_unchanged() -> None:
    claims_set = payload(
        groups='["eng", "admins"]', level="3", ratio="0.5", on="true", none="null",
        big="9223372036854775807", nested='{"a": {"b": [1, {"c": "é"}]}}',
    )  # fmt: skip
    check = check_token(
        raw_token(claims_set, KEY), at_now(), VERIFIED, "alice", application_id="app"
    )
    assert check.problem is None
    assert check.claims["big"] == 2**63 - 1
    assert check.claims["nested"] == {"a": {"b": [1, {"c": "é"}]}}


# -- through the engine: a deny with kontext_authorization_required, in both modes ------------


@pytest.fixture(scope="module")
def policies_with_tokens(tmp_path_factory: pytest.TempPathFactory):
    root = org_with_tokens(
        tmp_path_factory.mktemp("with-tokens"),
        TOKENS,
        '"admins" in subject.claims.groups || subject.claims.level > 1',
    )
    (root / "acme" / "jwks.json").write_text(jwks(KEY))
    return load_policy_set(root)


@pytest.fixture(scope="module")
def policies_without_tokens(tmp_path_factory: pytest.TempPathFactory):
    import yaml

    root = org_with_tokens(tmp_path_factory.mktemp("without-tokens"), TOKENS)
    config_file = root / "acme" / "organization.yaml"
    config = yaml.safe_load(config_file.read_text())
    del config["tokens"]
    config_file.write_text(yaml.safe_dump(config))
    return load_policy_set(root)


@pytest.mark.parametrize(("what", "claims_set", "cause"), MALFORMED, ids=IDS)
def test_the_engine_denies_malformed_claims_in_both_modes(
    policies_with_tokens, policies_without_tokens, what: str, claims_set: str, cause: str
) -> None:
    for policies, token in (
        (policies_with_tokens, raw_token(claims_set, KEY)),
        (policies_without_tokens, raw_token(claims_set)),
    ):
        decision = decide(policies, with_token(token), now=at_now())
        assert decision.effect is Effect.DENY
        (reason,) = decision.reasons
        assert reason.code.value == "kontext_authorization_required"
        assert cause in reason.message, reason.message
        assert decision.valid_until is None


def test_the_engine_still_allows_well_formed_tokens(
    policies_with_tokens, policies_without_tokens
) -> None:
    signed = raw_token(payload(groups='["admins"]'), KEY)
    assert decide(policies_with_tokens, with_token(signed), now=at_now()).effect is Effect.ALLOW
    unsigned = raw_token(payload())
    assert decide(policies_without_tokens, with_token(unsigned), now=at_now()).effect is (
        Effect.ALLOW
    )


# -- pdp eval ---------------------------------------------------------------------------------


EVAL = [
    sys.executable, "-m", "policy_engine.cli.main", "eval",
    "--policies", str(EXAMPLE_POLICIES), "--org", "acme", "--subject", "alice",
    "--subject-attr", 'groups=["engineering"]', "--application", "pr-reviewer",
    "--integration", "github", "--scope", "repo",
]  # fmt: skip


def pdp_eval(token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [*EVAL, "--token", token, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_pdp_eval_denies_a_token_with_a_huge_exp_without_a_traceback(tmp_path: Path) -> None:
    """Issue 9, finding 8: `exp: 1e20` gave a traceback and exit code 1."""
    keys = tmp_path / "jwks.json"
    keys.write_text(jwks(KEY))
    unsigned = raw_token(payload(exp="1e20"))
    signed = raw_token(payload(exp="1e20"), KEY)
    valid = pdp_eval(raw_token(payload()), "--json")
    assert valid.returncode == 0, valid.stderr
    for run in (
        pdp_eval(unsigned, "--json"),
        # Verified only where the organization verifies tokens (tests.auth.verified_examples).
        pdp_eval(
            signed, "--json", "--jwks", str(keys), "--policies", str(verified_examples(tmp_path))
        ),
        pdp_eval(unsigned),
    ):
        assert run.returncode == valid.returncode, run.stderr
        assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
        assert "claim 'exp' is out of range" in run.stdout
    answer = json.loads(pdp_eval(unsigned, "--json").stdout)
    assert answer["decision"] == "DENY"
    assert answer["reasons"][0]["code"] == "kontext_authorization_required"
