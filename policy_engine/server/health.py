"""grpc.health.v1 for one server process: "" (overall) and the PDP service.

A server's health is derived, never flipped by hand: SERVING exactly while its lifecycle says
every component is ready (`Lifecycle.ready`: the policy store has loaded a valid set, the
servers listen, ...) and no shutdown has begun. `Check` asks at each call, so an answer is
never stale; `Watch` streams are told of a change within HEALTH_FOLLOW_SECONDS. A servicer
without a readiness function (`build_server` for tools and tests) is set by hand instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from policy_engine.lifecycle import EventLoop
from policy_engine.server.service import SERVICE_NAME

log = logging.getLogger(__name__)

HEALTH_FOLLOW_SECONDS = 0.25  # how often Watch streams' status is derived anew
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", SERVICE_NAME)  # overall, and the PDP service


class DerivedHealthServicer(AsyncHealthServicer):
    """The asyncio health servicer, its status derived from `readiness()` (which must never
    block): NOT_SERVING until it first says ready. Lives on the process's event loop."""

    # The base class's own state (grpc_health.v1._async), which its stubs leave out.
    _server_status: dict[str, int]  # service -> ServingStatus
    _server_watchers: defaultdict[str, asyncio.Condition]  # services someone watches
    _gracefully_shutting_down: bool

    def __init__(self, readiness: Callable[[], bool]) -> None:
        super().__init__()
        self._readiness = readiness
        self._ready: bool | None = None
        self._follower: asyncio.Task[None] | None = None
        for service in SERVICES:
            self._server_status[service] = NOT_SERVING

    async def refresh(self) -> None:
        """Derive the status now and tell watchers when it changed."""
        try:
            ready = bool(self._readiness())
        except Exception:  # a status bug must not break health: not serving then
            log.exception("deriving the health status failed")
            ready = False
        if ready is not self._ready:
            self._ready = ready
            for service in SERVICES:
                await self.set(service, SERVING if ready else NOT_SERVING)

    async def Check(self, request: Any, context: Any) -> Any:
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request: Any, context: Any) -> None:
        await self.refresh()
        if self._follower is None or self._follower.done():
            self._follower = asyncio.ensure_future(self._follow())
        await super().Watch(request, context)

    async def _follow(self) -> None:
        """While anyone watches: derive the status every HEALTH_FOLLOW_SECONDS."""
        while not self._gracefully_shutting_down and self._server_watchers:
            await asyncio.sleep(HEALTH_FOLLOW_SECONDS)
            await self.refresh()

    async def enter_graceful_shutdown(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        await super().enter_graceful_shutdown()


class Health:
    """The health service of one process, used from any thread: derived from `readiness`
    when given (see the module docstring), else set by hand (`set`); `stop()` makes it
    NOT_SERVING for good (graceful shutdown)."""

    def __init__(self, runner: EventLoop, readiness: Callable[[], bool] | None = None) -> None:
        self._runner = runner
        self.derived = readiness is not None
        self.servicer: AsyncHealthServicer = (
            DerivedHealthServicer(readiness) if readiness is not None else AsyncHealthServicer()
        )

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._runner.on_loop():
            self._runner.loop.create_task(coro)
        else:
            self._runner.call(coro)

    def set(self, service: str, status: int) -> None:
        """`status`: a HealthCheckResponse.ServingStatus value (SERVING, NOT_SERVING)."""
        self._run(self.servicer.set(service, status))

    def set_serving(self, ready: bool) -> None:
        """Overall health and the PDP service's, by hand (a servicer without readiness)."""
        for service in SERVICES:
            self.set(service, SERVING if ready else NOT_SERVING)

    def enter_graceful_shutdown(self) -> None:
        self._run(self.servicer.enter_graceful_shutdown())
