"""Audit sinks: JSON-lines file with rotation, Redis Stream, standard output.

`RedisStreamSink` is imported on first access (PEP 562): redis costs ~10 MB of RSS in a
server that has no redis sink.
"""

from typing import TYPE_CHECKING, Any

from policy_engine.audit.sinks.base import OpenState, Sink, StreamGap, parse_record
from policy_engine.audit.sinks.file import FileSink, rotated_files
from policy_engine.audit.sinks.stdout import StdoutSink

if TYPE_CHECKING:
    from policy_engine.audit.sinks.redis import RedisStreamSink

__all__ = [
    "FileSink",
    "OpenState",
    "RedisStreamSink",
    "Sink",
    "StdoutSink",
    "StreamGap",
    "parse_record",
    "rotated_files",
]


def __getattr__(name: str) -> Any:
    """`RedisStreamSink`, imported on first use; AttributeError for any other unknown name."""
    if name == "RedisStreamSink":
        from policy_engine.audit.sinks.redis import RedisStreamSink

        return RedisStreamSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
