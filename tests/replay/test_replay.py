"""`pdp replay` against a log a real server wrote through real Checks.

The candidate is a copy of policies/ where one org rule also lets sales use developer tools:
exactly the records of sales users' GitHub requests turn DENY->ALLOW, nothing else changes,
and records the log cannot replay exactly are counted by reason.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.audit.record import SCHEMA_VERSION
from policy_engine.audit.verify import verify_files
from policy_engine.bench.redis_server import RedisServer
from policy_engine.cli.main import EXIT_NEW_ALLOWS, EXIT_OK, EXIT_USAGE, main
from policy_engine.config import AuditSettings, ReloadSettings, Settings
from policy_engine.policy import load_policy_set
from policy_engine.replay import Replay, order_audit_files, replay_files
from policy_engine.replay.replay import Progress, replay_redis
from policy_engine.server.app import start_server
from tests.audit.support import TOKEN, read_records
from tests.cache.support import tuple_request
from tests.server.harness import DOCS, EXAMPLE_POLICIES

STREAM = "pdp:audit"
ENGINEERS_ONLY = '"engineering" in subject.attributes.groups'
ENGINEERS_AND_SALES = f'({ENGINEERS_ONLY} || "sales" in subject.attributes.groups)'


@dataclass
class Log:
    """An audit log written by a real server, with what each Check was answered."""

    path: Path
    records: list[dict[str, Any]]
    by_request: dict[str, str]  # request ID -> decision ID
    redis_url: str  # the same records in the Redis Stream STREAM


def _checks() -> list[tuple[str, pdp_pb2.CheckRequest]]:
    with_token = tuple_request(request_id="token")
    with_token.subject.access_token = TOKEN
    with_password = tuple_request(request_id="password")
    with_password.subject.attributes["password"] = "hunter2"
    return [
        ("allowed", tuple_request(request_id="allowed")),
        ("allowed-cached", tuple_request(request_id="allowed-cached")),
        ("sales", tuple_request("bob", ("sales",), request_id="sales")),
        ("sales-cached", tuple_request("bob", ("sales",), request_id="sales-cached")),
        ("delete", tuple_request(scope="delete_repo", request_id="delete")),
        ("token", with_token),
        ("password", with_password),
        ("invalid", tuple_request(scope="repo\x07", request_id="invalid")),
    ]


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    redis_server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    settings = Settings(
        address="127.0.0.1:0",
        policy_dir=EXAMPLE_POLICIES,
        docs_base_url=DOCS,
        metrics_address="",
        reload=ReloadSettings(watch=False),
        audit=AuditSettings(
            enabled=True,
            sinks="file,redis",
            file_path=path,
            redis_url=redis_server.url,
            redis_stream=STREAM,
        ),
    )
    by_request: dict[str, str] = {}
    running = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            for name, message in _checks():
                try:
                    by_request[name] = stub.Check(message, timeout=30).decision_id
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, exc
    finally:
        running.stop(grace=5)  # drains and seals the log
    try:
        yield Log(path, read_records(path), by_request, redis_server.url)
    finally:
        redis_server.stop()


@pytest.fixture
def candidate(tmp_path: Path) -> Path:
    directory = tmp_path / "candidate"
    shutil.copytree(EXAMPLE_POLICIES, directory)
    org = directory / "acme" / "org.yaml"
    text = org.read_text()
    assert text.count(ENGINEERS_ONLY) == 1
    org.write_text(text.replace(ENGINEERS_ONLY, ENGINEERS_AND_SALES))
    return directory


def _decision_id(log: Log, request_id: str) -> str:
    (record,) = [r for r in log.records if r.get("request_id") == request_id]
    return str(record["decision_id"])


def test_the_servers_log_is_current_and_verifies(log: Log) -> None:
    assert {r["schema_version"] for r in log.records} == {SCHEMA_VERSION}
    assert verify_files([log.path], None).ok


def test_unchanged_policies_change_nothing(log: Log) -> None:
    report = replay_files([log.path], load_policy_set(EXAMPLE_POLICIES)).to_dict()
    assert report["decisions"] == len(_checks())
    assert report["counts"]["unchanged"] == 5
    assert report["changes"] == {}


def test_one_flipped_rule_changes_exactly_its_records(log: Log, candidate: Path) -> None:
    report = replay_files([log.path], load_policy_set(candidate)).to_dict()
    counts = report["counts"]
    assert counts["DENY->ALLOW"] == 2
    assert counts["unchanged"] == 3
    assert sum(counts.values()) == 5
    changed = report["changes"]["DENY->ALLOW"]
    sales = {_decision_id(log, "sales"), _decision_id(log, "sales-cached")}
    assert set(changed["organization"]["acme"]["examples"]) == sales
    assert list(changed["integration"]) == ["github"]
    (rule,) = changed["rule"]
    assert rule.endswith("-> engineering-developer-tools/engineering-may-use-developer-tools")


def test_records_that_cannot_be_replayed_are_counted_by_reason(log: Log) -> None:
    report = replay_files([log.path], load_policy_set(EXAMPLE_POLICIES)).to_dict()
    cannot = report["unreplayable"]
    assert {reason: group["count"] for reason, group in cannot.items()} == {
        "token_refused": 1,  # acme reads tokens unverified: this one is malformed
        "redacted_attribute": 1,
        "invalid_request_not_recorded": 1,
    }
    assert cannot["token_refused"]["examples"] == [_decision_id(log, "token")]
    assert cannot["redacted_attribute"]["examples"] == [_decision_id(log, "password")]


def test_fail_on_new_allows_exits_non_zero(
    log: Log, candidate: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["replay", "--audit", str(log.path), "--policies", str(candidate)]
    assert main([*argv, "--fail-on-new-allows"]) == EXIT_NEW_ALLOWS
    assert "DENY->ALLOW (2):" in capsys.readouterr().out
    assert main(argv) == EXIT_OK
    unchanged = ["replay", "--audit", str(log.path), "--policies", str(EXAMPLE_POLICIES)]
    assert main([*unchanged, "--fail-on-new-allows"]) == EXIT_OK


def test_json_report(log: Log, candidate: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["replay", "--audit", str(log.path), "--policies", str(candidate), "--json"]
    assert main(argv) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["DENY->ALLOW"] == 2
    assert report["policy_revision"] == load_policy_set(candidate).revision


def test_rotated_files_are_replayed_oldest_first_with_unreadable_lines_counted(
    log: Log, tmp_path: Path
) -> None:
    lines = log.path.read_text().splitlines(keepends=True)
    live = tmp_path / "audit.jsonl"
    older = tmp_path / "audit.jsonl.20261130T100000.000000Z"
    oldest = tmp_path / "audit.jsonl.20261130T090000.000000Z"
    oldest.write_text("".join(lines[:3]))
    older.write_text("".join(lines[3:6]) + "{not json\n")
    live.write_text("".join(lines[6:]))
    assert order_audit_files([live, older, oldest]) == [oldest, older, live]
    report = replay_files([live, older, oldest], load_policy_set(EXAMPLE_POLICIES)).to_dict()
    assert report["decisions"] == len(_checks()) + 1
    assert report["unreplayable"]["unreadable_line"]["examples"] == [f"{older}:4"]


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    argv = ["replay", "--audit", str(tmp_path / "none.jsonl"), "--policies", str(EXAMPLE_POLICIES)]
    assert main(argv) == EXIT_USAGE


def test_a_redis_stream_range_replays_as_its_file(log: Log, candidate: Path) -> None:
    policies = load_policy_set(candidate)
    whole = replay_redis(log.redis_url, STREAM, policies).to_dict()
    from_file = replay_files([log.path], policies).to_dict()
    assert whole["counts"] == from_file["counts"]
    assert whole["changes"] == from_file["changes"]
    assert whole["unreplayable"] == from_file["unreplayable"]

    client = redis.Redis.from_url(log.redis_url)
    ids = [entry_id.decode() for entry_id, _ in client.xrange(STREAM)]
    client.close()
    # Entries 0 and 1: the stream's start and the first allowed decision.
    first = replay_redis(log.redis_url, STREAM, policies, start=ids[0], end=ids[1]).to_dict()
    assert first["decisions"] == 1 and first["counts"]["unchanged"] == 1
    rest = replay_redis(log.redis_url, STREAM, policies, start="(" + ids[1], page=2).to_dict()
    assert rest["decisions"] == whole["decisions"] - 1


def test_replay_from_redis_on_the_command_line(
    log: Log, candidate: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["replay", "--redis-url", log.redis_url, "--stream", STREAM, "--policies"]
    assert main([*argv, str(candidate), "--fail-on-new-allows"]) == EXIT_NEW_ALLOWS
    assert main([*argv, str(EXAMPLE_POLICIES), "--fail-on-new-allows"]) == EXIT_OK
    capsys.readouterr()
    bad_id = [*argv, str(candidate), "--from", "not-an-id"]
    assert main(bad_id) == EXIT_USAGE
    assert "--redis-url" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--redis-url", "redis://127.0.0.1:1/0"],  # no --stream
        ["--audit", "audit.jsonl", "--redis-url", "redis://127.0.0.1:1/0", "--stream", "s"],
        [],  # no source
    ],
)
def test_a_source_must_be_given_once(flags: list[str]) -> None:
    assert main(["replay", *flags, "--policies", str(EXAMPLE_POLICIES)]) == EXIT_USAGE


def _standup_record(decision_id: str, time: str) -> dict[str, Any]:
    """A v1 record of alice's standup-bot posting in Slack, recorded as allowed."""
    return {
        "schema_version": 1,
        "type": "decision",
        "decision_id": decision_id,
        "time": time,
        "organization": "acme",
        "subject": {
            "id": "alice",
            "kind": "user",
            "token_sha256": None,
            "attributes": {"groups": ["engineering"]},
        },
        "application": {"id": "standup-bot", "attributes": {}},
        "integration": {"id": "slack", "attributes": {}},
        "scope": "chat:write",
        "context": {
            "connection": "active",
            "client_ip": "",
            "session_id": "",
            "time": None,
            "attributes": {},
        },
        "decision": "ALLOW",
        "reasons": [],
        "matched_rules": [
            {
                "effect": "ALLOW",
                "layer": "org",
                "policy": "chat-for-everyone",
                "rule": "employees-may-chat",
            }
        ],
    }


def test_records_with_the_same_inputs_are_decided_at_their_own_times() -> None:
    """standup-bot may post only in New York working hours: the same tuple recorded at 10:00
    and at midnight there is decided at each record's time, never reused across them."""
    day = _standup_record("day", "2026-03-02T15:00:00.000000Z")
    night = _standup_record("night", "2026-03-02T05:00:00.000000Z")
    report = Replay(load_policy_set(EXAMPLE_POLICIES))
    for record in (day, night, day, night):
        report.add(record, "test")
    assert report.counts["unchanged"] == 2, report.to_dict()
    assert report.counts["ALLOW->DENY"] == 2
    changed = report.to_dict()["changes"]["ALLOW->DENY"]["organization"]["acme"]
    assert changed["examples"] == ["night", "night"]


def _without(record: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    copy = json.loads(json.dumps(record))
    parent = copy
    for name in path[:-1]:
        parent = parent[name]
    del parent[path[-1]]
    return copy


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(value, dict):
        for name, inner in value.items():
            yield (*prefix, name)
            yield from _paths(inner, (*prefix, name))


@pytest.mark.parametrize(
    "damage",
    [
        {"subject": {"id": "alice", "kind": "robot", "token_sha256": None, "attributes": {}}},
        {"time": "yesterday"},
        {"context": "active"},
        {"reasons": None},
        {"scope": 7},
        {"subject": {"id": "alice", "kind": "user", "token_sha256": None, "attributes": []}},
        {"application": {"id": "standup-bot", "attributes": {"n": 2**60}}},
    ],
)
def test_a_damaged_record_is_counted_never_a_traceback(damage: dict[str, Any]) -> None:
    report = Replay(load_policy_set(EXAMPLE_POLICIES))
    report.add({**_standup_record("damaged", "2026-03-02T15:00:00.000000Z"), **damage}, "x")
    assert report.decisions == 1
    assert sum(report.counts.values()) + len(report.unreplayable) == 1


def test_a_record_missing_any_field_is_counted_never_a_traceback() -> None:
    record = _standup_record("damaged", "2026-03-02T15:00:00.000000Z")
    report = Replay(load_policy_set(EXAMPLE_POLICIES))
    paths = list(_paths(record))
    for path in paths:
        report.add(_without(record, path), "x")
    assert report.decisions + report.other_records == len(paths)


def test_invalid_candidate_policies_exit_1(log: Log, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(EXAMPLE_POLICIES, broken)
    (broken / "acme" / "org.yaml").write_text("kind: Policy\nname: [unclosed\n")
    argv = ["replay", "--audit", str(log.path), "--policies", str(broken)]
    assert main(argv) == 1


def test_the_progress_bar_counts_what_was_read() -> None:
    out = io.StringIO()
    progress = Progress(out, total=200)
    for _ in range(Progress.EVERY):
        progress.step(0)
    progress.step(100)
    progress.close()
    lines = out.getvalue().split("\r")
    assert lines[-1] == f"[{'#' * 15}{'.' * 15}]  50% {Progress.EVERY + 1} records\n"


def test_a_redacted_value_spelt_with_escapes_is_still_found(tmp_path: Path) -> None:
    record = _standup_record("escaped", "2026-03-02T15:00:00.000000Z")
    record["subject"]["attributes"]["password"] = "[redacted]"
    line = json.dumps(record).replace("[redacted]", "\\u005bredacted]")
    path = tmp_path / "audit.jsonl"
    path.write_text(line + "\n")
    report = replay_files([path], load_policy_set(EXAMPLE_POLICIES)).to_dict()
    assert report["unreplayable"]["redacted_attribute"]["count"] == 1
