"""The Dockerfile, read (no container engine runs here): a build stage that makes the wheels
exactly as tests/packaging makes the ones it installs and runs, a runtime stage that installs
them from no index and runs `pdp` as the non-root user the Deployment expects."""

from __future__ import annotations

import fnmatch
import shlex
import tomllib
from dataclasses import dataclass, field

from tests.deploy.manifests import build, container, kustomization, only, pod_spec
from tests.packaging.artifacts import REPO, WHEEL_COMMAND, WHEELS_DIR


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for k, arguments in self.instructions if k == keyword]


def stages() -> list[Stage]:
    """The Dockerfile's stages: instructions with continuations joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    result: list[Stage] = []
    for instruction in logical:
        keyword, _, arguments = instruction.partition(" ")
        if keyword.upper() == "FROM":
            words = arguments.split()
            result.append(Stage(words[0], words[2] if len(words) == 3 else ""))
        else:
            result[-1].instructions.append((keyword.upper(), arguments))
    return result


def _run_commands(stage: Stage) -> list[list[str]]:
    """Each RUN's commands (split on &&), without BuildKit's --mount options."""
    commands = []
    for run in stage.all("RUN"):
        words = [w for w in shlex.split(run) if not w.startswith("--mount=")]
        command: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def test_the_build_stage_makes_the_wheels_the_packaging_test_installs() -> None:
    build_stage, runtime = stages()
    assert build_stage.name and build_stage.all("COPY") == [". ."]
    assert list(WHEEL_COMMAND) in _run_commands(build_stage)
    mounts = [r for r in runtime.all("RUN") if f"from={build_stage.name}" in r]
    assert [f"source={WHEELS_DIR}" in m and f"target={WHEELS_DIR}" in m for m in mounts] == [True]
    install = next(c for c in _run_commands(runtime) if c[:2] == ["pip", "install"])
    assert {"--no-index", "--find-links", WHEELS_DIR} <= set(install)
    assert install[-1] == "policy-engine[server,tracing]"
    assert build_stage.base == runtime.base, "wheels built for the Python that runs them"


def test_the_image_can_trace() -> None:
    """The image holds the `tracing` extra: PDP_TRACING__ENABLED=true in the Deployment must
    not need another image (without it `pdp serve` refuses the setting, and a read-only
    container cannot pip install)."""
    build_stage, runtime = stages()
    (wheel,) = [c for c in _run_commands(build_stage) if c[:2] == ["pip", "wheel"]]
    (install,) = [c for c in _run_commands(runtime) if c[:2] == ["pip", "install"]]
    for command in (wheel, install):
        extras = command[-1].partition("[")[2].rstrip("]").split(",")
        assert {"server", "tracing"} <= set(extras), command


def test_the_image_runs_pdp_serve_as_the_deployments_non_root_user() -> None:
    runtime = stages()[-1]
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric: runAsNonRoot can check it"
    security = pod_spec(only(build(), "Deployment"))["securityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"])
    assert runtime.all("ENTRYPOINT") == ['["pdp"]']
    assert runtime.all("CMD") == ['["serve"]']
    assert container(only(build(), "Deployment"))["args"] == ["serve"]
    env = " ".join(runtime.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the root file system is read-only"


def test_the_build_context_holds_only_what_the_build_reads() -> None:
    """.dockerignore: everything out, then the sdist's inputs back in (never .venv, .git or
    the local cache signing key in .pdp/)."""
    lines = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml", "setup.py", "build_stubs.py", "MANIFEST.in", "README.md",
        "policy_engine", "protos",
    }  # fmt: skip
    for name in allowed:
        assert (REPO / name).exists(), name
    for secret in (".pdp/cache-signing.key", ".venv/bin/python", ".git/config"):
        assert not any(fnmatch.fnmatch(secret.split("/")[0], a) for a in allowed), secret


def test_the_deployed_image_is_this_versions() -> None:
    """The tag deploy/ deploys is the project's version (what `docker build` in README tags)."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    (image,) = kustomization()["images"]
    assert image["newTag"] == version
    assert container(only(build(), "Deployment"))["image"] == f"{image['name']}:{version}"
    assert f"docker build -t {image['name']}:{version} ." in (REPO / "README.md").read_text()
