"""Lifecycle: components start in order, stop in reverse, and a failed start undoes itself."""

from __future__ import annotations

import pytest

from policy_engine.config import ConfigError
from policy_engine.lifecycle import (
    Component,
    ComponentStatus,
    Lifecycle,
    StartFailed,
    State,
    deadline_in,
    event_loop,
)


class Part:
    """A component that records what happened to it in a shared journal."""

    def __init__(
        self,
        name: str,
        journal: list[str],
        *,
        fails: BaseException | None = None,
        clean: bool = True,
        ready: bool = True,
    ) -> None:
        self.name = name
        self.journal = journal
        self.fails = fails
        self.clean = clean
        self.is_ready = ready
        self.state = State.NEW

    def start(self) -> None:
        self.journal.append(f"start {self.name}")
        if self.fails is not None:
            raise self.fails
        self.state = State.RUNNING

    def stop(self, deadline: float) -> bool:
        self.journal.append(f"stop {self.name}")
        self.state = State.STOPPED
        return self.clean

    def status(self) -> ComponentStatus:
        return ComponentStatus(self.name, self.state, self.is_ready and self.state is State.RUNNING)


def test_components_start_in_order_and_stop_in_reverse() -> None:
    journal: list[str] = []
    parts = [Part(name, journal) for name in ("loop", "audit", "store", "server")]
    assert all(isinstance(part, Component) for part in parts)
    lifecycle = Lifecycle(parts)
    assert not lifecycle.ready()  # nothing started
    lifecycle.start()
    assert lifecycle.ready()
    assert lifecycle.stop(deadline_in(5))
    assert journal == [
        "start loop", "start audit", "start store", "start server",
        "stop server", "stop store", "stop audit", "stop loop",
    ]  # fmt: skip
    assert lifecycle.stop(deadline_in(5))  # again: nothing left to stop
    assert len(journal) == 8


def test_a_failed_start_stops_what_started_and_names_the_component() -> None:
    journal: list[str] = []
    broken = Part("store", journal, fails=OSError("disk on fire"))
    lifecycle = Lifecycle([Part("loop", journal), Part("audit", journal), broken])
    lifecycle.add(Part("server", journal))
    with pytest.raises(StartFailed, match="store could not start: disk on fire") as caught:
        lifecycle.start()
    assert isinstance(caught.value.__cause__, OSError)
    # The half-started component is stopped too; the one after it never started.
    assert journal == [
        "start loop", "start audit", "start store",
        "stop store", "stop audit", "stop loop",
    ]  # fmt: skip
    assert not lifecycle.ready()


@pytest.mark.parametrize("error", [ConfigError("setting x: bad"), KeyboardInterrupt()])
def test_settings_errors_and_interrupts_are_raised_as_they_are(error: BaseException) -> None:
    journal: list[str] = []
    lifecycle = Lifecycle([Part("loop", journal), Part("audit", journal, fails=error)])
    with pytest.raises(type(error)):
        lifecycle.start()
    assert journal == ["start loop", "start audit", "stop audit", "stop loop"]


def test_an_unclean_stop_is_reported_and_the_rest_still_stop() -> None:
    journal: list[str] = []
    lifecycle = Lifecycle(
        [Part("audit", journal, clean=False), Part("store", journal), Part("server", journal)]
    )
    lifecycle.start()
    assert not lifecycle.stop(deadline_in(5))
    assert journal[-3:] == ["stop server", "stop store", "stop audit"]


def test_ready_needs_every_component_and_ends_when_stop_begins() -> None:
    journal: list[str] = []
    store = Part("store", journal, ready=False)
    lifecycle = Lifecycle([Part("loop", journal), store])
    lifecycle.start()
    assert not lifecycle.ready()
    store.is_ready = True
    assert lifecycle.ready()
    lifecycle.stop(deadline_in(5))
    lifecycle = Lifecycle([Part("loop", journal)])
    seen: list[bool] = []

    class Witness(Part):
        def stop(self, deadline: float) -> bool:
            seen.append(lifecycle.ready())  # asked before anything has stopped
            return super().stop(deadline)

    lifecycle.add(Witness("server", journal))
    lifecycle.start()
    assert lifecycle.ready()
    lifecycle.stop(deadline_in(5))
    assert seen == [False]


def test_the_event_loop_is_a_component_that_outlives_a_stop() -> None:
    loop = event_loop()
    assert loop.status() == ComponentStatus("event_loop", State.RUNNING, True)
    lifecycle = Lifecycle([loop])
    lifecycle.start()  # already running: a no-op
    assert lifecycle.stop(deadline_in(5))

    async def answer() -> int:
        return 42

    assert loop.call(answer(), timeout=10) == 42  # still the process's loop
