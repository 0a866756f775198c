"""`pdp audit keygen | verify | tail` as operators run them: real processes, files and Redis."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from policy_engine.audit import AuditLog
from policy_engine.audit.keys import Signer, load_private_key
from policy_engine.audit.sinks import rotated_files
from policy_engine.cli.main import build_parser, main
from tests.audit.support import ALLOW, DENY, RedisServer, make_request, settings

PDP = [sys.executable, "-m", "policy_engine.cli.main"]


def pdp(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PDP, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("cli-keys")
    private, public = directory / "audit.key", directory / "audit.pub"
    result = pdp("audit", "keygen", "--out-private", str(private), "--out-public", str(public))
    assert result.returncode == 0, result.stderr
    assert "key id" in result.stdout
    return private, public


def wait_until_open(pid: int, path: Path) -> None:
    """Until the process has `path` open (Linux /proc), so it does not miss what comes next."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            if any(fd.resolve() == path.resolve() for fd in fds if fd.is_symlink()):
                time.sleep(0.3)  # and has reached its end
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never opened {path}")


def wait_until_reading(server: RedisServer, pid: int) -> None:
    """Until a `tail` process is blocked in XREAD on the server (it starts at the stream's end,
    so records written before would be missed)."""
    client = redis.Redis.from_url(server.url)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(c.get("cmd") == "xread" for c in client.client_list()):
                return
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError(f"process {pid} never waited on the stream")


def write_sample(path: Path, private: Path, **changes: object) -> None:
    """Decisions from several organizations, subjects and outcomes."""
    audit = AuditLog(
        settings(path.parent, file_path=path, **changes),  # type: ignore[arg-type]
        signer=Signer(load_private_key(private)),
    )
    audit.start()
    audit.record(make_request(), ALLOW, decision_id="a1")
    audit.record(make_request(scope="delete_repo"), DENY, decision_id="a2")
    audit.record(make_request(subject="bob"), DENY, decision_id="a3")
    audit.record(make_request(organization="globex", integration="stripe"), ALLOW, decision_id="g1")
    assert audit.close()


def test_keygen_writes_a_private_key_only_its_owner_can_read(
    keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keypair
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = pdp("audit", "keygen", "--out-private", str(private), "--out-public", str(public))
    assert again.returncode == 2 and "exists" in again.stderr


def test_verify_ok_and_tampered_exit_codes(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keypair
    path = tmp_path / "audit.jsonl"
    write_sample(path, private)
    result = pdp("audit", "verify", str(path), "--public-key", str(public))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: 4 records, 1 checkpoints, last signed seq 6")

    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    record["decision"] = "ALLOW"
    lines[2] = json.dumps(record)
    tampered = tmp_path / "audit.tampered"
    tampered.write_text("\n".join(lines) + "\n")
    result = pdp("audit", "verify", str(tampered), "--public-key", str(public))
    assert result.returncode == 1
    assert result.stdout.startswith("TAMPERED: 1 problem(s)")
    assert f"FAIL {tampered}:3: stream " in result.stdout
    assert "seq 3: edited" in result.stdout

    assert main(["audit", "verify", str(path)]) == 2  # no key: says so
    assert main(["audit", "verify", str(path), "--chain-only"]) == 0
    assert main(["audit", "verify", str(tmp_path / "nope.jsonl"), "--chain-only"]) == 2


def test_tail_filters_once(
    keypair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path, keypair[0])
    everything = pdp("audit", "tail", str(path), "--once")
    assert everything.returncode == 0, everything.stderr
    assert len(everything.stdout.splitlines()) == 4  # decisions only
    assert "DENY  acme alice(user) pr-reviewer -> github delete_repo" in everything.stdout
    assert "kontext_policy_denied org engineering-developer-tools/no-repository-deletion" in (
        everything.stdout
    )

    def ids(*flags: str) -> list[str]:  # in-process: the same parser, without a start-up each
        assert main(["audit", "tail", str(path), "--once", "--json", *flags]) == 0
        return [json.loads(line)["decision_id"] for line in capsys.readouterr().out.splitlines()]

    assert ids("--org", "globex") == ["g1"]
    assert ids("--subject", "bob") == ["a3"]
    assert ids("--decision", "deny") == ["a2", "a3"]
    assert ids("--code", "kontext_policy_denied", "--org", "acme") == ["a2", "a3"]
    assert ids("--code", "policy_denied", "--subject", "alice") == ["a2"]
    assert ids("--integration", "stripe") == ["g1"]
    assert ids("--application", "pr-reviewer", "-n", "2") == ["a1", "a2"]
    assert ids("--application", "nobody") == []
    assert main(["audit", "tail", str(path), "--once", "--all"]) == 0
    with_chain = capsys.readouterr().out
    assert "-- stream_start #1" in with_chain
    assert "-- checkpoint #6 covers seq 5" in with_chain


def test_tail_follows_a_file_across_rotation(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(
        settings(tmp_path, file_path=path, file_max_bytes=3000, file_keep=50),
        signer=Signer(load_private_key(keypair[0])),
    )
    audit.start()
    audit.record(make_request(), DENY, decision_id="warmup")
    assert audit.flush()
    follower = subprocess.Popen(
        [*PDP, "audit", "tail", str(path), "--json", "--count", "40", "--subject", "carol"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_open(follower.pid, path)

        def produce() -> None:
            for i in range(40):
                audit.record(make_request(subject="carol"), DENY, decision_id=f"c{i}")
                time.sleep(0.01)

        producer = threading.Thread(target=produce)
        producer.start()
        output, _ = follower.communicate(timeout=30)
        producer.join()
    finally:
        follower.kill()
        audit.close()
    assert len(rotated_files(path)) >= 2  # it really had to follow rotations
    assert [json.loads(line)["decision_id"] for line in output.splitlines()] == [
        f"c{i}" for i in range(40)
    ]


def test_tail_redis_stream(
    keypair: tuple[Path, Path], tmp_path: Path, audit_redis: RedisServer
) -> None:
    key = f"audit-{uuid.uuid4().hex}"
    write_sample(
        tmp_path / "unused.jsonl",
        keypair[0],
        sinks="redis",
        redis_url=audit_redis.url,
        redis_stream=key,
    )
    result = pdp("audit", "tail", audit_redis.url, "--stream", key, "--once", "--json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["decision_id"] for line in result.stdout.splitlines()] == [
        "a1",
        "a2",
        "a3",
        "g1",
    ]
    denied = pdp("audit", "tail", audit_redis.url, "--stream", key, "--once", "--decision", "DENY")
    assert len(denied.stdout.splitlines()) == 2

    # Following: starts at the end, prints what arrives, exits after --count.
    follower = subprocess.Popen(
        [*PDP, "audit", "tail", audit_redis.url, "--stream", key, "--json", "--count", "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_reading(audit_redis, follower.pid)
        audit = AuditLog(
            settings(tmp_path, sinks="redis", redis_url=audit_redis.url, redis_stream=key)
        )
        audit.start()
        for i in range(3):
            audit.record(make_request(), DENY, decision_id=f"live{i}")
        assert audit.close()
        output, _ = follower.communicate(timeout=20)
    finally:
        follower.kill()
    assert [json.loads(line)["decision_id"] for line in output.splitlines()] == [
        "live0",
        "live1",
        "live2",
    ]


def test_tail_defaults_to_the_configured_stream_key() -> None:
    args = build_parser().parse_args(["audit", "tail", "redis://127.0.0.1:1/0"])
    assert args.stream == "pdp:audit"


@pytest.mark.parametrize("content", ["", "\n", "\n\n  \n"], ids=["empty", "newline", "blank"])
def test_an_emptied_log_is_incomplete_not_ok(
    keypair: tuple[Path, Path], tmp_path: Path, content: str
) -> None:
    """A writer opens every stream with a record, so a log with none was emptied: exit 3."""
    _, public = keypair
    path = tmp_path / "audit.jsonl.tampered"  # not checked against the schema at teardown
    path.write_text(content)
    result = pdp("audit", "verify", str(path), "--public-key", str(public))
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("INCOMPLETE:")
    assert "empty: no audit records" in result.stdout


def test_a_line_nested_past_the_json_parser_is_a_failure_not_a_traceback(
    keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keypair
    path = tmp_path / "audit.jsonl.tampered"  # not checked against the schema at teardown
    write_sample(path, private)
    with path.open("a") as log:
        log.write("[" * 100_000 + "]" * 100_000 + "\n")
    result = pdp("audit", "verify", str(path), "--public-key", str(public))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "malformed: not a JSON object" in result.stdout
