"""The small interface every audit sink implements, so the writer treats them alike."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from policy_engine.audit.chain import Sealed


@dataclass(frozen=True, slots=True)
class OpenState:
    """What a sink knows when it opens: the last record already in its stream, and its size."""

    last_record: dict[str, Any] | None = None
    size: int = 0  # bytes in the current file (rotation accounting); 0 for non-files


@dataclass(frozen=True, slots=True)
class StreamGap:
    """Records a sink found removed under the writer (seen while writing).

    `reason`: reset (the stream was deleted or replaced), trimmed (trimmed past this writer's
    last entry: every record of its chain is gone), or unread (trimmed before a consumer group
    read them; those records may be any writer's). `through_seq`: for reset and trimmed, the
    last seq of this writer's chain that is gone (all of seq 1..through_seq are); None for
    unread. `count`: records gone. `since`: epoch seconds of the last write before which the
    sink was still intact.
    """

    reason: str
    detail: str
    count: int
    through_seq: int | None = None
    since: float = 0.0


class Sink(ABC):
    """One destination with its own hash chain.

    The writer calls `open` until it succeeds, then `write` with sealed records in chain order.
    `write` is all or nothing: on failure it raises and leaves no partial output behind (or
    can recognise it on retry), because the writer retries exactly the same records.
    """

    name: str = "sink"  # also the `sink` label of the metrics: a small fixed set
    rotate_at: int = 0  # bytes after which the writer rotates (0: never)

    @abstractmethod
    def open(self) -> OpenState: ...

    @abstractmethod
    def write(self, records: Sequence[Sealed]) -> None: ...

    def rotate(self) -> None:
        """Start a new file (file sinks only); the writer seals the old one first."""
        return None

    def take_gaps(self) -> list[StreamGap]:
        """Records found removed since the last call (checked while writing); sinks that
        cannot lose records under the writer return none."""
        return []

    def close(self) -> None:
        """Release the sink; called once, after the last write."""
        return None


def parse_record(line: str | bytes) -> dict[str, Any] | None:
    """A stored line as a record, or None when it is not a JSON object."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser's stack
        return None
    return value if isinstance(value, dict) else None
