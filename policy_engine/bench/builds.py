"""Which code a benchmarked server runs: this checkout, or a previous commit in a git worktree.

`python -m policy_engine.bench --baseline REF` measures every row twice per round, once on
this checkout's server and once on REF's, so a change is judged against the server it
replaces on the same machine, in the same minutes, with the same load generator and pinning.
REF is checked out into a temporary detached worktree (`git worktree add --detach`), its gRPC
stubs are generated there with this virtualenv's grpc_tools (as the Makefile's `generate`
does), and its servers are started with the worktree first on PYTHONPATH (the editable
install of this checkout only answers imports the path does not). The worktree is removed
afterwards, whatever ends the run (an error, Ctrl-C, SIGTERM through the harness's handler).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from policy_engine.errors import PolicyEngineError

REPO = Path(__file__).resolve().parents[2]

# As in the Makefile: the proto, where the stubs go, and the import line to fix.
PROTO = Path("protos/kontext/pdp/v1/pdp.proto")
GENDIR = Path("policy_engine/api")
GRPC_STUB = GENDIR / "kontext/pdp/v1/pdp_pb2_grpc.py"
STUB_IMPORT = "from kontext.pdp.v1 import"
FIXED_IMPORT = "from policy_engine.api.kontext.pdp.v1 import"

# The threaded server, the commit before grpc.aio (issue 11's comparison).
PREVIOUS_SERVER_REF = "87f68df^"
GIT_TIMEOUT_S = 120.0
KILL_WAIT_S = 5.0


class BuildError(PolicyEngineError, RuntimeError):
    """A previous build could not be prepared: an unknown ref, a failed checkout or stubs."""


@dataclass(frozen=True, slots=True)
class Build:
    """Where a server's code comes from: `root` is its working directory and import root.

    `label` names it in tables ("current", "previous"); `revision` is the commit it is.
    """

    label: str
    root: Path
    revision: str
    env: dict[str, str] = field(default_factory=dict)  # for its server processes


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> _Done:
    """Run `command` to its end (at most GIT_TIMEOUT_S), output captured, in a process group
    of its own. Whatever interrupts the wait (Ctrl-C, the harness's SIGTERM, the timeout)
    kills the whole group and waits until it is gone before going on: `git worktree add`
    checks the files out in a child process, which, still writing, would refill the directory
    the cleanup removes. Raises OSError when it cannot start."""
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=GIT_TIMEOUT_S)
        except BaseException:
            _kill_group(process)
            raise
    return _Done(process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL `process`'s group, reap it, and wait (up to KILL_WAIT_S) for the rest of the
    group to be gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + KILL_WAIT_S
    while _group_running(process.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _group_running(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs (a zombie does not: it writes nothing,
    and an orphan's may wait a while for its reaper)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            state, _, group = stat[stat.rindex(")") + 2 :].split()[:3]
            if int(group) == pgid and state != "Z":
                return True
    return False


@dataclass(frozen=True, slots=True)
class _Done:
    returncode: int
    stdout: str
    stderr: str


def _git(repo: Path, *args: str) -> str:
    try:
        done = _run(["git", *args], repo)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"git {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise BuildError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def describe(repo: Path, ref: str = "HEAD") -> str:
    """`<short hash> <subject, cut to 60 characters>` of `ref`."""
    line = _git(repo, "log", "-1", "--format=%h %s", ref)
    return line if len(line) <= 70 else line[:69] + "…"


def current(repo: Path = REPO) -> Build:
    """This checkout, as it is on disk (uncommitted changes included)."""
    try:
        revision = describe(repo)
    except BuildError:
        revision = "unknown"
    return Build("current", repo, revision)


def generate_stubs(root: Path) -> None:
    """The gRPC stubs of the checkout at `root`, as `make generate` makes them. Raises
    BuildError when protoc fails (e.g. a ref without the proto)."""
    if not (root / PROTO).is_file():
        raise BuildError(f"{root}: no {PROTO} to generate the gRPC stubs from")
    (root / GENDIR).mkdir(parents=True, exist_ok=True)
    out = str(GENDIR)
    done = _run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={out}",
            f"--grpc_python_out={out}", f"--pyi_out={out}", str(PROTO),
        ],
        root,
    )  # fmt: skip
    if done.returncode != 0:
        raise BuildError(f"protoc in {root}: {done.stderr.strip() or done.stdout.strip()}")
    stub = root / GRPC_STUB
    text = stub.read_text()
    stub.write_text(
        "\n".join(
            FIXED_IMPORT + line[len(STUB_IMPORT) :] if line.startswith(STUB_IMPORT) else line
            for line in text.split("\n")
        )
    )


def python_path(root: Path) -> dict[str, str]:
    """PYTHONPATH putting `root` before anything already there."""
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(root) + (os.pathsep + rest if rest else "")}


def check_imports_from(root: Path, env: dict[str, str]) -> None:
    """Fail unless a server process started in `root` with `env` imports `policy_engine` (and
    its stubs) from `root`, not from the editable install of this checkout."""
    probe = "import policy_engine.api as api; print(api.__file__)"
    done = _run([sys.executable, "-c", probe], root, {**os.environ, **env})
    where = Path(done.stdout.strip() or "?").resolve()
    if done.returncode != 0 or root.resolve() not in where.parents:
        raise BuildError(
            f"a server started in {root} imports policy_engine from {where}, not from there: "
            f"{done.stderr.strip()[-500:]}"
        )


@contextlib.contextmanager
def previous(ref: str, repo: Path = REPO) -> Iterator[Build]:
    """REF checked out in a temporary detached worktree with its stubs generated; removed on
    exit. Raises BuildError (before yielding) when any step fails."""
    try:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except BuildError:
        raise BuildError(f"--baseline {ref}: not a commit in {repo}") from None
    revision = f"{ref} = {describe(repo, commit)}"
    parent = Path(tempfile.mkdtemp(prefix="pdp-bench-previous-"))
    root = parent / "worktree"
    try:
        _git(repo, "worktree", "add", "--detach", str(root), commit)
        generate_stubs(root)
        env = python_path(root)
        check_imports_from(root, env)
        yield Build("previous", root, revision, env)
    finally:
        remove_worktree(repo, root)
        shutil.rmtree(parent, ignore_errors=True)


def remove_worktree(repo: Path, root: Path) -> None:
    """Remove the worktree at `root` and its registration; never raises (a cleanup step).

    A `git worktree add` interrupted half way leaves its worktree locked ("initializing"),
    which a single --force and `prune` both leave alone: hence the second --force, and the
    unlock before pruning a registration whose directory is already gone.
    """
    with contextlib.suppress(BuildError):
        _git(repo, "worktree", "remove", "--force", "--force", str(root))
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.suppress(BuildError):
        _git(repo, "worktree", "unlock", str(root))
    with contextlib.suppress(BuildError):
        _git(repo, "worktree", "prune")
