"""Where subject-token verification keys come from: a JWKS file, or a JWKS URL fetched and cached.

A key verifies a token only as its JWK allows (RFC 7517 section 4, RFC 7518 sections 3.1 and 6,
RFC 8037 section 2): `use` absent or "sig", `key_ops` absent or containing "verify", `alg` (when
present) equal to the token header's `alg`, and a `kty` (and `crv` for EC and OKP keys) that fits
that algorithm. Keys selected for a token are those under the header's `kid` that fit its `alg`;
several keys may share one `kid` (an RSA and an EC key, say) and each answers only for its own
algorithms. A JWK that can never verify (an encryption key, a symmetric or unknown key type, a
private key, broken key material) is skipped when the set is parsed, with a reason that is logged;
a set with no usable signature key at all is refused (`KeySetError`), since every token would
then be denied for a reason the operator should see at load time.

The request path never waits on the network: a remote key set answers from its cache, and an
unknown `kid` only *schedules* a refresh (at most one at a time, rate-limited), so key rotation
costs the first request that sees the new key a deny with a precise reason, never a hang.

Every key source has a `fingerprint`: SHA-256 over the canonical JSON of its usable JWKs (see
`key_set_fingerprint`), so it changes exactly when the keys that can verify a token change,
and two processes that fetched the same keys compute the same value. The decision cache keys
token decisions by it (`policy_engine.cache.key`): an entry decided with a key set is never
served once that key set has changed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    # PyJWT (and through it cryptography, ~8 MB of RSS) is imported when a key set is built:
    # a server whose organizations configure no token keys never needs it.
    from jwt import PyJWK

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1024 * 1024

# RFC 7518 section 3.1 (RSA, EC), RFC 8812 section 3.2 (secp256k1), RFC 8037 section 3.1 (OKP):
# the signature algorithms each key type and curve can verify.
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_ALGORITHMS_BY_CURVE: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-384"): ("ES384",),
    ("EC", "P-521"): ("ES512",),
    ("EC", "secp256k1"): ("ES256K",),
    ("OKP", "Ed25519"): ("EdDSA",),
    ("OKP", "Ed448"): ("EdDSA",),
}
# RFC 7518 sections 6.2.2 and 6.3.2, RFC 8037 section 2: members only a private key has.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")


@functools.cache
def _available() -> frozenset[str]:
    """The algorithms this PyJWT build can verify (asked once, on the first key)."""
    from jwt.algorithms import get_default_algorithms

    return frozenset(get_default_algorithms())


class KeySetError(ValueError):
    """A JWKS document that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A JWK left out of a key set: its position in the `keys` array, its `kid`, and why."""

    position: int
    kid: str | None
    reason: str

    def __str__(self) -> str:
        name = f"kid {self.kid!r}" if self.kid is not None else "no kid"
        return f"key {self.position} ({name}): {self.reason}"


def _shown(value: Any, limit: int = 40) -> str:
    """A value from a hostile document, short enough for a log line or a reason."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _signature_algorithms(jwk: Mapping[str, Any]) -> tuple[str, ...] | str:
    """The algorithms this JWK may verify, or why it may verify none."""
    use = jwk.get("use")
    if use is not None and use != "sig":
        return f"'use' is {_shown(use)}, not 'sig' (RFC 7517 section 4.2)"
    ops = jwk.get("key_ops")
    if ops is not None:
        if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
            return "'key_ops' is not an array of strings (RFC 7517 section 4.3)"
        if "verify" not in ops:
            return "'key_ops' does not contain 'verify' (RFC 7517 section 4.3)"
    kty = jwk.get("kty")
    if kty == "oct":
        return "a symmetric key (kty 'oct'); subject tokens are verified with public keys only"
    if kty == "RSA":
        fitting = _RSA_ALGORITHMS
    elif kty in ("EC", "OKP"):
        crv = jwk.get("crv")
        if not isinstance(crv, str) or (kty, crv) not in _ALGORITHMS_BY_CURVE:
            return f"unsupported curve {_shown(crv)} for kty {kty!r} (RFC 7518 section 6.2.1.1)"
        fitting = _ALGORITHMS_BY_CURVE[kty, crv]
    else:
        return f"unsupported kty {_shown(kty)} (RFC 7518 section 6.1)"
    present = [member for member in _PRIVATE_MEMBERS if member in jwk]
    if present:
        return (
            f"holds private key members ({', '.join(present)}); "
            "a JWKS for verification publishes public keys only"
        )
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in fitting:
            return f"'alg' {_shown(alg)} does not fit kty {kty!r} (RFC 7518 section 3.1)"
        fitting = (alg,)
    usable = tuple(a for a in fitting if a in _available())
    return usable or f"no supported algorithm for kty {kty!r}"


def key_set_fingerprint(jwks: Iterable[Mapping[str, Any]]) -> bytes:
    """SHA-256 (32 bytes) over the canonical form of a set of JWKs (RFC 7517 section 4).

    Each JWK is written as JSON with its members sorted and no whitespace; the distinct texts
    are sorted and hashed as one JSON array. So member order, key order in the `keys` array
    and repeated keys never change it, while any change to a key's material or to the members
    that decide what it may verify (`kid`, `alg`, `use`, `key_ops`, `kty`, `crv`) does.
    Raises ValueError or RecursionError only for values `json.dumps` cannot write.
    """
    texts = sorted({json.dumps(jwk, sort_keys=True, separators=(",", ":")) for jwk in jwks})
    return hashlib.sha256(json.dumps(texts, separators=(",", ":")).encode()).digest()


class KeySet:
    """The verification keys of one JWKS document, by `kid` and algorithm; immutable.

    `skipped` lists the JWKs that can never verify a signature, with the reason for each;
    `fingerprint` identifies the usable keys (`key_set_fingerprint` of their JWKs).
    """

    __slots__ = ("_by_algorithm", "_by_kid", "fingerprint", "skipped")

    def __init__(
        self,
        keys: list[tuple[str | None, PyJWK]],
        skipped: tuple[SkippedKey, ...],
        fingerprint: bytes,
    ) -> None:
        """`keys` holds one `(kid, PyJWK)` per JWK and algorithm it may verify; `fingerprint`
        is `key_set_fingerprint` of those JWKs."""
        by_kid: dict[tuple[str | None, str], list[PyJWK]] = {}
        by_algorithm: dict[str, list[PyJWK]] = {}
        for kid, key in keys:
            by_kid.setdefault((kid, key.algorithm_name), []).append(key)
            by_algorithm.setdefault(key.algorithm_name, []).append(key)
        self._by_kid = {index: tuple(found) for index, found in by_kid.items()}
        self._by_algorithm = {alg: tuple(found) for alg, found in by_algorithm.items()}
        self.skipped = skipped
        self.fingerprint = fingerprint

    def keys_for(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        """The keys that may verify a token with header `kid` and `alg`; empty when none.

        Without a `kid` only an unambiguous key is chosen: exactly one JWK fits `algorithm`.
        """
        if kid is not None:
            return self._by_kid.get((kid, algorithm), ())
        fitting = self._by_algorithm.get(algorithm, ())
        return fitting if len(fitting) == 1 else ()


EMPTY_KEY_SET = KeySet([], (), key_set_fingerprint(()))


def parse_jwks(data: bytes | str, source: str = "JWKS", *, log_skipped: bool = True) -> KeySet:
    """The usable signature keys of a JWKS document (RFC 7517 section 5).

    JWKs that can never verify are skipped, kept in `KeySet.skipped` and, with `log_skipped`,
    logged (a warning naming `source`, the key's position and `kid`, and the reason). Raises
    `KeySetError` when the document is not a JWKS or holds no usable signature key.
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise KeySetError(f"invalid JWKS: not JSON ({exc})") from None
    members = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise KeySetError("invalid JWKS: not a JSON object with a 'keys' array")
    keys: list[tuple[str | None, PyJWK]] = []
    usable: list[Mapping[str, Any]] = []
    skipped: list[SkippedKey] = []
    for position, jwk in enumerate(members):
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        problem = _unusable(jwk, kid)
        if isinstance(problem, str):
            skipped.append(SkippedKey(position, kid if isinstance(kid, str) else None, problem))
            continue
        keys.extend((kid, key) for key in problem)
        usable.append(jwk)
    for entry in skipped if log_skipped else ():
        log.warning("%s: %s; skipped", source, entry)
    if not keys:
        reasons = "; ".join(str(entry) for entry in skipped[:5]) or "the 'keys' array is empty"
        raise KeySetError(f"invalid JWKS: no usable signature key ({reasons})")
    # Only usable keys count: a skipped JWK can verify nothing, so it cannot change a decision.
    try:
        fingerprint = key_set_fingerprint(usable)
    except (ValueError, RecursionError) as exc:  # a member nested just within json's limit
        raise KeySetError(f"invalid JWKS: cannot be fingerprinted ({exc})") from None
    return KeySet(keys, tuple(skipped), fingerprint)


def _unusable(jwk: Any, kid: Any) -> list[PyJWK] | str:
    """One PyJWK per algorithm the JWK may verify, or why it is skipped."""
    if not isinstance(jwk, dict):
        return "not a JSON object"
    if kid is not None and not isinstance(kid, str):
        return "'kid' is not a string (RFC 7517 section 4.5)"
    algorithms = _signature_algorithms(jwk)
    if isinstance(algorithms, str):
        return algorithms
    from jwt import PyJWK

    try:
        return [PyJWK(jwk, algorithm) for algorithm in algorithms]
    except Exception as exc:  # any fault in hostile key material skips this key only
        return f"invalid key material ({type(exc).__name__}: {_shown(str(exc), 80)})"


class KeySource(Protocol):
    @property
    def fingerprint(self) -> bytes:
        """The current key set's `KeySet.fingerprint` (32 bytes); it changes with the keys."""
        ...

    def keys_for(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        """The keys that may verify a token with this `kid` and `alg` (never blocks on I/O)."""
        ...


class StaticKeySet:
    """Keys read once, at policy load: a file shipped with the policies, or given to the CLI."""

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys

    @property
    def skipped(self) -> tuple[SkippedKey, ...]:
        return self._keys.skipped

    @property
    def fingerprint(self) -> bytes:
        return self._keys.fingerprint

    @classmethod
    def from_file(cls, path: Path) -> StaticKeySet:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeySetError(f"cannot read JWKS file {path}: {exc.strerror or exc}") from exc
        return cls(parse_jwks(data, source=str(path)))

    def keys_for(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        return self._keys.keys_for(kid, algorithm)


def fetch_url(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read(MAX_JWKS_BYTES + 1)


class RemoteKeySet:
    """A JWKS URL, fetched in the background: on first use, every `max_age`, and on unknown kids.

    A token signed with a key the set does not know yet (the IdP just rotated) waits up to
    `unknown_kid_wait` seconds for the refresh it triggers, so the first request after a
    rotation is not refused; refreshes stay rate-limited (`min_refresh_interval`), so tokens
    with made-up kids cannot make the PDP fetch, or wait, more than once per interval.
    """

    def __init__(
        self,
        url: str,
        *,
        max_age: float = 300.0,
        min_refresh_interval: float = 30.0,
        timeout: float = 5.0,
        unknown_kid_wait: float = 1.0,
        fetch: Callable[[str, float], bytes] = fetch_url,
    ) -> None:
        self.url = url
        self._max_age = max_age
        self._min_interval = min_refresh_interval
        self._timeout = timeout
        self._fetch = fetch
        self._unknown_kid_wait = unknown_kid_wait
        self._refreshed = threading.Event()  # set when the refresh in flight (if any) ends
        self._refreshed.set()
        self._keys = EMPTY_KEY_SET
        self._fetched_at = float("-inf")
        self._last_attempt = float("-inf")
        self._lock = threading.Lock()
        self._refreshing = False
        self.refresh_count = 0
        self.last_error = ""

    @property
    def skipped(self) -> tuple[SkippedKey, ...]:
        return self._keys.skipped

    @property
    def fingerprint(self) -> bytes:
        """The fetched keys' fingerprint; kept by a failed refresh, as the keys are. Before
        the first successful fetch, the empty set's."""
        return self._keys.fingerprint

    def keys_for(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        keys = self._keys.keys_for(kid, algorithm)
        now = time.monotonic()
        stale = now - self._fetched_at > self._max_age
        if (not keys or stale) and now - self._last_attempt >= self._min_interval:
            self._schedule_refresh()
        if not keys and not self._refreshed.is_set():
            # A refresh is in flight (ours or another request's): it may bring this key.
            self._refreshed.wait(self._unknown_kid_wait)
            keys = self._keys.keys_for(kid, algorithm)
        return keys

    def refresh_now(self) -> None:
        """Fetch synchronously (used at startup and by tests); failures keep the old keys."""
        self._last_attempt = time.monotonic()
        try:
            data = self._fetch(self.url, self._timeout)
            if len(data) > MAX_JWKS_BYTES:
                raise KeySetError("JWKS document larger than 1 MiB")
            keys = parse_jwks(data, source=self.url, log_skipped=False)
            if keys.skipped != self._keys.skipped:  # logged when they change, not every refresh
                for entry in keys.skipped:
                    log.warning("%s: %s; skipped", self.url, entry)
            self._keys = keys
            self._fetched_at = time.monotonic()
            self.last_error = ""
        except Exception as exc:  # network, HTTP, JSON: keep serving the keys we have
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("JWKS refresh from %s failed: %s", self.url, self.last_error)
        finally:
            self.refresh_count += 1

    def _schedule_refresh(self) -> None:
        with self._lock:
            if self._refreshing or time.monotonic() - self._last_attempt < self._min_interval:
                return
            self._refreshing = True
            self._refreshed.clear()
            self._last_attempt = time.monotonic()

        def run() -> None:
            try:
                self.refresh_now()
            finally:
                with self._lock:
                    self._refreshing = False
                    self._refreshed.set()

        threading.Thread(target=run, name="jwks-refresh", daemon=True).start()


class RemoteKeySets:
    """One `RemoteKeySet` per JWKS URL, kept across policy reloads.

    Without it every reload would fetch every organization's JWKS again and start its rate
    limit afresh; with it a reload reuses the set (and its keys), which refreshes itself.
    Thread-safe; a URL is fetched synchronously the first time it is asked for (loads run off
    the request path).
    """

    def __init__(self, factory: Callable[[str], RemoteKeySet] = RemoteKeySet) -> None:
        self._factory = factory
        self._sets: dict[str, RemoteKeySet] = {}
        self._lock = threading.Lock()

    def get(self, url: str) -> RemoteKeySet:
        with self._lock:
            remote = self._sets.get(url)
            if remote is None:
                remote = self._sets[url] = self._factory(url)
                remote.refresh_now()
            return remote
