"""`pdp replay --jwks ORG=FILE`: for a candidate organization that fetches its token keys (a
`jwks_url`, or discovery), the operator supplies what that source served, and token records
are replayed exactly against it instead of being counted as `token_keys_unknown`; anything
else given to the flag is a usage error (exit 2), never a traceback.

The log is the one `tests/replay/test_token_keys.py` has a real server write: organization
`signed` verifying RS256 tokens against KEY's JWKS file, an admin's token twice (computed, then
from the cache) and a forged one (refused).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.cli.main import EXIT_OK, EXIT_USAGE, main
from policy_engine.server.app import start_server
from tests.auth.material import AUDIENCE, claims, jwks, rsa_key
from tests.replay.test_token_keys import CALLS, KEY, ROTATED, _write
from tests.replay.test_tokens import audited, check_message
from tests.server.harness import EXAMPLE_POLICIES

# Nothing listens on port 9 of localhost: the loader's first fetch fails, replay never waits.
# The issuer is one discovery could fetch from, so that a candidate discovering its keys
# accepts the log's tokens as the server that verified them with a JWKS file did.
ISSUER = "http://127.0.0.1:9/issuer"
FILE = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"}
FETCHED = {
    "jwks_url": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": "http://127.0.0.1:9/k.json"},
    "discovery": {"issuer": ISSUER, "audience": AUDIENCE},
}


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    policies = _write(tmp_path_factory.mktemp("policies"), tokens=FILE)
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    running = start_server(audited(policies, path))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            admin = KEY.sign(**claims(groups=["admins"], iss=ISSUER))
            for name in CALLS:
                assert stub.Check(check_message(admin, name), timeout=30).effect == (
                    pdp_pb2.EFFECT_ALLOW
                )
            forged = ROTATED.sign(**claims(groups=["admins"], iss=ISSUER))
            assert stub.Check(check_message(forged, "forged"), timeout=30).effect == (
                pdp_pb2.EFFECT_DENY
            )
    finally:
        running.stop(grace=5)
    yield path


def _replay(
    log: Path, policies: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any] | str]:
    argv = ["replay", "--audit", str(log), "--policies", str(policies), "--json", *flags]
    code = main(argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == EXIT_OK else captured.err


def _reasons(report: Any) -> dict[str, int]:
    return {reason: group["count"] for reason, group in report["unreplayable"].items()}


@pytest.fixture(params=sorted(FETCHED))
def fetching(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A candidate whose organization `signed` fetches its keys (by URL, or by discovery)."""
    return _write(tmp_path / "candidate", tokens=FETCHED[request.param])


def test_without_the_flag_fetched_keys_are_unknown(
    log: Path, fetching: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _replay(log, fetching, [], capsys)
    assert code == EXIT_OK
    assert _reasons(report) == {"token_keys_unknown": 2, "token_refused": 1}


def test_the_keys_that_were_served_replay_token_records_exactly(
    log: Path, fetching: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = tmp_path / "served.json"
    # The same key in other JSON: the key set, so its fingerprint, is the same.
    served.write_text(json.dumps(json.loads(jwks(KEY)), indent=3))
    code, report = _replay(log, fetching, ["--jwks", f"signed={served}"], capsys)
    assert code == EXIT_OK
    assert isinstance(report, dict)
    assert report["counts"]["unchanged"] == 2
    assert _reasons(report) == {"token_refused": 1}


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param(jwks(ROTATED), id="another key under the same kid"),
        pytest.param(jwks(rsa_key("rsa-2")), id="another kid"),
        pytest.param(jwks(KEY, rsa_key("rsa-2")), id="a key beside it"),
    ],
)
def test_other_keys_than_those_that_verified_them_are_a_changed_key(
    keys: str, log: Path, fetching: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = tmp_path / "served.json"
    served.write_text(keys)
    code, report = _replay(log, fetching, ["--jwks", f"signed={served}"], capsys)
    assert code == EXIT_OK
    assert _reasons(report) == {"token_key_changed": 2, "token_refused": 1}


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "not JSON": "{keys",
        "not a JWKS": '{"kty": "RSA"}',
        "no usable key": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
        "not UTF-8": b"\xff\xfe{",
    }
    paths = {}
    for name, content in files.items():
        path = tmp_path / f"{len(paths)}.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        paths[name] = path
    paths["missing"] = tmp_path / "missing.json"
    paths["a directory"] = tmp_path
    return paths


def test_a_file_that_is_not_a_usable_jwks_is_a_usage_error(
    log: Path, fetching: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, path in _bad_files(tmp_path).items():
        code, message = _replay(log, fetching, ["--jwks", f"signed={path}"], capsys)
        assert code == EXIT_USAGE, name
        assert f"--jwks signed={path}" in str(message), name
        assert "Traceback" not in str(message)


def test_a_flag_naming_what_the_candidate_does_not_fetch_is_a_usage_error(
    log: Path, fetching: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = tmp_path / "served.json"
    served.write_text(jwks(KEY))
    own_file = _write(tmp_path / "own")  # `signed` verifies with its own jwks_file
    cases: list[tuple[Path, list[str], str]] = [
        (fetching, ["--jwks", f"nobody={served}"], "no such organization"),
        (own_file, ["--jwks", f"signed={served}"], "has its own jwks_file"),
        (EXAMPLE_POLICIES, ["--jwks", f"acme={served}"], "verifies no token signature"),
        (fetching, ["--jwks", str(served)], "expected ORG=FILE"),
        (fetching, ["--jwks", f"={served}"], "expected ORG=FILE"),
        (fetching, ["--jwks", "signed="], "expected ORG=FILE"),
        (fetching, ["--jwks", f"signed={served}", "--jwks", f"signed={served}"], "given twice"),
    ]
    for policies, flags, expected in cases:
        code, message = _replay(log, policies, flags, capsys)
        assert code == EXIT_USAGE, flags
        assert expected in str(message), (flags, message)
