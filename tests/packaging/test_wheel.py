"""The package as users get it: built outside the checkout, installed in fresh virtualenvs.

Two wheels: one built from the source tree by the Dockerfile's command (`pip wheel
.[server,tracing]`, which also collects the dependencies' wheels into a wheelhouse), one built by
`python -m build` from the sdist it makes first. The tree's wheel is installed with the base
dependencies only (the broker's client) and runs README's "Client for the broker" example,
over mutual TLS with a bearer token, against `pdp serve` of the sdist's wheel installed with
the `server` extra in another virtualenv (a copy of policies/, a real redis-server for the
shared cache level, the plaintext health port). Neither virtualenv sees the checkout.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from packaging.requirements import Requirement
from packaging.version import Version

from policy_engine.bench.redis_server import RedisServer
from tests.auth.certs import CertificateAuthority
from tests.auth.material import jwks, rsa_key
from tests.packaging.artifacts import (
    REPO,
    WHEEL_COMMAND,
    WHEELS_DIR,
    fresh_venv,
    health_status,
    isolated_env,
    pip_install,
    run_build,
    serving,
    source_copy,
)
from tests.store.support import free_port, wait_for

pytestmark = pytest.mark.registry

STUBS = "policy_engine/api/kontext/pdp/v1/"
GENERATED = (f"{STUBS}pdp_pb2.py", f"{STUBS}pdp_pb2_grpc.py", f"{STUBS}pdp_pb2.pyi")
README_ADDRESS = '"pdp.internal:50051"'
SERVER = 'extra == "server"'


@dataclass(frozen=True)
class Artifacts:
    tree_wheel: Path  # pip wheel of the source tree
    sdist: Path
    sdist_wheel: Path  # python -m build: the wheel built from the sdist
    wheelhouse: Path  # the tree's wheel and every dependency's, as in the Dockerfile


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    root = tmp_path_factory.mktemp("packaging")
    assert not root.is_relative_to(REPO)
    source = source_copy(root / "src")
    assert not (source / "policy_engine/api/kontext").exists(), "a clone holds no stubs"
    wheelhouse = root / "wheelhouse"
    pip_command = [sys.executable, "-m", *WHEEL_COMMAND]
    run_build([str(wheelhouse) if a == WHEELS_DIR else a for a in pip_command], source)
    dist = root / "dist"
    run_build([sys.executable, "-m", "build", "--outdir", str(dist), str(source)], root)
    (sdist,) = dist.glob("*.tar.gz")
    (sdist_wheel,) = dist.glob("*.whl")
    (tree_wheel,) = wheelhouse.glob("policy_engine-*.whl")
    return Artifacts(tree_wheel, sdist, sdist_wheel, wheelhouse)


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {n for n in archive.namelist() if ".dist-info/" not in n}


def _metadata(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(name).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def test_the_sdist_carries_the_protos_and_no_generated_code(artifacts: Artifacts) -> None:
    with tarfile.open(artifacts.sdist) as archive:
        names = {n.partition("/")[2] for n in archive.getnames()}
    assert {"protos/kontext/pdp/v1/pdp.proto", "build_stubs.py", "setup.py"} <= names
    assert not [n for n in names if "_pb2" in n]


def test_both_wheels_carry_the_stubs_and_the_typing_marker(artifacts: Artifacts) -> None:
    tree, from_sdist = _wheel_files(artifacts.tree_wheel), _wheel_files(artifacts.sdist_wheel)
    assert tree == from_sdist
    assert {*GENERATED, "policy_engine/py.typed", "policy_engine/client.py"} <= tree
    schemas = (REPO / "policy_engine/audit/schema").glob("*.json")
    assert {f"policy_engine/audit/schema/{s.name}" for s in schemas} <= tree
    with zipfile.ZipFile(artifacts.tree_wheel) as archive:
        stub = archive.read(f"{STUBS}pdp_pb2_grpc.py").decode()
    assert "from policy_engine.api.kontext.pdp.v1 import pdp_pb2" in stub
    assert not [n for n in tree if n.startswith("tests/")]


def test_runtime_requirements_admit_no_grpc_or_protobuf_older_than_the_generated_code(
    artifacts: Artifacts,
) -> None:
    """The generated code refuses, at import, a grpcio or protobuf older than the tools that
    wrote it: the wheel's own requirements must already refuse them. grpcio-tools is a build
    (and dev) requirement only."""
    with zipfile.ZipFile(artifacts.tree_wheel) as archive:
        grpc_stub = archive.read(f"{STUBS}pdp_pb2_grpc.py").decode()
        pb2 = archive.read(f"{STUBS}pdp_pb2.py").decode()
    grpc_made = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_stub)[1])
    protobuf_made = Version(re.search(r"# Protobuf Python Version: (\S+)", pb2)[1])
    base = {r.name: r for r in _metadata(artifacts.tree_wheel) if r.marker is None}
    assert set(base) == {"grpcio", "protobuf"}, "the client's dependencies, nothing more"
    for name, made in (("grpcio", grpc_made), ("protobuf", protobuf_made)):
        floors = [Version(s.version) for s in base[name].specifier if s.operator == ">="]
        assert floors and max(floors) >= made, (name, base[name], made)
    assert not base["protobuf"].specifier.contains(f"{protobuf_made.major + 1}.0.0")
    tools = [r for r in _metadata(artifacts.tree_wheel) if r.name == "grpcio-tools"]
    assert [str(r.marker) for r in tools] == ['extra == "dev"']


@pytest.fixture(scope="module")
def client_python(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the tree's wheel and its base dependencies only."""
    python = fresh_venv(tmp_path_factory.mktemp("client") / "venv")
    pip_install(python, artifacts.wheelhouse, "policy-engine")
    return python


def test_the_client_installs_alone_and_pdp_then_names_the_missing_extra(
    artifacts: Artifacts, client_python: Path, tmp_path: Path
) -> None:
    python = client_python
    server_only = {r.name for r in _metadata(artifacts.tree_wheel) if str(r.marker) == SERVER}
    assert "pyyaml" in server_only
    listing = "import importlib.metadata as m; print(*(d.name for d in m.distributions()))"
    installed = subprocess.run(
        [python, "-c", listing],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=isolated_env(),
    ).stdout.split()  # fmt: skip
    assert "policy-engine" in installed or "policy_engine" in installed
    assert not server_only & {n.lower().replace("_", "-") for n in installed}
    pdp = python.parent / "pdp"
    done = subprocess.run(
        [pdp, "serve"], capture_output=True, text=True, cwd=tmp_path, env=isolated_env()
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "pip install 'policy-engine[server]'" in done.stderr


def readme_client_example() -> str:
    """The Python block of README's "Client for the broker" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Client for the broker\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def served(artifacts: Artifacts, tmp_path: Path, redis_server: RedisServer) -> Iterator[dict]:
    """`pdp serve` of the sdist's wheel (server extra) over mutual TLS with caller tokens,
    the Redis level on and the health port; yields the client's files and addresses."""
    python = fresh_venv(tmp_path / "server-venv")
    wheel = f"policy-engine[server] @ {artifacts.sdist_wheel.as_uri()}"
    pip_install(python, artifacts.wheelhouse, wheel)
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = CertificateAuthority(pki)
    server_cert, broker_cert = ca.issue("pdp", server=True), ca.issue("broker", server=False)
    broker_key = rsa_key("broker-1")
    (tmp_path / "callers.jwks").write_text(jwks(broker_key))
    (tmp_path / "cache.key").write_text("k" * 64 + "\n")
    policies = tmp_path / "policies"
    subprocess.run(["cp", "-r", str(REPO / "policies"), str(policies)], check=True)
    # The installed command, beyond serve: the example policies' own suites, as `make test`
    # runs them; and no build tool came along at run time.
    checks = subprocess.run(
        [python.parent / "pdp", "test", "--coverage-min", "100", str(policies)],
        capture_output=True, text=True, cwd=tmp_path, env=isolated_env(), check=False,
    )  # fmt: skip
    assert checks.returncode == 0, checks.stdout + checks.stderr
    no_tools = "import importlib.util as u; print(u.find_spec('grpc_tools') is None)"
    found = subprocess.run(
        [python, "-c", no_tools], capture_output=True, text=True, env=isolated_env(), check=True
    )
    assert found.stdout.strip() == "True", "grpcio-tools is a build requirement only"
    # Without the tracing extra, tracing on is refused in one line naming it, no traceback.
    traced = subprocess.run(
        [python.parent / "pdp", "config", "check", "--policies", str(policies)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
        env=isolated_env(PDP_TRACING__ENABLED="true"),
    )  # fmt: skip
    assert traced.returncode == 2, traced.stdout + traced.stderr
    assert "setting tracing.enabled: OpenTelemetry is not installed" in traced.stderr
    assert "pip install 'policy-engine[tracing]'" in traced.stderr
    assert "Traceback" not in traced.stderr
    port, health_port = free_port(), free_port()
    env = isolated_env(
        PDP_TLS__CERT_FILE=str(server_cert.cert_file),
        PDP_TLS__KEY_FILE=str(server_cert.key_file),
        PDP_TLS__CLIENT_CA_FILE=str(ca.cert_file),
        PDP_CALLER_AUTH__JWKS_FILE=str(tmp_path / "callers.jwks"),
        PDP_CALLER_AUTH__AUDIENCE="pdp",
        PDP_CALLER_AUTH__ISSUER="https://broker-idp.example",
        PDP_CACHE__REDIS_URL=redis_server.url,
        PDP_CACHE__REDIS_SIGNING_KEY_FILE=str(tmp_path / "cache.key"),
        PDP_HEALTH_ADDRESS=f"127.0.0.1:{health_port}",
        PDP_METRICS_ADDRESS="",
    )
    log_file = tmp_path / "serve.log"
    command = [str(python.parent / "pdp"), "serve", "--address", f"127.0.0.1:{port}",
               "--policies", str(policies)]  # fmt: skip
    with serving(command, cwd=tmp_path, env=env, log_file=log_file) as proc:

        def ready() -> bool:
            assert proc.poll() is None, log_file.read_text()
            return health_status(health_port) == health_pb2.HealthCheckResponse.SERVING

        wait_for(ready, timeout=60, interval=0.2, what="pdp serve from the wheel")
        yield {
            "port": port,
            "token": broker_key.sign(
                sub="broker",
                aud="pdp",
                iss="https://broker-idp.example",
                exp=int(time.time()) + 300,
            ),
            "files": {
                "ca.pem": ca.cert_file,
                "broker.pem": broker_cert.cert_file,
                "broker.key": broker_cert.key_file,
            },
        }
    assert "serving kontext.pdp.v1" in log_file.read_text()


def test_the_readme_client_example_runs_from_the_client_only_wheel_against_the_wheel_server(
    client_python: Path, served: dict, tmp_path: Path
) -> None:
    work = tmp_path / "broker"
    work.mkdir()
    for name, source in served["files"].items():
        (work / name).write_bytes(source.read_bytes())
    example = readme_client_example()
    assert example.count(README_ADDRESS) == 1
    script = "\n".join(
        [
            "import functools, os, policy_engine.client",
            # The example keeps the client's 500 ms deadline, which its first call also spends
            # connecting (TCP, TLS); on a loaded CI machine that is not a packaging failure.
            "policy_engine.client.PdpClient = functools.partial("
            "policy_engine.client.PdpClient, timeout=30.0)",
            "def mint_token():\n    return os.environ['BROKER_TOKEN']",
            "class BrokerError(Exception):\n    pass",
            example.replace(README_ADDRESS, f'"localhost:{served["port"]}"'),
            "print('client from', policy_engine.client.__file__)",
            "print('allowed', answer.allowed, answer.response.policy_revision)",
        ]
    )
    done = subprocess.run(
        [client_python, "-c", script], capture_output=True, text=True, cwd=work,
        env=isolated_env(BROKER_TOKEN=served["token"]), timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"client from {client_python.parents[1]}" in done.stdout
    assert re.search(r"^allowed True [0-9a-f]+$", done.stdout, re.MULTILINE), done.stdout
