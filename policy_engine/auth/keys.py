"""Where subject-token verification keys come from: a JWKS file, or a JWKS URL fetched and cached.

The request path never waits on the network: a remote key set answers from its cache, and an
unknown `kid` only *schedules* a refresh (at most one at a time, rate-limited), so key rotation
costs the first request that sees the new key a deny with a precise reason, never a hang.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import jwt
from jwt import PyJWK, PyJWKSet

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1024 * 1024


class KeySetError(ValueError):
    """A JWKS document that cannot be used; the message says why."""


def parse_jwks(data: bytes | str) -> dict[str, PyJWK]:
    """Keys by `kid`; a key without a `kid` is stored under the empty string."""
    try:
        document = json.loads(data)
        key_set = PyJWKSet.from_dict(document if isinstance(document, dict) else {})
    except (ValueError, jwt.PyJWTError) as exc:
        raise KeySetError(f"invalid JWKS: {exc}") from exc
    return {key.key_id or "": key for key in key_set.keys}


class KeySource(Protocol):
    def key_for(self, kid: str | None) -> PyJWK | None:
        """The key for `kid`, or None when unknown (never blocks on I/O)."""
        ...


class StaticKeySet:
    """Keys read once, at policy load: a file shipped with the policies, or given to the CLI."""

    def __init__(self, keys: dict[str, PyJWK]) -> None:
        self._keys = keys

    @classmethod
    def from_file(cls, path: Path) -> StaticKeySet:
        try:
            return cls(parse_jwks(path.read_bytes()))
        except OSError as exc:
            raise KeySetError(f"cannot read JWKS file {path}: {exc.strerror or exc}") from exc

    def key_for(self, kid: str | None) -> PyJWK | None:
        return _lookup(self._keys, kid)


def _lookup(keys: dict[str, PyJWK], kid: str | None) -> PyJWK | None:
    if kid is not None:
        return keys.get(kid)
    # No kid in the token: acceptable only when the set holds exactly one key.
    return next(iter(keys.values())) if len(keys) == 1 else None


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
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = float("-inf")
        self._last_attempt = float("-inf")
        self._lock = threading.Lock()
        self._refreshing = False
        self.refresh_count = 0
        self.last_error = ""

    def key_for(self, kid: str | None) -> PyJWK | None:
        key = _lookup(self._keys, kid)
        now = time.monotonic()
        stale = now - self._fetched_at > self._max_age
        if (key is None or stale) and now - self._last_attempt >= self._min_interval:
            self._schedule_refresh()
        if key is None and not self._refreshed.is_set():
            # A refresh is in flight (ours or another request's): it may bring this key.
            self._refreshed.wait(self._unknown_kid_wait)
            key = _lookup(self._keys, kid)
        return key

    def refresh_now(self) -> None:
        """Fetch synchronously (used at startup and by tests); failures keep the old keys."""
        self._last_attempt = time.monotonic()
        try:
            data = self._fetch(self.url, self._timeout)
            if len(data) > MAX_JWKS_BYTES:
                raise KeySetError("JWKS document larger than 1 MiB")
            self._keys = parse_jwks(data)
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
