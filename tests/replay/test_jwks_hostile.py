"""Hostile inputs to `pdp replay --jwks ORG=FILE` and hostile names in replay's report.

A `--jwks` file is read as the server reads a JWKS it fetches: at most 1 MiB, and only a
regular file (a FIFO or a device is refused at once instead of blocking or never ending).
Names and IDs that reach the human-readable report or an error message are written with
their control characters escaped: an ANSI escape in an application or decision ID is not
sent raw to the operator's terminal. The log is `tests/replay/test_jwks_flag.py`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.auth.fetch import MAX_JWKS_BYTES
from policy_engine.cli.main import EXIT_OK, EXIT_USAGE, main
from policy_engine.server.app import start_server
from tests.auth.material import claims, jwks
from tests.replay.test_jwks_flag import FETCHED, FILE, ISSUER, _reasons, _replay, log
from tests.replay.test_token_keys import CALLS, KEY, ROTATED, _write
from tests.replay.test_tokens import audited, check_message

__all__ = ["log"]  # the module-scoped fixture, shared

ESCAPE = "\x1b]0;pwned\x07\x1b[2J"


@pytest.fixture
def fetching(tmp_path: Path) -> Path:
    return _write(tmp_path / "candidate", tokens=FETCHED["jwks_url"])


def _padded(path: Path, size: int) -> Path:
    """KEY's JWKS, padded with trailing spaces (still the same JSON) to `size` bytes."""
    data = jwks(KEY).encode()
    path.write_bytes(data + b" " * (size - len(data)))
    return path


def test_a_jwks_of_at_most_1_mib_is_read_and_a_larger_one_refused(
    log: Path, fetching: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    largest = _padded(tmp_path / "largest.json", MAX_JWKS_BYTES)
    code, report = _replay(log, fetching, ["--jwks", f"signed={largest}"], capsys)
    assert code == EXIT_OK
    assert _reasons(report) == {"token_refused": 1}

    larger = _padded(tmp_path / "larger.json", MAX_JWKS_BYTES + 1)
    code, message = _replay(log, fetching, ["--jwks", f"signed={larger}"], capsys)
    assert code == EXIT_USAGE
    assert "larger than 1048576 bytes" in str(message)


def _pdp(*args: str) -> subprocess.CompletedProcess[str]:
    # The installed command, as operators run it. The timeout only ends a hang (the fault
    # this guards against): it measures nothing.
    return subprocess.run(
        [str(Path(sys.executable).parent / "pdp"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_is_refused_without_reading_it(
    kind: str, log: Path, fetching: Path, tmp_path: Path
) -> None:
    if kind == "fifo":
        path = tmp_path / "keys.fifo"
        os.mkfifo(path)  # nobody ever writes: a blocking open would wait forever
    else:
        path = Path("/dev/zero")  # endless: an unbounded read would fill memory
    result = _pdp(
        "replay", "--audit", str(log), "--policies", str(fetching), "--jwks", f"signed={path}"
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    assert f"--jwks signed={path}: not a regular file" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_usage_error_raised_in_replay_is_one_under_python_m_too(
    log: Path, fetching: Path
) -> None:
    """`python -m policy_engine.cli.main` runs a second copy of the CLI module as `__main__`,
    whose `except UsageError` did not catch replay's (the package module's) UsageError."""
    flags = ["--audit", str(log), "--policies", str(fetching), "--jwks", "signed=/dev/null"]
    result = subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", "replay", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.endswith("pdp: error: --jwks signed=/dev/null: not a regular file\n")


def test_a_symlink_loop_is_a_usage_error(
    log: Path, fetching: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = tmp_path / "loop.json"
    loop.symlink_to(tmp_path / "loop.json")
    code, message = _replay(log, fetching, ["--jwks", f"signed={loop}"], capsys)
    assert code == EXIT_USAGE
    assert "symbolic links" in str(message)


def test_an_organization_name_with_control_characters_is_not_echoed_raw(
    log: Path, fetching: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = tmp_path / "served.json"
    served.write_text(jwks(KEY))
    for flags in (
        ["--jwks", f"{ESCAPE}={served}"],
        ["--jwks", f"{ESCAPE}={served}", "--jwks", f"{ESCAPE}={served}"],
        ["--jwks", f"signed={tmp_path}/{ESCAPE}"],
    ):
        code, message = _replay(log, fetching, flags, capsys)
        assert code == EXIT_USAGE, flags
        assert "\x1b" not in str(message) and "\x07" not in str(message), message
        assert "\\x1b" in str(message), message


def _hostile_log(log: Path, path: Path) -> Path:
    """`log` with escape sequences in each decision ID, and in the application ID of the
    allowed records (which the candidate then denies: that ID is not valid)."""
    lines = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "decision":
            record["decision_id"] += ESCAPE
            if record["decision"] == "ALLOW":
                record["application"]["id"] += ESCAPE
        lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hostile_ids_are_escaped_in_the_report(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = _hostile_log(log, tmp_path / "audit.jsonl")
    candidate = _write(tmp_path / "candidate", tokens=FILE)
    argv = ["replay", "--audit", str(hostile), "--policies", str(candidate)]
    assert main(argv) == EXIT_OK
    text = capsys.readouterr().out
    assert "ALLOW->DENY (2)" in text  # the application IDs are in the report
    assert "token_refused: 1" in text  # and the refused record's decision ID
    assert "\x1b" not in text and "\x07" not in text
    assert text.count("\\x1b]0;pwned\\x07\\x1b[2J") >= 4, text

    assert main([*argv, "--json"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "\x1b" not in out
    report = json.loads(out)  # JSON escapes them, and keeps the IDs exact
    applications = report["changes"]["ALLOW->DENY"]["application"]
    assert all(name.endswith(ESCAPE) for name in applications)


class _Served(BaseHTTPRequestHandler):
    """Serves KEY's JWKS (and, for discovery, metadata naming it) and counts every request."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Served.requests.append(self.path)
        host = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path.endswith("openid-configuration") or "oauth-authorization" in self.path:
            body = json.dumps({"issuer": f"{host}/issuer", "jwks_uri": f"{host}/k.json"})
        else:
            body = jwks(KEY)
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def identity_provider() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Served)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Served.requests.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("how", ["jwks_url", "discovery"])
def test_replay_fetches_nothing(
    how: str,
    identity_provider: str,
    log: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An offline replay does not call the candidate's identity provider (nor wait for it, up
    to 5 s a key set when it hangs): what it would serve now is not what verified the log."""
    if how == "jwks_url":
        tokens = dict(FETCHED[how], jwks_url=f"{identity_provider}/k.json")
    else:  # the log's tokens name another issuer: replayed, the candidate denies them
        tokens = dict(FETCHED[how], issuer=f"{identity_provider}/issuer")
    candidate = _write(tmp_path / "candidate", tokens=tokens)
    served = tmp_path / "served.json"
    served.write_text(jwks(KEY))
    code, report = _replay(log, candidate, [], capsys)
    assert code == EXIT_OK
    assert _reasons(report) == {"token_keys_unknown": 2, "token_refused": 1}
    code, report = _replay(log, candidate, ["--jwks", f"signed={served}"], capsys)
    assert code == EXIT_OK
    assert _reasons(report) == {"token_refused": 1}
    assert _Served.requests == []


def test_a_log_verified_with_a_jwks_url_replays_against_the_keys_it_served(
    identity_provider: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end with a real server whose organization fetches its keys from a real HTTP
    identity provider: the JWKS it served replays the accepted tokens exactly, any other is a
    changed key, and a token refused then stays refused whatever keys are given (even the
    very key that signed the forgery: its claims were never kept, so no DENY->ALLOW)."""
    tokens = dict(FETCHED["jwks_url"], jwks_url=f"{identity_provider}/k.json")
    policies = _write(tmp_path / "policies", tokens=tokens)
    log_path = tmp_path / "audit.jsonl"
    running = start_server(audited(policies, log_path))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            admin = KEY.sign(**claims(groups=["admins"], iss=ISSUER))
            for name in CALLS:
                reply = stub.Check(check_message(admin, name), timeout=30)
                assert reply.effect == pdp_pb2.EFFECT_ALLOW, reply
            forged = ROTATED.sign(**claims(groups=["admins"], iss=ISSUER))
            reply = stub.Check(check_message(forged, "forged"), timeout=30)
            assert reply.effect == pdp_pb2.EFFECT_DENY
    finally:
        running.stop(grace=5)
    assert _Served.requests  # the server did fetch its keys

    code, report = _replay(log_path, policies, [], capsys)
    assert code == EXIT_OK
    assert _reasons(report) == {"token_keys_unknown": 2, "token_refused": 1}

    served = tmp_path / "served.json"
    served.write_text(jwks(KEY))
    code, report = _replay(log_path, policies, ["--jwks", f"signed={served}"], capsys)
    assert code == EXIT_OK
    assert isinstance(report, dict)
    assert report["counts"]["unchanged"] == 2
    assert _reasons(report) == {"token_refused": 1}

    for keys in (jwks(ROTATED), jwks(KEY, ROTATED)):
        served.write_text(keys)
        code, report = _replay(log_path, policies, ["--jwks", f"signed={served}"], capsys)
        assert code == EXIT_OK
        assert isinstance(report, dict)
        assert report["counts"]["DENY->ALLOW"] == 0
        assert _reasons(report) == {"token_key_changed": 2, "token_refused": 1}


def test_a_lone_surrogate_in_an_id_is_escaped_not_a_crash(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `\\ud800` escape in a logged decision ID parses to a lone surrogate, which standard
    output (UTF-8) cannot encode: printed raw, the report was a UnicodeEncodeError."""
    lines = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "decision":
            record["decision_id"] += "\ud800"
        lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
    hostile = tmp_path / "audit.jsonl"
    hostile.write_text("\n".join(lines) + "\n")
    candidate = _write(tmp_path / "candidate", tokens=FILE)
    assert main(["replay", "--audit", str(hostile), "--policies", str(candidate)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "token_refused: 1" in text
    assert "\\ud800" in text
    text.encode()  # no lone surrogate left


def test_a_hostile_audit_file_name_is_escaped_in_the_error(
    fetching: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unreadable = tmp_path / f"audit{ESCAPE}.jsonl"
    unreadable.mkdir()  # a directory: open() fails, even as root
    code = main(["replay", "--audit", str(unreadable), "--policies", str(fetching)])
    assert code == EXIT_USAGE
    message = capsys.readouterr().err
    assert "\x1b" not in message and "\\x1b" in message, message
