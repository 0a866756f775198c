"""The secret keys that sign the shared (Redis) level's entries, read and checked at startup.

Anyone who can write to Redis can write any bytes under any key, so a Redis value is only
trusted when it carries a tag (keyed BLAKE2b, RFC 7693 section 2.5) that only holders of a
signing key can compute. Running the Redis level without a key would let whoever reaches
Redis plant allows, so it is refused at startup, as is a key too short to be a secret.

Settings (`cache.*`); the key text is used as written, whitespace at either end trimmed:

- `redis_signing_key` or `redis_signing_key_file` (exactly one): the key that signs every
  entry this process writes, and verifies entries too. The file form keeps the secret out of
  config files, environments and process lists; it holds the key on one line.
- `redis_verify_keys` (comma-separated) and/or `redis_verify_keys_file` (one key per line):
  keys whose entries are still accepted but never written: the previous key during a
  rotation, or the next key staged before it signs.

Every key must be at least `MIN_KEY_BYTES` bytes of UTF-8 text; make one with
`openssl rand -hex 32` (64 characters, 256 bits).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from policy_engine.config import CacheSettings, ConfigError

MIN_KEY_BYTES = 32  # 256 bits as raw bytes; 128 bits of entropy as hex
KEY_ID_BYTES = 4  # names the key in each value; collisions only cost a miss
_HOW_TO_MAKE = "make one with `openssl rand -hex 32`"


@dataclass(frozen=True, slots=True)
class MacKey:
    """One key as the codec uses it: its BLAKE2b MAC key and its public identifier."""

    key_id: bytes  # KEY_ID_BYTES, written in clear in each value this key signs
    secret: bytes  # 64 bytes, the BLAKE2b key (RFC 7693 allows 1 to 64)

    @classmethod
    def derive(cls, key: str) -> MacKey:
        """Both halves derived from the key text with distinct personalizations, so the
        identifier written in clear says nothing about the MAC key."""
        raw = key.encode()
        return cls(
            key_id=hashlib.blake2b(raw, digest_size=KEY_ID_BYTES, person=b"pdp-cache-kid").digest(),
            secret=hashlib.blake2b(raw, digest_size=64, person=b"pdp-cache-mac").digest(),
        )


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """The key that signs, and every key that verifies (the signing key first)."""

    signing: MacKey
    verifying: tuple[MacKey, ...]

    @classmethod
    def of(cls, signing: str, *verify_only: str) -> SigningKeys:
        """Keys from their texts, without the length check (tests and tools)."""
        sign = MacKey.derive(signing)
        others = tuple(MacKey.derive(k) for k in verify_only if k != signing)
        return cls(sign, (sign, *others))


def redis_level_on(settings: CacheSettings) -> bool:
    """Whether these settings put a Redis level in the cache."""
    return settings.enabled and bool(settings.redis_url.strip())


def load_signing_keys(settings: CacheSettings) -> SigningKeys:
    """The configured keys, checked; the Redis level cannot run without them.

    Raises ConfigError (naming the setting) when no signing key is set, when both the inline
    and the file form are, when a key file cannot be read, or when any key is shorter than
    `MIN_KEY_BYTES` bytes.
    """
    inline, path = settings.redis_signing_key.strip(), settings.redis_signing_key_file.strip()
    if inline and path:
        raise ConfigError(
            "settings cache.redis_signing_key and cache.redis_signing_key_file: set one, not both"
        )
    if path:
        setting = "cache.redis_signing_key_file"
        lines = _key_lines(path, setting)
        if len(lines) != 1:
            raise ConfigError(
                f"setting {setting}: {path} must hold exactly one key, found {len(lines)} "
                "(keys that only verify go in cache.redis_verify_keys_file)"
            )
        signing = lines[0]
    elif inline:
        signing, setting = inline, "cache.redis_signing_key"
    else:
        raise ConfigError(
            "setting cache.redis_signing_key (or cache.redis_signing_key_file): required with "
            "cache.redis_url, so that whoever can write to Redis cannot plant decisions; "
            f"{_HOW_TO_MAKE} and give every replica the same key"
        )
    _check_length(signing, setting)
    verify: list[str] = []
    for key in settings.redis_verify_keys.split(","):
        if key.strip():
            verify.append(_check_length(key.strip(), "cache.redis_verify_keys"))
    if settings.redis_verify_keys_file.strip():
        setting = "cache.redis_verify_keys_file"
        for key in _key_lines(settings.redis_verify_keys_file.strip(), setting):
            verify.append(_check_length(key, setting))
    return SigningKeys.of(signing, *verify)


def _key_lines(path: str, setting: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"setting {setting}: cannot read {path} ({reason})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_length(key: str, setting: str) -> str:
    size = len(key.encode())
    if size < MIN_KEY_BYTES:
        raise ConfigError(
            f"setting {setting}: a key of {size} bytes is too short to be secret (at least "
            f"{MIN_KEY_BYTES} bytes); {_HOW_TO_MAKE}"
        )
    return key
