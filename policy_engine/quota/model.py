"""The types shared by the quota counter stores and the quota policy format.

A `QuotaSpec` is one declared quota (from a Quota document); a `Charge` is one quota to count
for one ALLOW, in one bucket (the digest of the key parts the quota is `per`); a `Verdict` is
what a `QuotaStore` answers for one item (one ALLOW's list of charges).

Clock: the store's own clock (Redis `TIME` inside the script, so every replica agrees;
`time.time()` for the in-process store, injectable for tests and `pdp test`), never the
request's `context.time` (a caller could move its own windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from policy_engine.lifecycle import ComponentStatus


class Algorithm(StrEnum):
    """How a quota's window moves."""

    FIXED = "fixed"  # windows aligned to multiples of `window_ms` since the Unix epoch
    SLIDING = "sliding"  # any interval of `window_ms` ending now (exact: a log of ALLOW times)


class WhenUnavailable(StrEnum):
    """What an ALLOW becomes when the counter store cannot count it."""

    DENY = "deny"  # default: the counter store cannot be reached -> DENY kontext_server_error
    ALLOW = "allow"  # the ALLOW stands, uncounted (metric counts it)


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """One declared quota.

    `name` is the Quota document's name, unique in the organization; `limit` is ALLOWs per
    window, 1..1_000_000_000; `window_ms` is 1_000 .. 31 days in milliseconds.
    """

    organization: str
    name: str
    limit: int
    window_ms: int
    algorithm: Algorithm
    when_unavailable: WhenUnavailable


@dataclass(frozen=True, slots=True)
class Charge:
    """One quota to count for one ALLOW: `bucket` is the digest of the key parts the quota
    is `per` (subject, application, ...), already encoded by the caller (hex SHA-256 of a
    length-prefixed canonical encoding: no delimiter injection)."""

    spec: QuotaSpec
    bucket: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """For one item: `admitted` True -> every charge was counted. False -> none was counted:
    `exhausted` names the first full quota and `retry_after_ms` when it frees (> 0), or
    `unavailable` is True (the store could not answer; the caller applies `when_unavailable`
    per spec)."""

    admitted: bool
    exhausted: QuotaSpec | None = None
    retry_after_ms: int = 0
    unavailable: bool = False


ADMITTED = Verdict(admitted=True)
UNAVAILABLE = Verdict(admitted=False, unavailable=True)


@runtime_checkable
class QuotaStore(Protocol):
    """Counts ALLOWs against quotas; a lifecycle `Component` too (start/stop/status)."""

    name: str

    async def consume(
        self, items: Sequence[Sequence[Charge]], deadline: float | None
    ) -> list[Verdict]:
        """Atomically, in item order: an item with no charges is admitted; an item whose
        charges all have room is counted in all of them (admitted); otherwise nothing is
        counted for it. ONE round trip for the whole call (Redis: one EVALSHA per hash slot,
        pipelined). `deadline` is `time.monotonic()` seconds; the call never outlasts it (on
        expiry: every item unavailable). Never raises for store faults: unavailable
        verdicts. Returns one `Verdict` per item, in order."""
        ...

    def start(self) -> None: ...

    def stop(self, deadline: float) -> bool: ...

    def status(self) -> ComponentStatus: ...
