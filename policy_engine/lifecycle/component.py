"""The `Component` protocol and the `Lifecycle` that starts and stops components in order."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from policy_engine.errors import PolicyEngineError

log = logging.getLogger(__name__)


class State(StrEnum):
    """Where a component is in its life. DEGRADED: running, but not fully (Redis down, a JWKS
    URL failing, an audit sink refusing writes); its `detail` says how."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    """A component's state as operators see it (GetStatus, logs).

    `ready`: may the process answer decisions as far as this component is concerned (health
    is SERVING only while every component is ready). A degraded component is usually still
    ready: a Redis outage costs cache hits, not correct answers. `detail` is one line for
    people, never a secret.
    """

    name: str
    state: State
    ready: bool
    detail: str = ""


def deadline_in(seconds: float) -> float:
    """A deadline `seconds` from now on the `time.monotonic()` clock (what `stop` takes)."""
    return time.monotonic() + seconds


@runtime_checkable
class Component(Protocol):
    """A background part of the server.

    The constructor does no I/O and starts no thread. `start()` brings it up (raises when it
    cannot: a `ConfigError` for a setting, `OSError` for a port); `stop(deadline)` brings it
    down by `deadline` (`time.monotonic()` seconds), returns False when something was left
    undone (records not written, a thread still running), and is safe to call twice or on a
    component never started. `status()` never blocks and never raises.
    """

    name: str

    def start(self) -> None: ...

    def stop(self, deadline: float) -> bool: ...

    def status(self) -> ComponentStatus: ...


class StartFailed(PolicyEngineError, RuntimeError):
    """A component failed to start for a reason other than a setting (a `ConfigError` is
    raised as it is); the message names the component, the cause is chained."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"{name} could not start: {cause}")
        self.component = name


STOP_AFTER_FAILED_START_SECONDS = 5.0


class Lifecycle:
    """Components started in the order given and stopped in reverse.

    `start()` stops what it has started (in reverse) and re-raises if a component fails to
    start: a `ConfigError` (or KeyboardInterrupt, SystemExit) as it is, any other exception
    as `StartFailed` naming the component. `stop(deadline)` gives every component the same
    overall deadline, so a slow one leaves less time to those after it but never stops them
    being stopped. From the moment `stop` begins, `ready()` is False for good.
    """

    def __init__(self, components: Sequence[Component] = ()) -> None:
        self.components: list[Component] = list(components)
        self._started: list[Component] = []
        self._stopping = False

    def add(self, component: Component) -> Component:
        """Append a component (before `start`)."""
        self.components.append(component)
        return component

    def start(self) -> None:
        # Imported here: config is heavier than this module, and only a failure needs it.
        from policy_engine.config import ConfigError

        for component in self.components:
            try:
                component.start()
            except BaseException as exc:
                log.debug("%s failed to start; stopping the rest", component.name, exc_info=True)
                self._started.append(component)  # a half-started component is stopped too
                self.stop(deadline_in(STOP_AFTER_FAILED_START_SECONDS))
                if isinstance(exc, ConfigError) or not isinstance(exc, Exception):
                    raise
                raise StartFailed(component.name, exc) from exc
            self._started.append(component)

    @property
    def stopping(self) -> bool:
        """`stop` has begun (the process is shutting down, or failed to start)."""
        return self._stopping

    def stop(self, deadline: float) -> bool:
        """Stop every started component, last first; True when every one stopped cleanly."""
        self._stopping = True
        clean = True
        while self._started:
            component = self._started.pop()
            try:
                if not component.stop(deadline):
                    log.error("%s did not stop cleanly before its deadline", component.name)
                    clean = False
            except Exception:
                log.exception("%s failed while stopping", component.name)
                clean = False
        return clean

    def statuses(self) -> list[ComponentStatus]:
        """Every component's status, in start order (never blocks)."""
        return [component.status() for component in self.components]

    def ready(self) -> bool:
        """Every component ready and no stop begun (health SERVING)."""
        return not self._stopping and all(status.ready for status in self.statuses())
