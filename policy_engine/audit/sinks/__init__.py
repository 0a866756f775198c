"""Audit sinks: JSON-lines file with rotation, Redis Stream, standard output."""

from policy_engine.audit.sinks.base import OpenState, Sink, StreamGap, parse_record
from policy_engine.audit.sinks.file import FileSink, rotated_files
from policy_engine.audit.sinks.redis import RedisStreamSink
from policy_engine.audit.sinks.stdout import StdoutSink

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
