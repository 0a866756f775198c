"""Standard output sink: one JSON line per record, for containers whose logs are collected."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from policy_engine.audit.chain import Sealed
from policy_engine.audit.sinks.base import OpenState, Sink


class StdoutSink(Sink):
    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def open(self) -> OpenState:
        return OpenState()  # nothing to link to: what was printed before is gone

    def write(self, records: Sequence[Sealed]) -> None:
        stream = self._stream or sys.stdout
        stream.write("".join(f"{r.line}\n" for r in records))
        stream.flush()
