"""`pdp replay`: re-decide recorded decisions against candidate policies, report what changes."""

from policy_engine.replay.replay import (
    CHANGE_KINDS,
    Replay,
    order_audit_files,
    replay_files,
    replay_record,
    unreplayable_reason,
)

__all__ = [
    "CHANGE_KINDS",
    "Replay",
    "order_audit_files",
    "replay_files",
    "replay_record",
    "unreplayable_reason",
]
