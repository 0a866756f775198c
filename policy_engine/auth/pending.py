"""Waiting for a JWKS refresh: only the calls whose token needs it, only within their deadline.

When an identity provider rotates its keys, the first token signed with the new key names a
`kid` the PDP has not fetched yet. Verification itself never waits (`RemoteKeySet.keys_for`
answers from the keys it has), so the asyncio pipeline runs this step first, before its cache
lookup (the cache key depends on the key set, which the refresh may change):
`await_pending_keys(items, policies, deadline)` finds the items that carry a subject token for
an organization whose keys come from a `jwks_url` and whose key (the token's unverified
header: `kid` and `alg`, read from at most `MAX_HEADER_CHARS` characters) is not in the set,
while a refresh is in flight or may start now (it starts it), and waits for those refreshes,
at most `unknown_kid_wait` (1 s) and never past the caller's deadline. A call with no such
item does not wait at all, and no other call waits for it: the loop goes on serving. A token
whose key is still missing afterwards is denied by verification as before ("unknown key", or
"keys not available" while the first fetch has not landed).

This is a hint, not a check: the header is read without verifying anything, and whatever it
says, the token is verified in full afterwards. The worst a crafted header can do is make its
own call wait (bounded as above) and start a refresh (rate-limited per URL).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from policy_engine.auth.keys import RemoteKeySet

if TYPE_CHECKING:
    from policy_engine.policy import CompiledPolicySet

log = logging.getLogger(__name__)

MAX_HEADER_CHARS = 2048  # base64url characters of a JOSE header read; a longer one is not
_HEADER_MEMO = 256  # distinct headers remembered (a deployment's tokens share a few)


@functools.lru_cache(maxsize=_HEADER_MEMO)
def _header_key(segment: str) -> tuple[str | None, str] | None:
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError included
        return None
    if not isinstance(header, dict):
        return None
    kid, alg = header.get("kid"), header.get("alg")
    if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
        return None
    return kid, alg


def unverified_key(token: str) -> tuple[str | None, str] | None:
    """(`kid` or None, `alg`) from a compact JWS's protected header, unverified; None when
    the header is longer than `MAX_HEADER_CHARS` or is not a JSON object with a string `alg`
    (and a string `kid`, when it has one). Reads at most `MAX_HEADER_CHARS` characters."""
    dot = token.find(".", 0, MAX_HEADER_CHARS + 1)
    if dot <= 0:
        return None
    return _header_key(token[:dot])


def pending_refreshes(
    items: Sequence[Any], policies: CompiledPolicySet
) -> tuple[dict[Future[None], RemoteKeySet], int]:
    """The refreshes `items` (`CheckRequest` messages) should wait for, each with its key
    set, and how many items need one; starts a refresh where one may start (see the module
    docstring). Never blocks; about a dictionary lookup per item when no organization of
    `policies` uses a `jwks_url` beyond the first."""
    remote = policies.refreshing_keys
    refreshes: dict[Future[None], RemoteKeySet] = {}
    waiting = 0
    if not remote:
        return refreshes, waiting
    for msg in items:
        found = remote.get(msg.organization)
        if found is None:
            continue
        token = msg.subject.access_token
        if not token:
            continue
        key = unverified_key(token)
        keys, algorithms = found
        if key is None or key[1] not in algorithms:
            continue  # refused by verification whatever the keys: nothing to wait for
        refresh = keys.pending_refresh(*key)
        if refresh is not None:
            refreshes[refresh] = keys
            waiting += 1
    return refreshes, waiting


async def await_pending_keys(
    items: Sequence[Any], policies: CompiledPolicySet, deadline: float | None
) -> int:
    """Wait for the key refreshes `items` need (see the module docstring), at most the
    longest `unknown_kid_wait` of their key sets and never past `deadline` (a
    `time.monotonic()` instant; None: none). Returns how many items needed a refresh (0:
    nothing was awaited). Never raises but CancelledError (the caller's); refreshes go on
    when the wait ends first."""
    try:
        refreshes, waiting = pending_refreshes(items, policies)
    except Exception:  # a hint only: a fault here must not fail the call (verification decides)
        log.exception("looking for the JWKS refreshes a call needs failed; not waiting")
        return 0
    if not refreshes:
        return 0
    wait = max(keys.unknown_kid_wait for keys in refreshes.values())
    if deadline is not None:
        wait = min(wait, deadline - time.monotonic())
    if wait > 0:
        await asyncio.wait([asyncio.wrap_future(refresh) for refresh in refreshes], timeout=wait)
    return waiting
