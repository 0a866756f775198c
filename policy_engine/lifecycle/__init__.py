"""One lifecycle for every background part of a server process.

Every part that runs in the background (the event loop, the policy store and its watcher,
the decision cache's writer, the audit writer and its sinks, JWKS refreshers, the metrics
endpoint, the gRPC servers) is a `Component`: built by a constructor that does no I/O and
starts no thread, then `start()`ed, `stop(deadline)`ped and asked for its `status()`.
A `Lifecycle` starts a list of components in order, stops them in reverse, and derives the
process's health from their statuses.
"""

from policy_engine.lifecycle.component import (
    Component,
    ComponentStatus,
    Lifecycle,
    StartFailed,
    State,
    deadline_in,
)
from policy_engine.lifecycle.loop import EventLoop, event_loop, process_event_loop

__all__ = [
    "Component",
    "ComponentStatus",
    "EventLoop",
    "Lifecycle",
    "StartFailed",
    "State",
    "deadline_in",
    "event_loop",
    "process_event_loop",
]
