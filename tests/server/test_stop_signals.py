"""A stop signal repeated while `pdp serve` stops never turns its clean stop into a death.

Process managers repeat SIGTERM, people press Ctrl-C twice. Python's exit restores the
default action of every signal that had a Python handler, so a repeat that landed in the last
milliseconds of a worker's exit killed it: a lone server ended by the signal instead of
exiting 0, and a supervisor of two workers exited 1 without saying why. Real processes: `pdp
serve` on a free port, signalled every 10 ms from the moment it serves until it has exited.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.server.harness import EXAMPLE_POLICIES, serve_process


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_repeated_until_the_exit_leaves_a_clean_exit(
    tmp_path: Path, workers: int, signum: signal.Signals
) -> None:
    env = {"PDP_METRICS_ADDRESS": ""}
    # serve_process checks the exit: 0 (its own SIGTERM finds the process already gone).
    with serve_process(tmp_path, EXAMPLE_POLICIES, workers=workers, env=env) as (proc, _, log):
        signals = 0
        until = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < until:
            proc.send_signal(signum)
            signals += 1
            time.sleep(0.01)
        proc.wait(timeout=30)
        text = log.read_text()
        assert signals >= 2, text  # repeated at least once while it stopped
        assert proc.returncode == 0, f"exit {proc.returncode} after {signals} signals\n{text}"
        assert "Traceback" not in text
