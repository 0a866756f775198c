"""The first thing `pdp serve` does, before its heavy imports (~0.5 s of gRPC, protobuf and
settings validation): hold SIGHUP, make Ctrl-C quiet and take SIGTERM.

Until the server installs its own handlers, SIGHUP's default action would kill it (a deploy
tool that sends SIGHUP right after starting it, or a `kill -HUP` of the wrong moment), and
Ctrl-C would print a KeyboardInterrupt traceback from whatever import or settings check was
running. So, from the package's first line: a SIGHUP is only recorded (`sighup_received`),
and the server replays it as a reload once its store runs; SIGINT exits quietly with the
conventional code 130 (128 + SIGINT), unwinding the stack (SystemExit) so that anything
half-started is stopped on the way out; SIGTERM likewise, with 143 (128 + SIGTERM). SIGTERM's
default action would do, but not as PID 1 of a container (the image's ENTRYPOINT): the kernel
discards a signal whose action is the default for a PID namespace's init, so a pod deleted in
its first second (a rollout overtaken, a scale-down) kept running until the kubelet's SIGKILL
at the end of its grace period. The server replaces these handlers with its own.
`policy_engine/cli/__init__.py` installs them, for `pdp serve` only (other commands keep
Python's defaults: a hangup ends them). Imports nothing but `signal`.
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM

_sighup = False


def _record_sighup(signum: int, frame: FrameType | None) -> None:
    global _sighup
    _sighup = True


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_INTERRUPTED)


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_TERMINATED)


def sighup_received() -> bool:
    """A SIGHUP came while these handlers were installed."""
    return _sighup


def serving(argv: list[str]) -> bool:
    """Is this process `pdp serve` (the console script or `python -m policy_engine.cli.main`)?
    While the package is imported through `-m`, argv[0] is "-m" and the rest are the flags."""
    return argv[1:2] == ["serve"]


def hold_signals() -> None:
    """Install the handlers above (main thread only: elsewhere Python refuses)."""
    try:
        signal.signal(signal.SIGTERM, _terminated)
        signal.signal(signal.SIGINT, _interrupted)
        signal.signal(signal.SIGHUP, _record_sighup)  # last: held SIGHUP means all are in
    except ValueError:  # not the main thread: a program embedding the CLI keeps its own
        pass
