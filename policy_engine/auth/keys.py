"""Where subject-token verification keys come from: a JWKS file, or a JWKS URL fetched and cached
(named in the policies, or discovered from the issuer's metadata: `policy_engine.auth.discovery`).

A key verifies a token only as its JWK allows (RFC 7517 section 4, RFC 7518 sections 3.1 and 6,
RFC 8037 section 2): `use` absent or "sig", `key_ops` absent or containing "verify", `alg` (when
present) equal to the token header's `alg`, and a `kty` (and `crv` for EC and OKP keys) that fits
that algorithm. Keys selected for a token are those under the header's `kid` that fit its `alg`;
several keys may share one `kid` (an RSA and an EC key, say) and each answers only for its own
algorithms, but at most `MAX_KEYS_PER_KID` of them: verification tries every key under a
token's `kid`, so a document listing thousands under one `kid` would let anyone with a forged
token spend a signature check per listed key (2,300 RSA keys: 0.13 s of the event loop, every
organization's, per token). The keys past that bound are skipped, with a reason. A JWK that
can never verify (an encryption key, a symmetric or unknown key type, a private key, broken
key material) is skipped when the set is parsed, with a reason that is logged; a set with no
usable signature key at all is refused (`KeySetError`), since every token would
then be denied for a reason the operator should see at load time.

Nothing waits on the network where it would hold others up: a remote key set answers from the
keys it has, and an unknown `kid` only *starts* a refresh (at most one at a time, rate-limited)
on the event loop (`policy_engine.auth.fetch` does the HTTP). A policy load takes a remote set
at once, empty until its first fetch lands. The asyncio pipeline waits for a refresh that may
bring a token's key, for that request only and within its deadline
(`policy_engine.auth.pending`), so the first request after a rotation at the IdP is not refused.

Every key source has a `fingerprint`: SHA-256 over the canonical JSON of its usable JWKs (see
`key_set_fingerprint`), so it changes exactly when the keys that can verify a token change,
and two processes that fetched the same keys compute the same value. The decision cache keys
token decisions by it (`policy_engine.cache.key`): an entry decided with a key set is never
served once that key set has changed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from policy_engine.auth.discovery import Fetch, IssuerMetadata
from policy_engine.auth.fetch import MAX_JWKS_BYTES, JwksFetcher
from policy_engine.errors import PolicyEngineError
from policy_engine.lifecycle import ComponentStatus, State, event_loop

if TYPE_CHECKING:
    # PyJWT (and through it cryptography, ~8 MB of RSS) is imported when a key set is built:
    # a server whose organizations configure no token keys never needs it.
    from jwt import PyJWK

log = logging.getLogger(__name__)


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
# Usable JWKs kept under one `kid`: a rotation may publish a few, verification tries them all.
MAX_KEYS_PER_KID = 4
# RFC 7518 sections 6.2.2 and 6.3.2, RFC 8037 section 2: members only a private key has.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")


@functools.cache
def supported_algorithms() -> frozenset[str]:
    """The algorithms this PyJWT build can verify (asked once, on the first key)."""
    from jwt.algorithms import get_default_algorithms

    return frozenset(get_default_algorithms())


class KeySetError(PolicyEngineError, ValueError):
    """A JWKS document that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A JWK left out of a key set: its position in the `keys` array, its `kid`, and why."""

    position: int
    kid: str | None
    reason: str

    def __str__(self) -> str:
        name = f"kid {_shown(self.kid, 80)}" if self.kid is not None else "no kid"
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
    fitting: tuple[str, ...]  # the algorithms the key type allows
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
    usable = tuple(a for a in fitting if a in supported_algorithms())
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

    __slots__ = ("_by_algorithm", "_by_kid", "fingerprint", "size", "skipped")

    def __init__(
        self,
        keys: list[tuple[str | None, PyJWK]],
        skipped: tuple[SkippedKey, ...],
        fingerprint: bytes,
        size: int = 0,
    ) -> None:
        """`keys` holds one `(kid, PyJWK)` per JWK and algorithm it may verify; `fingerprint`
        is `key_set_fingerprint` of those JWKs, `size` their number."""
        by_kid: dict[tuple[str | None, str], list[PyJWK]] = {}
        by_algorithm: dict[str, list[PyJWK]] = {}
        for kid, key in keys:
            by_kid.setdefault((kid, key.algorithm_name), []).append(key)
            by_algorithm.setdefault(key.algorithm_name, []).append(key)
        self._by_kid = {index: tuple(found) for index, found in by_kid.items()}
        self._by_algorithm = {alg: tuple(found) for alg, found in by_algorithm.items()}
        self.skipped = skipped
        self.fingerprint = fingerprint
        self.size = size

    def keys_for(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        """The keys that may verify a token with header `kid` and `alg`; empty when none.

        Without a `kid` only an unambiguous key is chosen: exactly one JWK fits `algorithm`.
        """
        if kid is not None:
            return self._by_kid.get((kid, algorithm), ())
        fitting = self._by_algorithm.get(algorithm, ())
        return fitting if len(fitting) == 1 else ()


EMPTY_KEY_SET = KeySet([], (), key_set_fingerprint(()))


MAX_LOGGED_SKIPPED = 10  # skipped keys logged one by one per parse; one line counts the rest


def _log_skipped(source: str, skipped: tuple[SkippedKey, ...] | list[SkippedKey]) -> None:
    """A warning for each of the first MAX_LOGGED_SKIPPED skipped keys, then one counting the
    rest: 1 MiB of JWKS holds tens of thousands of unusable keys, and a hostile endpoint that
    changes them at every refresh would otherwise write them all to the log, on the event
    loop that answers every organization."""
    for entry in skipped[:MAX_LOGGED_SKIPPED]:
        log.warning("%s: %s; skipped", source, entry)
    if len(skipped) > MAX_LOGGED_SKIPPED:
        log.warning("%s: %d more keys skipped", source, len(skipped) - MAX_LOGGED_SKIPPED)


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
    per_kid: dict[str, int] = {}
    for position, jwk in enumerate(members):
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        if isinstance(kid, str) and per_kid.get(kid, 0) >= MAX_KEYS_PER_KID:
            # Checked before the key material is read: a flood of them costs no parsing.
            problem: list[PyJWK] | str = (
                f"more than {MAX_KEYS_PER_KID} usable keys share this kid (verification "
                "tries each of them)"
            )
        else:
            problem = _unusable(jwk, kid)
        if isinstance(problem, str):
            skipped.append(SkippedKey(position, kid if isinstance(kid, str) else None, problem))
            continue
        if isinstance(kid, str):
            per_kid[kid] = per_kid.get(kid, 0) + 1
        keys.extend((kid, key) for key in problem)
        usable.append(jwk)
    if log_skipped:
        _log_skipped(source, skipped)
    if not keys:
        reasons = "; ".join(str(entry) for entry in skipped[:5]) or "the 'keys' array is empty"
        raise KeySetError(f"invalid JWKS: no usable signature key ({reasons})")
    # Only usable keys count: a skipped JWK can verify nothing, so it cannot change a decision.
    try:
        fingerprint = key_set_fingerprint(usable)
    except (ValueError, RecursionError) as exc:  # a member nested just within json's limit
        raise KeySetError(f"invalid JWKS: cannot be fingerprinted ({exc})") from None
    return KeySet(keys, tuple(skipped), fingerprint, len(usable))


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

    @property
    def available(self) -> bool:
        """False while the keys are not known at all (a JWKS URL not fetched yet)."""
        ...

    def keys_for(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        """The keys that may verify a token with this `kid` and `alg` (never blocks on I/O)."""
        ...


class StaticKeySet:
    """Keys read once, at policy load: a file shipped with the policies, or given to the CLI."""

    available = True

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


LoopOf = Callable[[], "asyncio.AbstractEventLoop | None"]
"""The event loop refreshes run on; None when they may no longer start (stopped)."""


def _process_loop() -> asyncio.AbstractEventLoop:
    return event_loop().loop


def _wait(future: Future[None], deadline: float) -> None:
    """Block (off the loop) until `future` is done or `deadline` (time.monotonic()) passes."""
    futures_wait([future], timeout=max(0.0, deadline - time.monotonic()))


class RemoteKeySet:
    """A JWKS URL's keys, fetched in the background on an event loop: once when it is first
    asked for (`RemoteKeySets.get`), every `max_age` seconds, and when a token names a key the
    set does not have (the IdP rotated).

    `keys_for` never waits: it answers from the keys it has and, when they lack the key asked
    for or are older than `max_age`, starts a refresh (at most one at a time, at most one per
    `min_refresh_interval`, so tokens with made-up kids cannot make the PDP fetch more often).
    Whoever may wait (the asyncio pipeline, for at most the caller's remaining time) awaits
    `pending_refresh` first: see `policy_engine.auth.pending`. A refresh that fails keeps the
    keys (and so the fingerprint) it had; each new failure is logged once, as is the recovery.
    Before the first fetch has succeeded the set is empty and `available` is False: tokens are
    denied ("keys not available"), never allowed. Thread-safe.

    With `discovery` the URL is not known in advance: each refresh first asks the issuer's
    metadata for its `jwks_uri` (`IssuerMetadata.resolve`: kept while younger than its
    `max_age`, the last good one kept when the metadata fails), then fetches the keys from it,
    so `url` is the `jwks_uri` in use ("" until the first valid metadata arrived). A refresh
    that finds no usable metadata at all fails like a failed fetch.
    """

    def __init__(
        self,
        url: str,
        *,
        max_age: float = 300.0,
        min_refresh_interval: float = 30.0,
        timeout: float = 5.0,
        unknown_kid_wait: float = 1.0,
        fetch: Fetch | None = None,
        loop: LoopOf = _process_loop,
        discovery: IssuerMetadata | None = None,
    ) -> None:
        """`timeout`: seconds for a whole fetch; `unknown_kid_wait`: the most a request whose
        key is missing waits for a refresh (`pending_refresh`); `fetch`: default, a
        `JwksFetcher` of this set's own; `loop`: where refreshes run (default: the process's
        `policy_engine.lifecycle.event_loop()`, started on first use); `discovery`: where the
        URL comes from when `url` is "" (see the class docstring). No I/O here."""
        self.url = url
        self.discovery = discovery
        self.unknown_kid_wait = unknown_kid_wait
        self._max_age = max_age
        self._min_interval = min_refresh_interval
        self._timeout = timeout
        self._fetch = fetch if fetch is not None else JwksFetcher().fetch
        self._loop = loop
        self._lock = threading.Lock()
        self._keys = EMPTY_KEY_SET
        self._fetched_at = float("-inf")  # time.monotonic() of the last successful fetch
        self._last_attempt = float("-inf")
        self._pending: Future[None] | None = None  # the refresh in flight
        self.refresh_count = 0
        self.last_error = ""  # why the last refresh failed; empty once one succeeds

    @property
    def skipped(self) -> tuple[SkippedKey, ...]:
        return self._keys.skipped

    @property
    def fingerprint(self) -> bytes:
        """The fetched keys' fingerprint; kept by a failed refresh, as the keys are. Before
        the first successful fetch, the empty set's."""
        return self._keys.fingerprint

    @property
    def available(self) -> bool:
        """Has a fetch succeeded (are there keys at all)?"""
        return self._fetched_at > float("-inf")

    def keys_for(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        keys = self._keys.keys_for(kid, algorithm)
        now = time.monotonic()
        stale = now - self._fetched_at > self._max_age
        if (not keys or stale) and now - self._last_attempt >= self._min_interval:
            self.refresh()
        return keys

    def pending_refresh(self, kid: str | None, algorithm: str) -> Future[None] | None:
        """The refresh that may bring the keys for `kid` and `algorithm` when the set has none:
        the one in flight, or one started now if the rate limit allows; None when the keys
        are there or no refresh is in flight or allowed. Never blocks."""
        if self._keys.keys_for(kid, algorithm):
            return None
        return self.refresh()

    def refresh(self, *, force: bool = False) -> Future[None] | None:
        """Start a refresh on the loop unless one is in flight or (without `force`) the rate
        limit forbids it; returns the refresh in flight (a `concurrent.futures.Future` that
        never raises), or None. Thread-safe; never blocks."""
        with self._lock:
            pending = self._pending
            if pending is not None:
                return pending
            now = time.monotonic()
            if not force and now - self._last_attempt < self._min_interval:
                return None
            loop = self._loop()
            if loop is None or loop.is_closed():
                return None
            self._last_attempt = now
            refresh = self._refresh()
            try:
                pending = asyncio.run_coroutine_threadsafe(refresh, loop)
            except RuntimeError:  # the loop closed in between
                refresh.close()
                return None
            self._pending = pending
        pending.add_done_callback(self._refreshed)
        return pending

    def refresh_now(self, timeout: float | None = None) -> None:
        """Fetch now and wait for it, at most `timeout` seconds (default: the fetch timeout
        plus 5 s to parse); for tests and one-off loads. A refresh in flight is waited for
        first, so the keys returned come from a fetch started after this call. Failures
        keep the old keys (see `last_error`). Raises RuntimeError on the loop's own thread."""
        loop = self._loop()
        if loop is not None and _running_loop() is loop:
            raise RuntimeError("RemoteKeySet.refresh_now on its event loop would deadlock")
        deadline = time.monotonic() + (self._timeout + 5.0 if timeout is None else timeout)
        earlier = self._pending
        if earlier is not None:
            _wait(earlier, deadline)
        fresh = self.refresh(force=True)
        if fresh is not None:
            _wait(fresh, deadline)

    @property
    def source(self) -> str:
        """What the keys come from, for logs and status: the URL, or for a discovered set
        the issuer and the `jwks_uri` its metadata names."""
        if self.discovery is None:
            return self.url
        found = (
            f"jwks_uri {self.url} from {self.discovery.found_at}" if self.url else "no jwks_uri yet"
        )
        return f"issuer {self.discovery.issuer} ({self.discovery.mode} discovery, {found})"

    def describe(self, now: float) -> tuple[bool, str]:
        """(failing, one line for status): the source and its state, fetching, ok or failing
        (the metadata failing while the keys kept from its last good `jwks_uri` still serve
        counts as failing)."""
        count = self._keys.size
        age = f"fetched {now - self._fetched_at:.0f} s ago"
        errors = [self.discovery.last_error] if self.discovery is not None else []
        error = "; ".join(e for e in (*errors, self.last_error) if e)
        if error:
            kept = f"keeping {count} keys {age}" if self.available else "no keys yet"
            return True, f"{self.source}: failing ({kept}): {error}"
        if not self.available:
            state = "fetching" if self._pending is not None else "not fetched yet"
            return False, f"{self.source}: {state}"
        return False, f"{self.source}: ok, {count} keys, {age}"

    def _refreshed(self, future: Future[None]) -> None:
        with self._lock:
            if self._pending is future:
                self._pending = None

    async def _refresh(self) -> None:
        try:
            if self.discovery is not None:
                # A new jwks_uri takes over from this refresh on; a failed one keeps the keys.
                self.url = await self.discovery.resolve(self._fetch, self._timeout)
            data = await self._fetch(self.url, self._timeout)
            if len(data) > MAX_JWKS_BYTES:
                raise KeySetError("JWKS document larger than 1 MiB")
            # Parsing builds a key object per JWK (up to 1 MiB of them): off the loop.
            parse = functools.partial(parse_jwks, data, source=self.url, log_skipped=False)
            keys = await asyncio.get_running_loop().run_in_executor(None, parse)
        except Exception as exc:  # network, HTTP, size, JSON, keys: keep serving the keys we have
            self._failed(f"{type(exc).__name__}: {exc}")
        else:
            self._succeeded(keys)
        finally:
            self.refresh_count += 1

    def _failed(self, error: str) -> None:
        if error != self.last_error:  # once per change, not every refresh
            log.warning(
                "JWKS refresh from %s failed: %s (%s)",
                self.source,
                error,
                f"keeping its {self._keys.size} keys" if self.available else "no keys yet",
            )
        self.last_error = error

    def _succeeded(self, keys: KeySet) -> None:
        if keys.skipped != self._keys.skipped:  # logged when they change, not every refresh
            _log_skipped(self.source, keys.skipped)
        if self.last_error:
            log.warning("JWKS refresh from %s works again (%d keys)", self.source, keys.size)
        self._keys = keys
        self._fetched_at = time.monotonic()
        self.last_error = ""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RemoteKeySets:
    """One `RemoteKeySet` per JWKS URL (and per issuer discovered), kept across policy
    reloads; the "jwks" component.

    Without it every reload would fetch every organization's JWKS again and start its rate
    limit afresh; with it a reload reuses the set (and its keys), which refreshes itself.
    `get(url)` never waits for the network: a URL asked for the first time gets an empty set
    whose first fetch starts in the background, so a policy load goes on while an identity
    provider hangs. Refreshes run on the process's event loop with one shared HTTP client.

    A `policy_engine.lifecycle.Component`: the constructor does no I/O; `start()` takes the
    event loop (the first `get` starts the component when nobody did: a load outside a
    server); `stop(deadline)` cancels the fetches in flight and closes the client, returning
    by `deadline` whatever an identity provider does; `status()` names each URL's state and
    is DEGRADED while any fails (always ready: an organization whose keys fail denies its
    tokens, it does not stop the server). Thread-safe.
    """

    name = "jwks"

    def __init__(
        self,
        *,
        max_age: float = 300.0,
        min_refresh_interval: float = 30.0,
        timeout: float = 5.0,
        unknown_kid_wait: float = 1.0,
        metadata_max_age: float | None = None,
        fetch: Fetch | None = None,
        loop: Callable[[], asyncio.AbstractEventLoop] = _process_loop,
        wrap_fetch: Callable[[Fetch], Fetch] | None = None,
    ) -> None:
        """The options are each `RemoteKeySet`'s (seconds); `metadata_max_age` is how long
        a discovered issuer's metadata is used before it is fetched again (default
        `max_age`: the scheduled key refreshes read it again, an unknown-`kid` refresh in
        between does not); `fetch` defaults to this component's `JwksFetcher`; `loop` is
        asked once, by `start()`; `wrap_fetch` wraps the fetch every set uses, JWKS and
        metadata alike (tracing gives each its own span)."""
        self._metadata_max_age = max_age if metadata_max_age is None else metadata_max_age
        self._options = {
            "max_age": max_age,
            "min_refresh_interval": min_refresh_interval,
            "timeout": timeout,
            "unknown_kid_wait": unknown_kid_wait,
        }
        self._fetcher = JwksFetcher()
        self._fetch = fetch if fetch is not None else self._fetcher.fetch
        self._sets_fetch = self._fetch if wrap_fetch is None else wrap_fetch(self._fetch)
        self._loop_of = loop
        self._loop: asyncio.AbstractEventLoop | None = None
        # Keyed by URL, or by (issuer, discovery mode, jwks_hosts) for a discovered set.
        self._sets: dict[str | tuple[str, str, tuple[str, ...]], RemoteKeySet] = {}
        self._lock = threading.Lock()
        self._state = State.NEW

    def start(self) -> None:
        """Take the event loop refreshes run on; idempotent. The HTTP client is built (httpx
        imported, the trust store read) off the loop by the first `get`, so a server none of
        whose organizations names a `jwks_url` never loads it."""
        with self._lock:
            if self._state is State.NEW:
                self._loop = self._loop_of()
                self._state = State.RUNNING

    def stop(self, deadline: float) -> bool:
        """Cancel the fetches in flight and close the HTTP client by `deadline`
        (time.monotonic()); True when the client closed in time. Sets keep their keys and no
        longer refresh. Safe to call twice or before `start`."""
        with self._lock:
            if self._state in (State.STOPPING, State.STOPPED):
                return True
            started = self._state is not State.NEW
            self._state = State.STOPPING
            loop = self._loop
            in_flight = [s._pending for s in self._sets.values() if s._pending is not None]
        for future in in_flight:
            future.cancel()  # cancels the fetch's task on the loop
        clean = True
        if started and loop is not None and not loop.is_closed():
            if _running_loop() is loop:  # cannot wait on the loop's own thread
                loop.create_task(self._fetcher.aclose())
            else:
                try:
                    closing = asyncio.run_coroutine_threadsafe(self._fetcher.aclose(), loop)
                    closing.result(max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    closing.cancel()
                    clean = False
                except Exception:
                    log.exception("closing the JWKS HTTP client failed")
                    clean = False
        with self._lock:
            self._state = State.STOPPED
        return clean

    def status(self) -> ComponentStatus:
        with self._lock:
            state, sets = self._state, list(self._sets.values())
        if state is not State.RUNNING:
            return ComponentStatus(self.name, state, True, state.value)
        if not sets:
            return ComponentStatus(self.name, State.RUNNING, True, "no jwks_url in use")
        now = time.monotonic()
        described = [remote.describe(now) for remote in sets]
        failing = any(bad for bad, _ in described)
        detail = "; ".join(line for _, line in described)
        return ComponentStatus(
            self.name, State.DEGRADED if failing else State.RUNNING, True, detail
        )

    def get(self, url: str) -> RemoteKeySet:
        """The key set for `url`, at once: the one kept from earlier loads, or a new, empty
        one whose first fetch has started. Never waits for the network."""
        return self._kept(url, url, None)

    def discover(
        self, issuer: str, mode: str = "auto", jwks_hosts: tuple[str, ...] = ()
    ) -> RemoteKeySet:
        """The key set of `issuer` found through its metadata (`mode`: one of
        `policy_engine.auth.discovery.DISCOVERY_MODES`), at once, as `get` gives a URL's:
        kept across loads, or new with its first discovery started. Never waits.
        `jwks_hosts`: the hosts besides the issuer's its `jwks_uri` may name; organizations
        allowing different hosts get different sets, so one's list never widens another's."""
        hosts = tuple(sorted({entry.lower() for entry in jwks_hosts}))
        return self._kept(
            (issuer, mode, hosts),
            "",
            IssuerMetadata(issuer, mode, self._metadata_max_age, hosts),
        )

    def _kept(
        self,
        key: str | tuple[str, str, tuple[str, ...]],
        url: str,
        discovery: IssuerMetadata | None,
    ) -> RemoteKeySet:
        with self._lock:
            remote = self._sets.get(key)
            created = remote is None
            if remote is None:
                if self._fetch == self._fetcher.fetch:
                    self._fetcher.open()  # here, off the loop: ~50 ms the first time
                remote = self._sets[key] = RemoteKeySet(
                    url,
                    fetch=self._sets_fetch,
                    loop=self._running_loop,
                    discovery=discovery,
                    **self._options,
                )
            state = self._state
        if state is State.NEW:
            self.start()
        if created:
            remote.refresh(force=True)
        return remote

    def wait_for_fetches(self, deadline: float) -> None:
        """Block (off the loop) until no fetch is in flight or `deadline` passes."""
        for remote in list(self._sets.values()):
            pending = remote._pending
            if pending is not None:
                _wait(pending, deadline)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop if self._state is State.RUNNING else None


@contextmanager
def one_off_key_sets(wait: float = 10.0) -> Iterator[RemoteKeySets]:
    """Key sets for one load outside a server (`pdp eval`, `pdp validate`): when the load
    succeeds its first fetches are waited for (each ends within its 5 s timeout; all within
    `wait` seconds), then the component stops. The sets keep their keys and never refresh."""
    sets = RemoteKeySets()
    try:
        yield sets
    except BaseException:
        sets.stop(time.monotonic() + 1.0)
        raise
    sets.wait_for_fetches(time.monotonic() + wait)
    sets.stop(time.monotonic() + 1.0)
