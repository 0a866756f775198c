"""Replay of token decisions under a candidate's token algorithms and keys (issue 13, item 3).

A real server verifies RS256 tokens of organization `signed` against a JWKS file and logs each
decision, computed or answered from its cache: a version 5 record keeps how the accepted token
was verified (`subject.token_key`: header `alg` and `kid`, the key set's fingerprint), never
the token. A candidate that would verify it otherwise (RS256 dropped, the JWKS file rotated,
keys fetched from a URL replay cannot read offline) makes the record not replayable exactly,
by a named reason; an unchanged candidate replays it exactly. Older records, which do not say
which key verified their token, are counted as such against a candidate with a JWKS file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from jwt.utils import base64url_encode

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit.chain import content_hash
from policy_engine.audit.record import build_record, token_claims, token_key
from policy_engine.auth.keys import parse_jwks
from policy_engine.domain.decision import Decision, Effect
from policy_engine.domain.request import (
    CheckRequest,
    ConnectionState,
    RequestContext,
    Resource,
    Subject,
    SubjectKind,
)
from policy_engine.engine import decide
from policy_engine.policy import load_policy_set
from policy_engine.replay import Replay, replay_files
from policy_engine.replay.replay import TokenReplay, Unreplayable, direct_request, replay_record
from policy_engine.server.app import start_server
from tests.audit.support import VALIDATOR, read_records
from tests.auth.material import AUDIENCE, ISSUER, claims, ec_key, jwks, rsa_key
from tests.replay.test_tokens import audited, check_message, write_signed

KEY = rsa_key("rsa-1")
ROTATED = rsa_key("rsa-1")  # the same kid, another key: what a rotation in place looks like
ADMINS_ONLY = '"admins" in subject.claims.groups'
CALLS = ("first", "again")  # the same token twice: computed, then a cache hit


def _write(root: Path, *, tokens: dict[str, Any] | None = None, keys: str | None = None) -> Path:
    """Organization `signed` under `root`: allows admins by their token's groups; `tokens`
    overrides its token settings, `keys` its JWKS file (default: KEY's)."""
    return write_signed(
        root, ADMINS_ONLY, keys=keys if keys is not None else jwks(KEY), tokens=tokens
    )


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the audit log, the policies it was decided with): an admin's token twice (the second
    answer from the cache) and a token signed by another key under the same kid (refused)."""
    policies = _write(tmp_path_factory.mktemp("policies"))
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    settings = audited(policies, path)
    admin = KEY.sign(**claims(groups=["admins"]))
    forged = ROTATED.sign(**claims(groups=["admins"]))
    running = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            answers = [stub.Check(check_message(admin, name), timeout=30) for name in CALLS]
            assert [a.effect for a in answers] == [pdp_pb2.EFFECT_ALLOW] * 2
            assert [a.cache_level for a in answers] == [
                pdp_pb2.CACHE_LEVEL_NONE,
                pdp_pb2.CACHE_LEVEL_LOCAL,
            ]
            forged_answer = stub.Check(check_message(forged, "forged"), timeout=30)
            assert forged_answer.effect == pdp_pb2.EFFECT_DENY
    finally:
        running.stop(grace=5)
    yield path, policies


def _decisions(path: Path) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in read_records(path) if r["type"] == "decision"}


def _fingerprint(keys: str) -> str:
    return parse_jwks(keys).fingerprint.hex()


def _reasons(report: dict[str, Any]) -> dict[str, int]:
    return {reason: group["count"] for reason, group in report["unreplayable"].items()}


def test_records_say_how_the_token_was_verified_computed_or_cached(
    log: tuple[Path, Path],
) -> None:
    records = _decisions(log[0])
    for record in read_records(log[0]):
        VALIDATOR.validate(record)
    expected = {"alg": "RS256", "kid": "rsa-1", "key_set": _fingerprint(jwks(KEY))}
    for name in CALLS:
        assert records[name]["schema_version"] == 5
        assert records[name]["subject"]["token_key"] == expected, name
    assert records["again"]["cache_level"] == "local"
    assert records["forged"]["subject"]["token_key"] is None  # refused: nothing kept


def test_an_unchanged_candidate_replays_token_decisions_exactly(
    log: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same policies, a copy whose JWKS file lists the same key in other JSON (the key set,
    so its fingerprint, is the same), and a candidate without keys (it reads the claims for
    structure and time only, whatever signed them: replay decides exactly that)."""
    path, policies = log
    assert all(
        r["subject"]["token_key"] for r in _decisions(path).values() if r["decision"] == "ALLOW"
    )
    respelt = json.dumps({"keys": [dict(reversed(KEY.public_jwk().items()))]}, indent=2)
    for candidate in (policies, _write(tmp_path / "respelt", keys=respelt)):
        report = replay_files([path], load_policy_set(candidate)).to_dict()
        assert report["counts"]["unchanged"] == 2
        assert report["changes"] == {}
        assert _reasons(report) == {"token_refused": 1}
    folder = _write(tmp_path / "unverified") / "signed"
    config = yaml.safe_load((folder / "organization.yaml").read_text())
    del config["tokens"]
    (folder / "organization.yaml").write_text(yaml.safe_dump(config))
    report = replay_files([path], load_policy_set(folder.parent)).to_dict()
    assert report["counts"]["ALLOW->DENY"] == 2  # the admins rule sees no claims now
    assert _reasons(report) == {"token_refused": 1}


def test_a_candidate_dropping_the_tokens_algorithm_cannot_replay_them(
    log: tuple[Path, Path], tmp_path: Path
) -> None:
    path, _ = log
    tokens = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json",
              "algorithms": ["ES256", "EdDSA"]}  # fmt: skip
    candidate = load_policy_set(_write(tmp_path, tokens=tokens, keys=jwks(KEY, ec_key())))
    report = replay_files([path], candidate).to_dict()
    assert report["counts"]["unchanged"] == 0
    assert _reasons(report) == {"token_algorithm_not_accepted": 2, "token_refused": 1}
    examples = report["unreplayable"]["token_algorithm_not_accepted"]["examples"]
    assert examples == [_decisions(path)[name]["decision_id"] for name in CALLS]


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param(jwks(ROTATED), id="rotated in place (same kid)"),
        pytest.param(jwks(rsa_key("rsa-2")), id="rotated to a new kid"),
        pytest.param(jwks(KEY, rsa_key("rsa-2")), id="a key added beside it"),
    ],
)
def test_a_candidate_whose_jwks_file_changed_cannot_replay_them(
    keys: str, log: tuple[Path, Path], tmp_path: Path
) -> None:
    path, _ = log
    candidate = load_policy_set(_write(tmp_path, keys=keys))
    report = replay_files([path], candidate).to_dict()
    assert report["counts"]["unchanged"] == 0
    assert _reasons(report) == {"token_key_changed": 2, "token_refused": 1}


def test_a_candidate_fetching_its_keys_cannot_replay_them(
    log: tuple[Path, Path], tmp_path: Path
) -> None:
    """A JWKS URL and issuer discovery (their loader's first fetch finds nothing on port 9
    of localhost; replay never waits for it): their keys are not known offline."""
    path, _ = log
    for tokens in (
        {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": "http://127.0.0.1:9/jwks.json"},
        {"issuer": "http://127.0.0.1:9/issuer", "audience": AUDIENCE},
    ):
        root = tmp_path / str(len(tokens))
        report = replay_files([path], load_policy_set(_write(root, tokens=tokens))).to_dict()
        assert _reasons(report) == {"token_keys_unknown": 2, "token_refused": 1}, tokens


def _rewritten(path: Path, target: Path, change: Any) -> None:
    """The log with `change` applied to each decision record, re-chained (it verifies)."""
    previous: str | None = None
    lines = []
    for record in read_records(path):
        record.pop("hash")
        if record["type"] == "decision":
            change(record)
        if previous is not None:
            record["prev_hash"] = previous
        record["hash"] = previous = content_hash(record)
        lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False))
    target.write_text("\n".join(lines) + "\n")


def _as_v4(record: dict[str, Any]) -> None:
    record["schema_version"] = 4
    del record["subject"]["token_key"]


def test_an_older_record_says_nothing_of_its_key(log: tuple[Path, Path], tmp_path: Path) -> None:
    """A version 4 record's token may have been verified by any key: against a candidate with
    a JWKS file (even the same one) it is counted, never guessed; against one without keys it
    is replayed as before."""
    path, policies = log
    v4 = tmp_path / "audit.jsonl"
    _rewritten(path, v4, _as_v4)
    report = replay_files([v4], load_policy_set(policies)).to_dict()
    assert report["counts"]["unchanged"] == 0
    assert _reasons(report) == {"token_key_not_recorded": 2, "token_refused": 1}
    record = _decisions(v4)["first"]
    with pytest.raises(Unreplayable, match="token_key_not_recorded"):
        replay_record(record, load_policy_set(policies))


# Values a hostile or broken log may hold in subject.token_key: counted, never an ALLOW.
HOSTILE_TOKEN_KEYS = [
    None,  # with recorded claims
    [],
    "RS256",
    {"alg": "RS256", "kid": "rsa-1"},
    {"alg": "RS256", "kid": "rsa-1", "key_set": None, "x5c": ["..."]},
    {"alg": 256, "kid": "rsa-1", "key_set": "0" * 64},
    {"alg": "RS256", "kid": ["rsa-1"], "key_set": "0" * 64},
    {"alg": "RS256", "kid": "rsa-1", "key_set": "0" * 63},
    {"alg": "RS256", "kid": "rsa-1", "key_set": "G" * 64},
    {"alg": "RS256", "kid": "rsa-1", "key_set": 5},
]


@pytest.mark.parametrize("value", HOSTILE_TOKEN_KEYS, ids=repr)
def test_a_malformed_token_key_is_counted(
    value: Any, log: tuple[Path, Path], tmp_path: Path
) -> None:
    path, policies = log
    target = tmp_path / "audit.jsonl"

    def plant(record: dict[str, Any]) -> None:
        if record["subject"]["token_claims"] is not None:
            record["subject"]["token_key"] = copy.deepcopy(value)

    _rewritten(path, target, plant)
    report = replay_files([target], load_policy_set(policies)).to_dict()
    assert _reasons(report) == {"malformed_record": 2, "token_refused": 1}
    assert report["counts"]["unchanged"] == 0


@pytest.mark.parametrize(
    ("alg", "kid", "reason"),
    [
        (None, "rsa-1", "token_algorithm_not_accepted"),  # an unverified token's header
        ("none", "rsa-1", "token_algorithm_not_accepted"),
        ("RS256", "rsa-9", "token_key_changed"),
        ("ES256", "rsa-1", "token_key_changed"),  # allowed, but no such key in the file
    ],
)
def test_a_recorded_header_the_candidate_would_not_verify_alike(
    alg: str | None, kid: str, reason: str, log: tuple[Path, Path]
) -> None:
    path, policies = log
    record = _decisions(path)["first"]
    record["subject"]["token_key"].update(alg=alg, kid=kid)
    assert TokenReplay(load_policy_set(policies)).unreplayable(record) == reason


def test_a_recorded_key_set_of_an_unverified_token_is_not_the_candidates(
    log: tuple[Path, Path],
) -> None:
    """A token accepted without keys (key_set null), replayed against a candidate that
    verifies: whether its signature would pass is unknown."""
    path, policies = log
    record = _decisions(path)["first"]
    record["subject"]["token_key"]["key_set"] = None
    assert TokenReplay(load_policy_set(policies)).unreplayable(record) == "token_key_changed"


def test_a_version_5_record_takes_the_direct_path_on_both_paths_alike(
    log: tuple[Path, Path],
) -> None:
    path, policies = log
    record = _decisions(path)["first"]
    assert direct_request(record, "") is not None  # token_key is no unknown input
    tokens = TokenReplay(load_policy_set(policies))
    assert tokens.unreplayable(record) is None
    direct = tokens.decide(record, exact_text=True)
    faithful = tokens.decide(record, exact_text=False)
    assert direct == faithful and direct.effect.value == "ALLOW"


def test_the_report_adds_the_new_reasons_to_its_text(
    log: tuple[Path, Path], tmp_path: Path
) -> None:
    path, _ = log
    replay = Replay(load_policy_set(_write(tmp_path, keys=jwks(ROTATED))))
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        replay.add_line(line, (path, number))
    text = replay.render()
    assert "cannot replay (3):" in text
    assert "  token_key_changed: 2  e.g. " in text


def test_a_system_deny_with_an_accepted_token_keeps_its_key(log: tuple[Path, Path]) -> None:
    """Denied before any policy (no active connection) though the token was accepted: its
    claims are recorded, so is the key that verified it, and the record replays exactly."""
    _, policies = log
    compiled = load_policy_set(policies)
    request = CheckRequest(
        organization="signed",
        subject=Subject("alice", SubjectKind.USER, access_token=KEY.sign(**claims())),
        application=Resource("app"),
        integration=Resource("github"),
        scope="repo",
        context=RequestContext(connection=ConnectionState.ABSENT),
    )
    now = datetime.now(UTC)
    decision = decide(compiled, request, now=now)
    assert [r.rule for r in decision.reasons] == ["active-connection"]
    record = build_record(request, decision, decision_id="d", instance="t", time=now.timestamp())
    assert record["subject"]["token_key"]["key_set"] == _fingerprint(jwks(KEY))
    replay = Replay(compiled)
    replay.add(record, "audit.jsonl:1")
    assert replay.to_dict()["counts"]["unchanged"] == 1


@pytest.mark.parametrize(
    "header",
    [
        b'{"alg":5,"kid":{"a":1}}',  # not strings
        b'{"alg":"HS256","kid":"\\ud800"}',  # a lone surrogate no log line can hold
        b"[1,2]",  # not an object
        b"not json",
        b"[" * 100_000 + b"]" * 100_000,  # deeper than json can read
    ],
    ids=["not strings", "lone surrogate", "array", "not JSON", "deep"],
)
def test_a_hostile_header_of_an_accepted_token_is_recorded_without_it(header: bytes) -> None:
    """An organization without keys accepts any well-formed claims: whatever its token's
    header holds, the record keeps only string alg and kid, and nothing breaks."""
    payload = base64url_encode(json.dumps(claims()).encode()).decode()
    token = f"{base64url_encode(header).decode()}.{payload}.c2ln"
    decision = Decision(Effect.ALLOW, (), "r")
    recorded = token_key(token, decision, token_claims(token, decision))
    assert recorded == {"alg": "HS256" if b"HS256" in header else None, "kid": None,
                        "key_set": None}  # fmt: skip
