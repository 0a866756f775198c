"""What is loaded is what is signed: the signature covers every file the loader could read, and
the set is compiled from the verified bytes alone. Real files, real keys, a real server."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jwt
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import BundleSettings, PolicyLimits, ReloadSettings, Settings
from policy_engine.domain.decision import Effect
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, PolicyLoadError, load_policy_set
from policy_engine.policy.bundle import (
    BUNDLE_FILE,
    read_signed_snapshot,
    sign_bundle,
    verify_bundle,
)
from policy_engine.policy.loader import load_policy_source
from policy_engine.server.app import RunningServer, start_server
from policy_engine.store import DirectoryBackend, PolicyStore
from tests.auth.material import AUDIENCE, ISSUER, SigningKey, claims, jwks, rsa_key
from tests.policy.test_bundle import key_pair
from tests.policy_builder import request
from tests.scenarios import pdp
from tests.store.support import check_request, decide_scope, org_policy, write_policy_dir

LEGITIMATE = rsa_key("idp-1")
ATTACKER = rsa_key("idp-1")  # same kid: a swapped JWKS is all it takes
JWKS_FILE = "acme/.keys/jwks.json"  # finding 4: a hidden path

ORGANIZATION_YAML = f"""\
kind: Organization
organization: acme
catalog:
  integrations: [github]
  applications: [app]
tokens:
  jwks_file: .keys/jwks.json
  issuer: {ISSUER}
  audience: {AUDIENCE}
  required: true
"""


def write_org(root: Path) -> Path:
    write_policy_dir(root, org_policy(["repo"], deny=["delete_repo"]))
    (root / "acme" / "organization.yaml").write_text(ORGANIZATION_YAML)
    (root / JWKS_FILE).parent.mkdir()
    (root / JWKS_FILE).write_text(jwks(LEGITIMATE))
    return root


@pytest.fixture
def keys(tmp_path: Path) -> tuple[bytes, bytes]:
    private, public = key_pair(tmp_path)
    return private.read_bytes(), public.read_bytes()


@pytest.fixture
def signed(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    root = write_org(tmp_path / "policies")
    sign_bundle(root, keys[0])
    return root


def manifest(root: Path) -> dict[str, str]:
    token = (root / BUNDLE_FILE).read_text().strip()
    return json.loads(jwt.api_jws.PyJWS().decode(token, options={"verify_signature": False}))[
        "files"
    ]


def token_decision(policies: CompiledPolicySet, key: SigningKey) -> Effect:
    base = request("repo", application="app", groups=["engineering"])
    with_token = replace(base, subject=replace(base.subject, access_token=key.sign(**claims())))
    return decide(policies, with_token, now=datetime.now(UTC)).effect


# -- signing covers what the loader can read ---------------------------------------------------


def test_the_hidden_jwks_is_signed(signed: Path, keys: tuple[bytes, bytes]) -> None:
    assert set(manifest(signed)) == {
        "acme/organization.yaml",
        "acme/open.yaml",
        "acme/org.yaml",
        JWKS_FILE,
    }
    assert verify_bundle(signed, keys[1]) == []


def test_cli_signs_every_file_and_verify_names_a_swapped_jwks(tmp_path: Path) -> None:
    root = write_org(tmp_path / "policies")
    private, public = key_pair(tmp_path)
    signed = pdp("bundle", "sign", str(root), "--key", str(private))
    assert signed.returncode == 0, signed.stderr
    assert "signed 4 files" in signed.stdout
    (root / JWKS_FILE).write_text(jwks(ATTACKER))
    verified = pdp("bundle", "verify", str(root), "--public-key", str(public))
    assert verified.returncode == 1
    assert f"{JWKS_FILE}: content differs from the signed bundle" in verified.stderr
    validated = pdp("validate", str(root), "--public-key", str(public))
    assert validated.returncode == 1 and JWKS_FILE in validated.stderr


TAMPERING: list[tuple[str, Callable[[Path], object], str]] = [
    ("jwks swapped", lambda r: (r / JWKS_FILE).write_text(jwks(ATTACKER)), f"{JWKS_FILE}: content differs"),  # noqa: E501
    ("jwks removed", lambda r: (r / JWKS_FILE).unlink(), f"{JWKS_FILE}: signed but missing"),
    ("hidden key added", lambda r: (r / "acme/.keys/next.json").write_text("{}"), "acme/.keys/next.json: not in the signed bundle"),  # noqa: E501
    ("hidden yaml added", lambda r: (r / "acme/.draft.yaml").write_text("kind: Policy\n"), "acme/.draft.yaml: not in the signed bundle"),  # noqa: E501
    ("root file added", lambda r: (r / ".env").write_text("x"), ".env: not in the signed bundle"),
    ("other file added", lambda r: (r / "acme/notes.txt").write_text("x"), "acme/notes.txt: not in the signed bundle"),  # noqa: E501
    ("policy removed", lambda r: (r / "acme/open.yaml").unlink(), "acme/open.yaml: signed but missing"),  # noqa: E501
    ("policy added", lambda r: (r / "acme/extra.yaml").write_text("kind: Policy\n"), "acme/extra.yaml: not in the signed bundle"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(
    ("tamper", "expected"), [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING]
)
def test_a_file_changed_added_or_removed_after_signing_refuses_the_set(
    signed: Path, keys: tuple[bytes, bytes], tamper, expected: str
) -> None:
    store = PolicyStore(DirectoryBackend(signed, bundle_public_key=keys[1]))
    store.reload("start")
    good = store.current().revision
    tamper(signed)
    assert any(expected in p for p in verify_bundle(signed, keys[1])), verify_bundle(
        signed, keys[1]
    )
    with pytest.raises(PolicyLoadError, match=BUNDLE_FILE):
        load_policy_set(signed, bundle_public_key=keys[1])
    store.reload("tampered")
    assert store.current().revision == good  # the last good set keeps serving
    assert expected in store.status().last_error


# -- finding 4 through a real server -----------------------------------------------------------


@pytest.fixture
def server(signed: Path, tmp_path: Path, keys: tuple[bytes, bytes]) -> Iterator[RunningServer]:
    public_file = tmp_path / "bundle.pub"
    public_file.write_bytes(keys[1])
    settings = Settings(
        address="127.0.0.1:0",
        policy_dir=signed,
        threads=4,
        metrics_address="",
        reload=ReloadSettings(watch=False),
        bundle=BundleSettings(public_key_file=str(public_file)),
    )
    running = start_server(settings)
    try:
        yield running
    finally:
        running.stop(grace=None)


def _check(port: int, key: SigningKey) -> pdp_pb2.CheckResponse:
    message = check_request("repo")
    message.subject.access_token = key.sign(**claims(client_id=message.application.id))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        return stub.Check(message, timeout=10)


def test_finding_4_a_swapped_hidden_jwks_never_lets_the_attacker_in(
    server: RunningServer, signed: Path
) -> None:
    assert server.store is not None
    assert _check(server.port, LEGITIMATE).effect == pdp_pb2.EFFECT_ALLOW
    assert _check(server.port, ATTACKER).effect == pdp_pb2.EFFECT_DENY
    revision = server.store.current().revision
    (signed / JWKS_FILE).write_text(jwks(ATTACKER))
    server.store.reload("jwks swapped")
    assert server.store.current().revision == revision
    assert f"{JWKS_FILE}: content differs" in server.store.status().last_error
    denied = _check(server.port, ATTACKER)
    assert denied.effect == pdp_pb2.EFFECT_DENY
    assert denied.reasons[0].code == "kontext_authorization_required"
    assert _check(server.port, LEGITIMATE).effect == pdp_pb2.EFFECT_ALLOW


# -- one read: the verified bytes are the loaded bytes -----------------------------------------


def test_a_swap_after_verification_cannot_be_loaded(
    signed: Path, keys: tuple[bytes, bytes]
) -> None:
    """The loader compiles from the verified snapshot: change every file after the check, even
    delete the directory, and what loads is still exactly what was signed."""
    snapshot = read_signed_snapshot(signed, keys[1])
    expected = load_policy_set(signed, bundle_public_key=keys[1]).revision
    (signed / JWKS_FILE).write_text(jwks(ATTACKER))
    org = signed / "acme" / "org.yaml"
    org.write_text(org_policy(["repo", "delete_repo"]))
    loaded = load_policy_source(snapshot)
    assert loaded.revision == expected
    assert decide_scope(loaded, "delete_repo").effect is Effect.DENY
    assert token_decision(loaded, ATTACKER) is Effect.DENY
    assert token_decision(loaded, LEGITIMATE) is Effect.ALLOW
    shutil.rmtree(signed)  # nothing left to read a second time
    assert load_policy_source(snapshot).revision == expected


def test_verify_and_the_server_use_the_same_check(signed: Path, keys: tuple[bytes, bytes]) -> None:
    (signed / JWKS_FILE).write_text(jwks(ATTACKER))
    with pytest.raises(PolicyLoadError) as error:
        load_policy_set(signed, bundle_public_key=keys[1])
    assert [issue.message for issue in error.value.issues] == verify_bundle(signed, keys[1])


# -- symlinks and paths ------------------------------------------------------------------------


def test_a_jwks_file_leading_out_through_a_symlink_is_refused(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    root = write_org(tmp_path / "policies")
    outside = tmp_path / "outside.json"
    outside.write_text(jwks(ATTACKER))
    (root / JWKS_FILE).unlink()
    (root / JWKS_FILE).symlink_to(outside)
    with pytest.raises(PolicyLoadError, match="leads out through a symlink"):
        load_policy_set(root)
    sign_bundle(root, keys[0])  # signed or not, the same rule
    with pytest.raises(PolicyLoadError, match="leads out through a symlink"):
        load_policy_set(root, bundle_public_key=keys[1])


@pytest.mark.parametrize("path", ["../globex/jwks.json", "/etc/jwks.json", "a/../../x.json"])
def test_a_jwks_file_outside_the_organization_is_refused(tmp_path: Path, path: str) -> None:
    root = write_org(tmp_path / "policies")
    org = root / "acme" / "organization.yaml"
    org.write_text(org.read_text().replace(".keys/jwks.json", path))
    with pytest.raises(PolicyLoadError, match="must be inside the organization's folder"):
        load_policy_set(root)


def publish(root: Path, version: str, files: Path) -> None:
    """How a Kubernetes ConfigMap volume publishes: a hidden timestamped folder, `..data`
    renamed to point at it, and top-level names linking through `..data`."""
    shutil.copytree(files, root / version, symlinks=True)
    link = root / "..data_tmp"
    link.symlink_to(version)
    os.replace(link, root / "..data")
    for name in os.listdir(files):
        if not (root / name).is_symlink():
            (root / name).symlink_to(Path("..data") / name)


def test_a_kubernetes_volume_verifies_and_refuses_a_tampered_version(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    staging = write_org(tmp_path / "staging")
    sign_bundle(staging, keys[0])
    root = tmp_path / "volume"
    root.mkdir()
    publish(root, "..2026_01_01_00_00_00.1", staging)
    assert verify_bundle(root, keys[1]) == []
    good = load_policy_set(root, bundle_public_key=keys[1])
    assert token_decision(good, LEGITIMATE) is Effect.ALLOW
    (staging / JWKS_FILE).write_text(jwks(ATTACKER))  # a new version, old signature
    publish(root, "..2026_01_02_00_00_00.1", staging)
    assert verify_bundle(root, keys[1]) == [f"{JWKS_FILE}: content differs from the signed bundle"]


# -- hostile bundles ---------------------------------------------------------------------------


def _sign_payload(root: Path, private_pem: bytes, payload: bytes) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private_pem, password=None)
    (root / BUNDLE_FILE).write_text(jwt.api_jws.PyJWS().encode(payload, key, algorithm="EdDSA"))


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b'{"version": 1, "files": {"../../etc/passwd": "' + b"0" * 64 + b'"}}',
        b'{"version": 1, "files": {"acme/org.yaml": 5}}',
        b'{"version": 2, "files": {}}',
        b"not json",
        b"[" * 100_000,
    ],
    ids=["list", "escaping path", "bad digest", "other version", "not json", "deep json"],
)
def test_a_malformed_manifest_is_a_clear_error(
    signed: Path, keys: tuple[bytes, bytes], payload: bytes
) -> None:
    _sign_payload(signed, keys[0], payload)
    problems = verify_bundle(signed, keys[1])
    assert len(problems) == 1 and f"{BUNDLE_FILE} is malformed" in problems[0]


def test_an_oversize_bundle_is_refused_unread(signed: Path, keys: tuple[bytes, bytes]) -> None:
    with (signed / BUNDLE_FILE).open("wb") as handle:
        handle.truncate(10 * 1024 * 1024)
    problems = verify_bundle(signed, keys[1], PolicyLimits())
    assert problems == [
        f"{BUNDLE_FILE}: file is 10485760 bytes or more, over policy_limits.max_file_bytes "
        "(1048576); it was not parsed"
    ]


def test_an_oversize_signed_file_is_refused(signed: Path, keys: tuple[bytes, bytes]) -> None:
    problems = verify_bundle(signed, keys[1], PolicyLimits(max_file_bytes=200))
    assert any("policy_limits.max_file_bytes (200)" in p for p in problems)
