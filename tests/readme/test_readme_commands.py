"""Every shell example in README.md runs as printed, on a fresh copy of the repository.

Which blocks and lines are examples, and the `<!-- readme-test: ... -->` markers for those
that need Redis, files or a running server first, or cannot run in a test: see
tests/readme/readme.py. The copy holds the tracked files only (as a clone does) plus a
symlink to this checkout's `.venv` (whose install stamp is current, so no `make` target
installs anything: checked first, since an install there would repoint the shared venv);
`make generate` (what `make run` and `make test` do first) gives it the gRPC stubs. Commands
run with bash in the copy, `.venv/bin` first on PATH and the copy first on PYTHONPATH, with no
`PDP_*` variable of ours, but `PDP_ADDRESS` (a free port) and `PDP_METRICS_ADDRESS` (empty) so
that servers never meet anyone's default port. `/etc/pdp/` (a deployment path) becomes a
folder of the copy.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from policy_engine.api import pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.client import check_request
from tests.readme.readme import README, REPO, Block, MarkerError, extract_blocks, serves
from tests.store.support import free_port, wait_for

BLOCKS = extract_blocks(README.read_text())
VENV_BIN = REPO / ".venv" / "bin"
REDIS_URL = re.compile(r"redis://(?:host|localhost|127\.0\.0\.1):6379")
COMMAND_TIMEOUT = 120
START_TIMEOUT = 60


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tracked files, mtimes kept (so make sees the venv's stamp as current), the venv
    linked, the stubs generated."""
    root = tmp_path_factory.mktemp("readme") / "repo"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name, follow_symlinks=False)
    (root / ".venv").symlink_to(REPO / ".venv")
    plan = subprocess.run(
        ["make", "-n", "generate", "run"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    if "pip install" in plan:
        pytest.fail("this checkout's .venv is out of date: run `make install` first")
    subprocess.run(["make", "generate"], cwd=root, capture_output=True, check=True, timeout=120)
    return root


def _environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root)
    env["PDP_METRICS_ADDRESS"] = ""
    env.pop("VIRTUAL_ENV", None)
    env.pop("MAKEFLAGS", None)
    return env


def _run(command: str, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """bash -c COMMAND in its own process group, all of which is killed past the timeout."""
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{command}: still running after {COMMAND_TIMEOUT} s")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _in_copy(command: str, root: Path, redis_url: str | None) -> str:
    command = command.replace("/etc/pdp/", f"{root}/etc/pdp/")
    if redis_url is not None:
        command = REDIS_URL.sub(redis_url.removesuffix("/0"), command)
    return command


@contextmanager
def _serving(command: list[str] | str, root: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """Runs a command that serves until stopped; yields its address once it serves, then stops
    it (SIGTERM to its process group) and fails on a traceback in its log."""
    address = f"127.0.0.1:{free_port()}"
    argv = ["bash", "-c", command] if isinstance(command, str) else command
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv,
            cwd=root,
            env={**env, "PDP_ADDRESS": address},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: proc.poll() is not None or "serving kontext.pdp.v1" in log.read_text(),
            timeout=START_TIMEOUT,
            what=f"{command} to serve",
        )
        assert proc.poll() is None, f"{command} ended: {log.read_text()}"
        yield address
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run_serving(command: str, root: Path, env: dict[str, str], log: Path) -> None:
    with _serving(command, root, env, log) as address:
        status = _run(f"pdp status --address {address}", root, env)
        assert status.returncode == 0, f"{command}: pdp status:\n{status.stdout}{status.stderr}"


def _decisions(root: Path, env: dict[str, str], settings: dict[str, str], log: Path) -> None:
    """A real server with `settings` answers 40 Checks (allowed and denied), then stops."""
    argv = [str(VENV_BIN / "pdp"), "serve", "--policies", "policies"]
    with (
        _serving(argv, root, {**env, **settings}, log) as address,
        grpc.insecure_channel(address) as channel,
    ):
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        for index in range(40):
            scope = "repo:read" if index % 2 else "admin:org"
            request = check_request(
                "acme",
                f"user-{index}",
                "pr-reviewer",
                "github",
                scope,
                subject_attributes={"groups": ["engineering"]},
            )
            stub.Check(request, timeout=30)


def _run_block(block: Block, root: Path, redis_url: str | None) -> None:
    env = _environment(root)
    (root / "etc" / "pdp").mkdir(parents=True)
    for setup in block.setup:
        done = _run(setup, root, env)
        assert done.returncode == 0, f"setup {setup!r}: {done.stderr}"
    for number, printed in enumerate(block.commands):
        if block.skipped_command(printed):
            continue
        command = _in_copy(printed, root, redis_url)
        if serves(printed):
            _run_serving(command, root, env, root / f"serve-{number}.log")
        else:
            done = _run(command, root, env)
            output = done.stdout + done.stderr
            assert "Traceback" not in output, f"{printed}\n{output}"
            if block.transcript:
                shown = {line.strip() for line in output.splitlines()}
                missing = [e for e in block.expected if "…" not in e and e not in shown]
                assert not missing, f"{printed}: printed\n{output}\nnot the README's {missing}"
            else:
                assert done.returncode == 0, f"{printed}: exit {done.returncode}\n{output}"
        for prefix, settings in block.decisions_after.items():
            if printed.startswith(prefix):
                settings = {k: _in_copy(v, root, redis_url) for k, v in settings.items()}
                _decisions(root, env, settings, root / f"decisions-{number}.log")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_example_runs_as_printed(
    block: Block, fresh_copy: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    root = tmp_path / "repo"
    shutil.copytree(fresh_copy, root, symlinks=True)
    redis_url = None
    if block.redis:
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_url = server.url
    _run_block(block, root, redis_url)


def test_every_example_not_run_names_why() -> None:
    """The examples no test runs, listed with their reasons (also what `-rs` shows)."""
    not_run = [(b.line, "whole block", b.skip) for b in BLOCKS if b.skip]
    for block in BLOCKS:
        for command in block.commands:
            if reason := block.skipped_command(command):
                not_run.append((block.line, command, reason))
    assert all(reason and len(reason) > 10 for _, _, reason in not_run), not_run
    prefixes = [(b.line, p) for b in BLOCKS for p in b.skip_prefixes]
    unused = [
        (line, prefix)
        for line, prefix in prefixes
        if not any(c.startswith(prefix) for b in BLOCKS if b.line == line for c in b.commands)
    ]
    assert not unused, f"skip markers that match no command: {unused}"
    print("\n".join(f"README.md:{line}: {what}: {why}" for line, what, why in not_run))


def test_extraction_rule() -> None:
    text = "\n".join(
        [
            "```sh",
            "pdp validate policies/   # a comment",
            "# OK: output",
            "pdp eval --org acme \\",
            "    --explain",
            "```",
            "```",
            "$ pdp config check",
            "pdp: invalid configuration",
            "```",
            "```",
            "policies/  not shell",
            "```",
            "```yaml",
            "a: 1",
            "```",
        ]
    )
    first, second = extract_blocks(text)
    assert first.commands == [
        "pdp validate policies/   # a comment",
        "pdp eval --org acme \\\n    --explain",
    ]
    assert (second.transcript, second.commands) == (True, ["pdp config check"])
    assert second.expected == ["pdp: invalid configuration"]
    with pytest.raises(MarkerError, match=r"README\.md:1"):
        extract_blocks("<!-- readme-test: sometimes -->\n```sh\nls\n```\n")
    with pytest.raises(MarkerError, match="above no example"):
        extract_blocks("<!-- readme-test: redis -->\n```yaml\na: 1\n```\n")
