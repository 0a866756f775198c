"""Signed policy bundles: sign, verify, and a server that refuses a tampered directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.policy.bundle import BUNDLE_FILE, sign_bundle, verify_bundle
from policy_engine.store import DirectoryBackend, PolicyStore
from tests.scenarios import EXAMPLE_POLICIES, pdp


def key_pair(folder: Path, kind: str = "ed25519") -> tuple[Path, Path]:
    private = (
        ed25519.Ed25519PrivateKey.generate()
        if kind == "ed25519"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    private_file, public_file = folder / f"{kind}.key", folder / f"{kind}.pub"
    private_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_file, public_file


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, bytes]:
    policies = tmp_path / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policies)
    private, public = key_pair(tmp_path)
    sign_bundle(policies, private.read_bytes())
    return policies, public.read_bytes()


def test_signed_directory_loads(signed: tuple[Path, bytes]) -> None:
    policies, public = signed
    assert verify_bundle(policies, public) == []
    assert "acme" in load_policy_set(policies, bundle_public_key=public).organizations


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            lambda d: (d / "acme" / "org.yaml").write_text(
                (d / "acme" / "org.yaml").read_text().replace("delete_repo", "delete_nothing")
            ),
            "acme/org.yaml: content differs",
        ),
        (
            lambda d: (d / "acme" / "extra.yaml").write_text("kind: Policy\n"),
            "acme/extra.yaml: not in the signed bundle",
        ),
        (
            lambda d: (d / "acme" / "users" / "alice.yaml").unlink(),
            "acme/users/alice.yaml: signed but missing",
        ),
        (lambda d: (d / BUNDLE_FILE).unlink(), "missing"),
        (
            lambda d: (d / BUNDLE_FILE).write_text(
                (d / BUNDLE_FILE).read_text().strip()[:-4] + "AAAA"
            ),
            "invalid signature",
        ),
    ],
)
def test_tampering_is_refused_naming_what_changed(signed, tamper, expected: str) -> None:
    policies, public = signed
    tamper(policies)
    problems = verify_bundle(policies, public)
    assert any(expected in p for p in problems), problems
    with pytest.raises(PolicyLoadError, match=BUNDLE_FILE):
        load_policy_set(policies, bundle_public_key=public)


def test_another_key_is_refused(signed, tmp_path: Path) -> None:
    policies, _ = signed
    _, other_public = key_pair(tmp_path, "rsa")
    assert verify_bundle(policies, other_public.read_bytes())


def test_the_store_keeps_the_last_good_set_on_a_tampered_change(signed) -> None:
    policies, public = signed
    store = PolicyStore(DirectoryBackend(policies, bundle_public_key=public))
    store.reload("start")
    good = store.current().revision
    org = policies / "acme" / "org.yaml"
    org.write_text(org.read_text().replace("delete_repo", "delete_nothing"))
    store.reload("tampered")
    assert store.current().revision == good
    assert "content differs" in store.status().last_error


def test_cli_sign_and_verify(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policies)
    private, public = key_pair(tmp_path, "rsa")
    signed = pdp("bundle", "sign", str(policies), "--key", str(private))
    assert signed.returncode == 0, signed.stderr
    assert pdp("bundle", "verify", str(policies), "--public-key", str(public)).returncode == 0
    assert pdp("validate", str(policies), "--public-key", str(public)).returncode == 0
    (policies / "acme" / "org.yaml").write_text("kind: Policy\n")
    failed = pdp("bundle", "verify", str(policies), "--public-key", str(public))
    assert failed.returncode == 1 and "acme/org.yaml" in failed.stderr
