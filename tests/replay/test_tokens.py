"""Token decisions replayed from version 2 records (issue 13, item 3).

A real server verifies signed tokens for organization `signed` and logs each decision: the
record keeps the claims the engine accepted (never the token). Replay signs those claims with
its own key, trusted in place of the organization's, so a candidate rule on
`subject.claims` is decided on the recorded claims. A refused token and a version 1 record
(the token only as a hash) are counted by reason; version 1 logs still verify.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit.chain import content_hash
from policy_engine.audit.verify import verify_files
from policy_engine.config import AuditSettings, ReloadSettings, Settings
from policy_engine.policy import load_policy_set
from policy_engine.replay import Replay, replay_files
from policy_engine.server.app import start_server
from tests.audit.support import read_records
from tests.auth.material import AUDIENCE, ISSUER, claims, ed_key, jwks
from tests.policy_builder import allow_all, write_organization
from tests.server.harness import DOCS

KEY = ed_key("ed-1")
ADMINS_ONLY = '"admins" in subject.claims.groups'
ADMINS_AND_USERS = '"admins" in subject.claims.groups || "users" in subject.claims.groups'


def write_signed(
    root: Path, condition: str, *, keys: str | None = None, tokens: dict[str, Any] | None = None
) -> Path:
    """Organization `signed` under `root`, allowing what `condition` allows in its org layer,
    verifying tokens with a JWKS file (`keys`, default KEY's) unless `tokens` says otherwise."""
    folder = write_organization(
        root,
        "signed",
        policies=[
            {"name": "org", "layer": "org", "rules": [{"name": "groups", "effect": "allow",
                                                       "condition": condition}]},
            allow_all("user"),
            allow_all("application"),
        ],
    )  # fmt: skip
    (folder / "jwks.json").write_text(keys if keys is not None else jwks(KEY))
    config = yaml.safe_load((folder / "organization.yaml").read_text())
    settings = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"}
    (folder / "organization.yaml").write_text(
        yaml.safe_dump({**config, "tokens": tokens if tokens is not None else settings})
    )
    return root


def check_message(token: str, request_id: str) -> pdp_pb2.CheckRequest:
    """alice's Check of organization `signed` with `token`."""
    return pdp_pb2.CheckRequest(
        organization="signed",
        subject=pdp_pb2.Subject(id="alice", kind=pdp_pb2.SUBJECT_KIND_USER, access_token=token),
        application=pdp_pb2.Application(id="app"),
        integration=pdp_pb2.Integration(id="github"),
        scope="repo",
        request_id=request_id,
    )


def audited(policies: Path, path: Path) -> Settings:
    """A server's settings on a free port deciding with `policies`, logging to file `path`."""
    return Settings(
        address="127.0.0.1:0",
        policy_dir=policies,
        docs_base_url=DOCS,
        metrics_address="",
        reload=ReloadSettings(watch=False),
        audit=AuditSettings(enabled=True, sinks="file", file_path=path),
    )


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the audit log, the policies it was decided with)."""
    policies = write_signed(tmp_path_factory.mktemp("policies"), ADMINS_ONLY)
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    settings = audited(policies, path)
    admin = KEY.sign(**claims(groups=["admins"], secret="s3cr3t"))
    user = KEY.sign(**claims(groups=["users"]))
    forged = ed_key("ed-1").sign(**claims(groups=["admins"]))  # same kid, another key
    running = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            effects = [
                stub.Check(check_message(token, name), timeout=30).effect
                for name, token in (("admin", admin), ("user", user), ("forged", forged))
            ]
            assert effects == [pdp_pb2.EFFECT_ALLOW, pdp_pb2.EFFECT_DENY, pdp_pb2.EFFECT_DENY]
    finally:
        running.stop(grace=5)
    text = path.read_text()
    assert all(token not in text for token in (admin, user, forged))
    yield path, policies


def _by_request(path: Path) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in read_records(path) if r["type"] == "decision"}


def test_a_v3_record_keeps_accepted_claims_only(log: tuple[Path, Path]) -> None:
    records = _by_request(log[0])
    assert records["admin"]["schema_version"] == 5
    assert records["admin"]["subject"]["token_claims"]["groups"] == ["admins"]
    assert records["admin"]["subject"]["token_claims"]["secret"] == "[redacted]"
    assert records["user"]["subject"]["token_claims"]["groups"] == ["users"]
    assert records["forged"]["subject"]["token_claims"] is None
    assert verify_files([log[0]], None).ok


def test_a_claims_rule_change_is_replayed_from_recorded_claims(
    log: tuple[Path, Path], tmp_path: Path
) -> None:
    path, _ = log
    candidate = write_signed(tmp_path / "candidate", ADMINS_AND_USERS)
    report = replay_files([path], load_policy_set(candidate)).to_dict()
    assert report["counts"]["DENY->ALLOW"] == 1
    changed = report["changes"]["DENY->ALLOW"]["organization"]["signed"]["examples"]
    assert changed == [_by_request(path)["user"]["decision_id"]]
    assert {r: g["count"] for r, g in report["unreplayable"].items()} == {
        "redacted_attribute": 1,  # the admin's token carried a claim named `secret`
        "token_refused": 1,
    }


def test_unchanged_policies_replay_token_decisions_unchanged(log: tuple[Path, Path]) -> None:
    path, policies = log
    report = replay_files([path], load_policy_set(policies)).to_dict()
    assert report["counts"]["unchanged"] == 1
    assert report["changes"] == {}


def _as_v1(path: Path, target: Path) -> None:
    """The log as a version 1 writer would have written it: no token_claims, re-chained."""
    previous: str | None = None
    lines = []
    for record in read_records(path):
        record.pop("hash")
        record["schema_version"] = 1
        record.get("subject", {}).pop("token_claims", None)
        if previous is not None:
            record["prev_hash"] = previous
        record["hash"] = previous = content_hash(record)
        lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False))
    target.write_text("\n".join(lines) + "\n")


def test_v1_records_verify_and_their_token_decisions_are_counted(
    log: tuple[Path, Path], tmp_path: Path
) -> None:
    path, policies = log
    v1 = tmp_path / "audit.jsonl"
    _as_v1(path, v1)
    assert verify_files([v1], None).ok
    report = replay_files([v1], load_policy_set(policies)).to_dict()
    assert report["unreplayable"]["token_claims_not_recorded"]["count"] == 3


def test_claims_no_token_can_carry_are_counted(log: tuple[Path, Path]) -> None:
    path, policies = log
    record = _by_request(path)["user"]
    record["subject"]["token_claims"]["iss"] = 5  # PyJWT signs no numeric issuer
    report = Replay(load_policy_set(policies))
    report.add(record, "x")
    assert report.to_dict()["unreplayable"]["unrepresentable_value"]["count"] == 1
