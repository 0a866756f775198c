"""Ed25519 keys for signing checkpoints: generation, loading and a short key id.

The key id (first 16 hex digits of the SHA-256 of the raw public key) is written into every
checkpoint, so `verify` can say "signed with another key" rather than just "bad signature".
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from policy_engine.errors import PolicyEngineError

log = logging.getLogger(__name__)


class KeyFileError(PolicyEngineError, ValueError):
    """A key file that cannot be used; the message names the file."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """Signs checkpoint bytes with one private key; `key_id` names its public half."""

    __slots__ = ("_key", "key_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    def sign(self, data: bytes) -> str:
        return self._key.sign(data).hex()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()


def verify_signature(public_key: Ed25519PublicKey, signature_hex: str, data: bytes) -> bool:
    try:
        public_key.verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def generate_keypair(private_path: Path, public_path: Path, *, force: bool = False) -> str:
    """Write a PEM Ed25519 pair (private key mode 0600, created atomically); returns the key id."""
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise KeyFileError(f"{path} exists (use --force to overwrite)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if force:
        private_path.unlink(missing_ok=True)
    # O_EXCL + mode: the private key is never readable by others, not even for an instant.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    os.chmod(private_path, 0o600)  # in case the umask or an old file interfered
    public_path.write_bytes(public_pem)
    return key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"signing key {path}: {exc.strerror or exc}") from exc
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("signing key %s is readable by group or others (mode %o)", path, mode)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"signing key {path}: not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"public key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"public key {path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key {path}: not an Ed25519 key")
    return key
