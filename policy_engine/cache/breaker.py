"""A circuit breaker in front of Redis, so a dead or slow Redis costs a request nothing.

closed: calls go through; `threshold` consecutive failures (errors or timeouts) open it.
open: no calls at all for `reset_seconds`; requests are answered by evaluation alone.
half-open: one probe call is let through; its success closes the breaker, its failure opens
it again for another `reset_seconds`. A probe that never reports back (its thread died) is
replaced by a new one after `reset_seconds`, so the breaker cannot stick half-open.

Outcomes of calls that started before the breaker opened are ignored while it is open: a
straggler succeeding must not close a breaker that opened because Redis is failing now.
The closed-and-healthy path takes no lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import cast

from policy_engine.lifecycle import ComponentStatus, State


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        threshold: int,
        reset_seconds: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._threshold = max(1, threshold)
        self._reset = max(0.0, reset_seconds)
        self._monotonic = monotonic
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._since = 0.0  # when it opened, or when the current probe started
        self.opened_count = 0  # how many times it has opened (for tests and logs)

    @property
    def state(self) -> BreakerState:
        return self._state

    def degraded(self, name: str, detail: str, meanwhile: str) -> ComponentStatus | None:
        """Component `name`'s status while this breaker keeps Redis off the path (DEGRADED,
        still ready; `detail` then the breaker's state, `meanwhile` what is done without
        Redis, and when it probes), None while it is closed."""
        state = self._state
        if state is BreakerState.CLOSED:
            return None
        return ComponentStatus(
            name,
            State.DEGRADED,
            True,
            f"{detail}; Redis circuit breaker {state.value.replace('_', '-')}: {meanwhile}, "
            f"probing every {self._reset:g}s",
        )

    def allow(self) -> bool:
        """May a Redis call be made now? (In half-open, True means "you are the probe".)"""
        if self._state is BreakerState.CLOSED:
            return True
        with self._lock:
            # Read again under the lock (another thread may have closed it since): the type
            # is the field's again, not what the unlocked check above narrowed it to.
            state = cast(BreakerState, self._state)
            if state is BreakerState.CLOSED:
                return True
            now = self._monotonic()
            if now - self._since < self._reset:
                return False
            if state is BreakerState.OPEN:
                self._set(BreakerState.HALF_OPEN)
            self._since = now  # this caller is the (new) probe
            return True

    def success(self) -> None:
        if self._state is BreakerState.CLOSED and self._failures == 0:
            return
        with self._lock:
            if self._state is BreakerState.OPEN:
                return  # a straggler from before it opened
            self._failures = 0
            if self._state is BreakerState.HALF_OPEN:
                self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        with self._lock:
            state = self._state
            if state is BreakerState.OPEN:
                return
            self._failures += 1
            if state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
                self._since = self._monotonic()
                self.opened_count += 1
                self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
