"""`pdp serve` as PID 1 of its PID namespace, as the image's ENTRYPOINT runs it in a pod: the
kernel discards any signal whose action is the default for a namespace's init, so every stop
signal needs a handler from the first line on. A SIGTERM right after start (a pod deleted in
its first second: a rollout overtaken, a scale-down) must end it, not be lost until the
kubelet's SIGKILL at the end of the grace period.

Needs root and `unshare` (util-linux) for the PID namespace; skipped, saying so, without them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import build, only, pod_spec
from tests.server.harness import EXAMPLE_POLICIES
from tests.store.support import free_port, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root and unshare for a PID namespace",
)


def _child(pid: int) -> int | None:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else None


def _handles(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_a_sigterm_right_after_start_ends_pid_1(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PDP_")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PDP_ADDRESS": f"127.0.0.1:{free_port()}",
        "PDP_WORKERS": "2",
        "PDP_METRICS_ADDRESS": "",
        "PDP_POLICY_DIR": str(EXAMPLE_POLICIES),
    }
    log_file = tmp_path / "serve.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--", "pdp", "serve"],
            env=env, stdout=log, stderr=log, cwd=tmp_path,
        )  # fmt: skip
    try:
        pid1 = wait_for(lambda: _child(proc.pid), timeout=30, interval=0.001, what="PID 1")
        # The first handlers are in (SIGHUP is held last); the server's are not yet (its
        # imports take most of a second): a signal now meets what the first line installed.
        wait_for(lambda: _handles(pid1, signal.SIGHUP), timeout=30, interval=0.001, what="handlers")
        os.kill(pid1, signal.SIGTERM)
        grace = pod_spec(only(build(), "Deployment"))["terminationGracePeriodSeconds"]
        try:
            code = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "the SIGTERM was lost: still running at the end of the grace period\n"
                + log_file.read_text()
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # 143: stopped while starting; 0 only if the server's own handlers won the race.
    assert code in (128 + signal.SIGTERM, 0), log_file.read_text()
    assert "Traceback" not in log_file.read_text()
