"""Signed policy bundles: a manifest of every file's hash, signed as a JWS (RFC 7515).

`pdp bundle sign DIR --key KEY` writes `DIR/policy-bundle.jws` over every file the loader
could read below DIR (hidden ones included: a JWKS in `.keys/` is signed like a policy).
`read_signed_snapshot` is the one verification, used by the server, `pdp validate` and
`pdp bundle verify` alike: it checks the signature, reads each signed file once (bounded),
checks its SHA-256, refuses a file present but not signed or signed but missing, and returns
the verified bytes as a SnapshotSource. The loader loads from that snapshot and nothing else,
so a file swapped after the check is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from policy_engine.config import PolicyLimits
from policy_engine.errors import PolicyEngineError
from policy_engine.policy.source import (
    BUNDLE_FILE,
    SnapshotSource,
    SourceError,
    SourceFile,
    read_bounded,
    read_snapshot,
    tree_files,
)

__all__ = [
    "BUNDLE_FILE",
    "BundleError",
    "BundleVerificationError",
    "bundle_files",
    "read_signed_snapshot",
    "read_tree",
    "sign_bundle",
    "verify_bundle",
]

MANIFEST_VERSION = 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class BundleError(PolicyEngineError, ValueError):
    """The bundle cannot be signed; the message says exactly why."""


class BundleVerificationError(PolicyEngineError):
    """The directory is not exactly as signed; `problems` names each reason (one per file)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# PyJWT and cryptography (~8 MB of RSS) are imported by the functions that sign or verify:
# the loader imports this module, and a server without a bundle key never needs them.


def _algorithm(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    raise BundleError(f"unsupported key type {type(key).__name__} (use Ed25519, P-256 or RSA)")


def read_tree(
    directory: Path, limits: PolicyLimits | None = None
) -> tuple[SnapshotSource, list[str]]:
    """Every file below `directory` that the loader could read (see source.tree_files), read
    once each: the snapshot to validate and sign, and one problem per unreadable file."""
    names = tree_files(directory)
    files, real_folders, problems = read_snapshot(directory, names, limits)
    return SnapshotSource(directory, files, real_folders, missing="does not exist"), problems


def _hashes(files: Mapping[str, SourceFile]) -> dict[str, str]:
    return {name: hashlib.sha256(files[name].data).hexdigest() for name in sorted(files)}


def bundle_files(directory: Path, limits: PolicyLimits | None = None) -> dict[str, str]:
    """sha256 (hex) of every file the loader could read below `directory`, by relative path."""
    snapshot, problems = read_tree(directory, limits)
    if problems:
        raise BundleError("; ".join(problems))
    return _hashes(snapshot.files)


def sign_bundle(
    directory: Path, private_key_pem: bytes, snapshot: SnapshotSource | None = None
) -> Path:
    """Writes `directory/policy-bundle.jws` over `snapshot` (default: the directory read now).

    Pass the snapshot you validated, so exactly the bytes checked are the bytes signed.
    Raises BundleError for an unusable key or an unreadable file.
    """
    import jwt
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"not a usable PEM private key: {exc}") from exc
    algorithm = _algorithm(key)  # BundleError for any other kind of key
    if not isinstance(key, Ed25519PrivateKey | EllipticCurvePrivateKey | RSAPrivateKey):
        raise BundleError(f"not a private key: {type(key).__name__}")
    if snapshot is None:
        snapshot, problems = read_tree(directory)
        if problems:
            raise BundleError("; ".join(problems))
    manifest = {
        "version": MANIFEST_VERSION,
        "signed_at": datetime.now(UTC).isoformat(),
        "files": _hashes(snapshot.files),
    }
    payload = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    token = jwt.api_jws.PyJWS().encode(payload, key, algorithm=algorithm)
    target = directory / BUNDLE_FILE
    target.write_text(token + "\n")
    return target


def _signed_manifest(
    directory: Path, key: Any, algorithm: str, limits: PolicyLimits
) -> tuple[dict[str, str], datetime]:
    """The verified manifest's `files` (relative path -> sha256 hex) and `signed_at`; raises
    BundleVerificationError naming what is wrong with the signature or its shape."""
    path = directory / BUNDLE_FILE
    if not os.path.lexists(path):
        raise BundleVerificationError([f"{BUNDLE_FILE} is missing: signed policies are required"])
    try:
        token = read_bounded(path, limits.max_file_bytes).data  # ~100 bytes a signed file
    except SourceError as exc:
        raise BundleVerificationError([f"{BUNDLE_FILE}: {exc}"]) from None
    import jwt

    try:
        payload = jwt.api_jws.PyJWS().decode(token.strip(), key, algorithms=[algorithm])
        manifest = json.loads(payload)
    except jwt.InvalidSignatureError:
        raise BundleVerificationError([f"{BUNDLE_FILE} has an invalid signature"]) from None
    except (jwt.PyJWTError, ValueError, RecursionError) as exc:
        raise BundleVerificationError(
            [f"{BUNDLE_FILE} is malformed: {type(exc).__name__}"]
        ) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("version") != MANIFEST_VERSION
        or not isinstance(files, dict)
        or not all(
            isinstance(name, str)
            and _is_relative(name)
            and isinstance(digest, str)
            and _SHA256_HEX.fullmatch(digest)
            for name, digest in files.items()
        )
    ):
        raise BundleVerificationError(
            [f"{BUNDLE_FILE} is malformed: not a version {MANIFEST_VERSION} manifest"]
        )
    signed_at = _instant(manifest.get("signed_at"))
    if signed_at is None:
        raise BundleVerificationError(
            [f"{BUNDLE_FILE} is malformed: 'signed_at' is not an ISO 8601 time with a zone"]
        )
    return dict(files), signed_at


def _instant(value: Any) -> datetime | None:
    """An ISO 8601 time with a UTC offset, as `sign_bundle` writes it; None otherwise."""
    if not isinstance(value, str):
        return None
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        return None
    return instant if instant.tzinfo is not None else None


def _is_relative(name: str) -> bool:
    parts = name.split("/")
    return (
        bool(name)
        and "\\" not in name
        and "\0" not in name
        and all(part not in ("", ".", "..") for part in parts)
    )


def read_signed_snapshot(
    directory: Path,
    public_key_pem: bytes,
    limits: PolicyLimits | None = None,
    *,
    not_before: datetime | None = None,
) -> SnapshotSource:
    """The directory's files exactly as signed, read once each; the loader loads from this.
    The snapshot's `signed_at` is the manifest's signing time.

    Raises BundleVerificationError with every problem: an unusable key; a missing, invalid or
    malformed signature; a bundle signed before `not_before` (a rollback to an older signed
    set: the serving set's signing time, or `bundle.not_before`); and per file: not in the
    signed bundle, signed but missing, content differs, unreadable or over the size limits.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    limits = limits or PolicyLimits()
    try:
        key = load_pem_public_key(public_key_pem)
        algorithm = _algorithm(key)
    except (ValueError, TypeError, BundleError) as exc:
        raise BundleVerificationError([f"bundle public key is not usable: {exc}"]) from None
    signed, signed_at = _signed_manifest(directory, key, algorithm, limits)
    if not_before is not None and signed_at < not_before:
        raise BundleVerificationError(
            [
                f"{BUNDLE_FILE} was signed at {signed_at.isoformat()}, before "
                f"{not_before.isoformat()}: an older signed set is not loaded (rollback)"
            ]
        )
    present = set(tree_files(directory))
    problems = [f"{name}: not in the signed bundle" for name in sorted(present - set(signed))]
    problems += [f"{name}: signed but missing" for name in sorted(set(signed) - present)]
    files, real_folders, unreadable = read_snapshot(
        directory, sorted(set(signed) & present), limits
    )
    problems += unreadable
    problems += [
        f"{name}: content differs from the signed bundle"
        for name, file in files.items()
        if hashlib.sha256(file.data).hexdigest() != signed[name]
    ]
    if problems:
        raise BundleVerificationError(problems)
    return SnapshotSource(
        directory,
        files,
        real_folders,
        missing="is not in the signed bundle",
        signed_at=signed_at,
    )


def verify_bundle(
    directory: Path, public_key_pem: bytes, limits: PolicyLimits | None = None
) -> list[str]:
    """Every problem with the directory's signature; empty when the files are exactly as signed.
    The same check the loader makes (read_signed_snapshot)."""
    try:
        read_signed_snapshot(directory, public_key_pem, limits)
    except BundleVerificationError as exc:
        return exc.problems
    return []
