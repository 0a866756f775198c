"""Signed policy bundles: a manifest of every file's hash, signed as a JWS.

`pdp bundle sign DIR --key KEY` writes `DIR/policy-bundle.jws`. A server configured with the
public key refuses (keeping its last good set) a directory whose signature is missing, invalid,
or does not match the files exactly: a changed, added or removed file is named.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

BUNDLE_FILE = "policy-bundle.jws"
MANIFEST_VERSION = 1


class BundleError(ValueError):
    """The bundle cannot be signed or does not verify; the message says exactly why."""


def _algorithm(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    raise BundleError(f"unsupported key type {type(key).__name__} (use Ed25519, P-256 or RSA)")


def bundle_files(directory: Path) -> dict[str, str]:
    """sha256 of every regular, non-hidden file below `directory` but the signature itself."""
    hashes: dict[str, str] = {}
    for folder, subfolders, names in os.walk(directory, followlinks=True):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in names:
            path = Path(folder, name)
            relative = path.relative_to(directory).as_posix()
            if name.startswith(".") or relative == BUNDLE_FILE or not path.is_file():
                continue
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(hashes.items()))


def sign_bundle(directory: Path, private_key_pem: bytes) -> Path:
    try:
        key = load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"not a usable PEM private key: {exc}") from exc
    manifest = {
        "version": MANIFEST_VERSION,
        "signed_at": datetime.now(UTC).isoformat(),
        "files": bundle_files(directory),
    }
    payload = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    token = jwt.api_jws.PyJWS().encode(payload, key, algorithm=_algorithm(key))
    target = directory / BUNDLE_FILE
    target.write_text(token + "\n")
    return target


def verify_bundle(directory: Path, public_key_pem: bytes) -> list[str]:
    """Every problem with the directory's signature; empty when the files are exactly as signed."""
    try:
        key = load_pem_public_key(public_key_pem)
        algorithm = _algorithm(key)
    except (ValueError, TypeError, BundleError) as exc:
        return [f"bundle public key is not usable: {exc}"]
    path = directory / BUNDLE_FILE
    try:
        token = path.read_text().strip()
    except OSError:
        return [f"{BUNDLE_FILE} is missing: signed policies are required"]
    try:
        payload = jwt.api_jws.PyJWS().decode(token, key, algorithms=[algorithm])
        manifest = json.loads(payload)
        signed: dict[str, str] = dict(manifest["files"])
    except jwt.InvalidSignatureError:
        return [f"{BUNDLE_FILE} has an invalid signature"]
    except (jwt.PyJWTError, ValueError, KeyError, TypeError) as exc:
        return [f"{BUNDLE_FILE} is malformed: {type(exc).__name__}"]
    actual = bundle_files(directory)
    problems = [f"{name}: not in the signed bundle" for name in sorted(set(actual) - set(signed))]
    problems += [f"{name}: signed but missing" for name in sorted(set(signed) - set(actual))]
    problems += [
        f"{name}: content differs from the signed bundle"
        for name in sorted(set(signed) & set(actual))
        if signed[name] != actual[name]
    ]
    return problems
