"""A reader that leaves early (`pdp test --json | head -1`) ends the command quietly: exit 141
(128 + SIGPIPE, what a shell shows for a writer cut off) and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_closed_stdout_ends_pdp_quietly() -> None:
    pdp = Path(sys.executable).with_name("pdp")
    process = subprocess.Popen(
        [str(pdp), "test", "--json", str(REPO / "policies")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the first byte is written
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert code == 141
