"""A stop signal repeated while `pdp serve` stops never turns its clean stop into a death.

Process managers repeat SIGTERM, people press Ctrl-C twice. Python's exit restores the
default action of every signal that had a Python handler, so a repeat that landed in the last
milliseconds of a worker's exit killed it: a lone server ended by the signal instead of
exiting 0, and a supervisor of two workers exited 1 without saying why. Real processes: `pdp
serve` on a free port, signalled every 10 ms from the moment it serves until it has exited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server.harness import EXAMPLE_POLICIES, REPO
from tests.store.support import free_port, wait_for


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_repeated_until_the_exit_leaves_a_clean_exit(
    tmp_path: Path, workers: int, signum: signal.Signals
) -> None:
    log_file = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "policy_engine.cli.main", "serve",
        "--address", f"127.0.0.1:{free_port()}", "--policies", str(EXAMPLE_POLICIES),
        "--workers", str(workers),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "PDP_METRICS_ADDRESS": ""}
    with log_file.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or log_file.read_text().count("serving kontext.pdp.v1") >= workers
            ),
            timeout=60,
            what="the server to start",
        )
        assert proc.poll() is None, log_file.read_text()
        signals = 0
        until = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < until:
            proc.send_signal(signum)
            signals += 1
            time.sleep(0.01)
        proc.wait(timeout=30)
        text = log_file.read_text()
        assert signals >= 2, text  # repeated at least once while it stopped
        assert proc.returncode == 0, f"exit {proc.returncode} after {signals} signals\n{text}"
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
