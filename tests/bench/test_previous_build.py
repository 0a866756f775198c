"""`python -m policy_engine.bench --baseline REF`: REF in a temporary git worktree with its own
stubs, its servers measured beside this checkout's, the worktree gone afterwards (also after
an error, Ctrl-C or SIGTERM); a row a server cannot serve is reported, not a crash; the
2-worker rows count each worker's decisions.

Real git worktrees of this repository, real servers, real h2load; performance is never
asserted (runs are tiny), only that every figure is there and every answer was checked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policy_engine.bench import builds, cli, h2load, workloads
from policy_engine.bench.server import ServerOptions, ServerSpec

REPO = builds.REPO
needs_h2load = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")


# Several tests here compare this repository's list of git worktrees before and after: they stay
# in this one file, which `make test` gives whole to one pytest-xdist worker (--dist loadfile).
def _worktrees() -> set[str]:
    listing = subprocess.run(
        ["git", "worktree", "list", "--porcelain"], cwd=REPO, capture_output=True, text=True
    ).stdout
    return {line.split(" ", 1)[1] for line in listing.splitlines() if line.startswith("worktree ")}


def test_previous_build_is_a_worktree_with_stubs_removed_afterwards() -> None:
    before = _worktrees()
    with builds.previous("HEAD") as build:
        assert build.label == "previous"
        assert str(build.root) in _worktrees()
        assert (build.root / builds.GRPC_STUB).read_text().count(builds.FIXED_IMPORT) == 1
        assert build.env["PYTHONPATH"].split(os.pathsep)[0] == str(build.root)
        assert build.revision.startswith("HEAD = ")
    assert not build.root.exists()
    assert _worktrees() == before


def test_previous_build_is_removed_when_the_run_fails_inside() -> None:
    before = _worktrees()
    with pytest.raises(KeyboardInterrupt), builds.previous("HEAD") as build:
        raise KeyboardInterrupt
    assert not build.root.exists()
    assert _worktrees() == before


def test_an_unknown_ref_or_a_ref_without_the_proto_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(builds.BuildError, match="not a commit"), builds.previous("no-such-ref"):
        pass
    # A repository whose commit has no proto: the stubs cannot be made; nothing is left over.
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "README").write_text("no proto here\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    with pytest.raises(builds.BuildError, match=r"pdp\.proto"), builds.previous("HEAD", repo):
        pass
    listed = subprocess.run([*git, "worktree", "list"], capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1  # the repository's own tree only


def _plan(tmp_path: Path, workers: int = 1) -> cli.Plan:
    return cli.Plan(
        options=ServerOptions(workers, None, REPO / "policies"),
        shape=h2load.LoadShape(clients=4, streams=2),
        measure_s=0.3,
        warmup_s=0.3,
        workdir=tmp_path,
        logs=tmp_path / "logs",
    )


def test_a_row_a_server_cannot_serve_is_reported_not_raised(tmp_path: Path) -> None:
    """What a previous build lacking a flag looks like: its server exits at once."""
    row = workloads.Row(
        "empty Check", ServerSpec("empty", args=("--no-such-flag",)), "Check",
        workloads.allow_tuple(), workloads.expect_decision(workloads.ALLOW),
    )  # fmt: skip
    result, entries = cli.run_row(row, _plan(tmp_path), build=builds.current())
    assert result.error is not None and "exited with code" in result.error
    assert entries == [] and result.latency is None


@needs_h2load
def test_two_workers_each_count_their_share_of_the_measured_requests(tmp_path: Path) -> None:
    rows = {row.name: row for row in workloads.default_rows()}
    row = rows[workloads.CHECK_UNCACHED_TWO_WORKERS]
    result, _ = cli.run_row(row, _plan(tmp_path), build=builds.current())
    assert result.error is None, result.error
    assert result.processes == 2
    assert result.cpu_s is not None and result.cpu_s > 0
    (shares,) = result.workers
    assert len(shares) == 2
    # Every measured request is one decision of one worker; the checks before and after the
    # load are outside the window.
    assert sum(w.decisions or 0 for w in shares) == result.requests
    assert len(result.balances) == 1
    # h2load's connections were seen, each held by one worker, while the load ran: the
    # sampler reads /proc/net/tcp now and then, so a short run may end before it has seen all
    # 4 at once, never more than h2load opened.
    assert 1 <= sum(w.connections or 0 for w in shares) <= 4


@needs_h2load
def test_a_run_against_a_previous_build_reports_both(tmp_path: Path) -> None:
    output = tmp_path / "bench.md"
    before = _worktrees()
    code = cli.main([
        "--rows", workloads.EMPTY_CHECK, "--baseline", "HEAD", "--duration-scale", "0.05",
        "--rounds", "1", "--no-engine", "--output", str(output),
    ])  # fmt: skip
    assert code == 0
    text = output.read_text()
    assert "Against the previous build" in text
    assert "| empty Check | current |" in text and "| empty Check | previous |" in text
    assert "- builds: current: " in text and "previous: HEAD = " in text
    assert _worktrees() == before


def test_a_bad_baseline_stops_the_run_before_any_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--rows", workloads.EMPTY_CHECK, "--baseline", "no-such-ref"]) == 2
    assert "not a commit" in capsys.readouterr().err


@needs_h2load
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["preparing", "serving"])
def test_ctrl_c_or_sigterm_removes_the_previous_build(
    tmp_path: Path, signum: int, when: str
) -> None:
    """Signalled while the worktree is being made (an interrupted `git worktree add` leaves it
    locked), or while the previous build's server is measured.

    At a third of the default durations (0.6 s of warmup, 3 s measured per row): the current
    build's row before takes ~5 s instead of ~13, and the previous build's still lasts seconds
    after its start is logged, so the signal reaches it while it runs."""
    before = _worktrees()
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "policy_engine.bench", "--rows", workloads.EMPTY_CHECK,
                "--baseline", "HEAD", "--rounds", "1", "--no-engine", "--duration-scale", "0.3",
                "--output", str(tmp_path / "bench.md"),
            ],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120

        def ready() -> bool:
            if when == "preparing":
                return bool(_worktrees() - before)
            return f"{workloads.EMPTY_CHECK} [previous] ..." in log.read_text()

        while not ready() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.02)
        (added,) = _worktrees() - before
        process.send_signal(signum)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert _worktrees() == before
    assert not Path(added).exists()
    # No server of the previous build is left running (its working directory was there).
    left = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and os.readlink(entry / "cwd").startswith(added):
                left.append(int(entry.name))
    assert left == []
