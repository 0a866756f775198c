"""Release artifacts built as a release (and the Dockerfile) builds them, outside the checkout.

The source is a copy of what a clean clone holds (`git ls-files`, tracked and untracked but
not ignored: so never the stubs `make generate` left in the checkout), in a temporary folder.
Builds use the registry (build isolation installs setuptools and grpcio-tools, `pip wheel`
fetches the dependencies' wheels, pip's cache making repeats cheap): when a build fails and the
registry cannot be reached, the test is skipped saying so; any other failure fails it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]

# The Dockerfile's build stage runs exactly this in the source folder (tests/deploy checks
# it), and tests/packaging installs what it writes: the project's wheel, built from the tree
# by pip with build isolation, and the wheels of the server's dependencies.
WHEEL_COMMAND = ("pip", "wheel", "--wheel-dir", "/wheels", ".[server,tracing]")
WHEELS_DIR = "/wheels"


def source_copy(dest: Path) -> Path:
    """The checkout's files as a clean clone would have them, copied to `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file another change deleted is not in a clone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def index_url() -> str:
    """The index pip uses here (its configuration, else PyPI)."""
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return os.environ.get("PIP_INDEX_URL") or configured or "https://pypi.org/simple"


def registry_unreachable() -> str | None:
    """Why the registry cannot be reached, or None when it answers."""
    url = index_url().rstrip("/") + "/grpcio-tools/"
    try:
        with urllib.request.urlopen(url, timeout=20) as answer:
            answer.read(1)
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"
    return None


def run_build(command: list[str], cwd: Path) -> str:
    """Run a build step; its output. Skips when it failed with the registry unreachable,
    fails with the output otherwise."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if reason := registry_unreachable():
            pytest.skip(f"the package registry cannot be reached ({reason}): {command[2:4]}")
        pytest.fail(f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def fresh_venv(path: Path) -> Path:
    """A new virtualenv at `path` (no pip in it: this interpreter's pip installs into it with
    --python); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def pip_install(python: Path, wheelhouse: Path, *requirements: str) -> None:
    """Install `requirements` into the virtualenv of `python` from `wheelhouse` alone."""
    run_build(
        [
            sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
            "--no-index", "--find-links", str(wheelhouse), *requirements,
        ],
        wheelhouse,
    )  # fmt: skip


def isolated_env(**extra: str) -> dict[str, str]:
    """The environment for a process of a fresh virtualenv: nothing that points back at the
    checkout (PYTHONPATH), no user site-packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


@contextmanager
def serving(
    command: list[str], *, cwd: Path, env: dict[str, str], log_file: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` (a `pdp serve`) running, its output in `log_file`. Leaving the block normally
    sends SIGTERM and expects exit 0 (a clean stop); any exit kills what is still running."""
    with log_file.open("w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log)
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def health_status(port: int) -> int | None:
    """What a gRPC health probe (Kubernetes' `grpc:` probe) gets from 127.0.0.1:`port`: the
    overall status (service ""), None when it cannot connect or times out (1 s)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return None
    return answer.status
