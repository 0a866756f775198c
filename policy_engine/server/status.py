"""PolicyStatusService: what an operator asks after saving a policy file.

"Is my change live?" (the revision and when it loaded) and "if not, why?" (the last reload's
result and every issue as file:line), answered by the process that serves the decisions,
with the status of each of its background parts (the lifecycle's components).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.lifecycle import ComponentStatus
from policy_engine.store import PolicyStore

STATUS_SERVICE_NAME = pdp_pb2.DESCRIPTOR.services_by_name["PolicyStatusService"].full_name


def instance_name() -> str:
    """hostname:pid, so answers from different workers or replicas can be told apart."""
    return f"{socket.gethostname()}:{os.getpid()}"


class PolicyStatusServicer(pdp_pb2_grpc.PolicyStatusServiceServicer):
    """Reads the store's status record; `watching` reports whether the watcher is alive,
    `components` the lifecycle's component statuses (calls that never block)."""

    def __init__(
        self,
        store: PolicyStore,
        watching: Callable[[], bool] = lambda: False,
        components: Callable[[], Sequence[ComponentStatus]] = tuple,
    ) -> None:
        self._store = store
        self._watching = watching
        self._components = components

    async def GetStatus(
        self, request: pdp_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pdp_pb2.GetStatusResponse:
        # On the event loop: the store's status is a plain attribute read, never a wait.
        status = self._store.status()
        response = pdp_pb2.GetStatusResponse(
            revision=status.revision,
            organizations=list(status.organizations),
            last_reload_ok=status.last_ok,
            last_error=status.last_error,
            watching=self._watching(),
            instance=instance_name(),
            source=status.source,
            components=[
                pdp_pb2.ComponentStatus(
                    name=c.name, state=c.state.value, ready=c.ready, detail=c.detail
                )
                for c in self._components()
            ],
        )
        if status.loaded_at is not None:
            response.loaded_at.CopyFrom(_timestamp(status.loaded_at))
        if status.last_attempt_at is not None:
            response.last_reload_at.CopyFrom(_timestamp(status.last_attempt_at))
        return response


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
