"""The package root's public API (`policy_engine.__all__`) and the one exception hierarchy.

The root must import with the client's dependencies alone (the base install; README, Client
for the broker): the lean-import cases run in a fresh interpreter in which every module of
the `server` extra's distributions refuses to import. Every exception class the package
defines derives from `PolicyEngineError` and keeps the built-in base it had, and README's
Errors section names each one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import policy_engine
from policy_engine import PolicyEngineError

REPO = Path(__file__).resolve().parent.parent

# The built-in base each class had before the hierarchy, still a base now (handlers written
# as `except ValueError` keep catching them). Classes not named here derived from Exception.
BUILTIN_BASES: dict[str, type[BaseException]] = {
    "ClientConfigError": ValueError,
    "RequestValueError": ValueError,
    "ConfigError": ValueError,
    "MetricsBindError": ValueError,
    "KeySetError": ValueError,
    "KeyFileError": ValueError,
    "BundleError": ValueError,
    "DuplicateKeyError": ValueError,
    "NoPolicyLoaded": RuntimeError,
    "StartFailed": RuntimeError,
    "DeadlinePassed": TimeoutError,
    "BuildError": RuntimeError,
    "H2loadError": RuntimeError,
    "RedisUnavailable": RuntimeError,
    "ServerError": RuntimeError,
}


def _server_only_modules() -> list[str]:
    """Top-level modules of the distributions the `server` extra adds (pyproject.toml)."""
    with (REPO / "pyproject.toml").open("rb") as file:
        extra = tomllib.load(file)["project"]["optional-dependencies"]["server"]

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    wanted = {canonical(re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0]) for r in extra}
    installed = importlib.metadata.packages_distributions()
    modules = sorted(
        module
        for module, dists in installed.items()
        if any(canonical(dist) in wanted for dist in dists)
    )
    assert {"yaml", "celpy", "redis", "jwt", "pydantic"} <= set(modules), modules
    return modules


# Runs in the child: argv[1] is a JSON list of top-level modules that must not import.
_CHILD = """
import json, sys

blocked = set(json.loads(sys.argv[1]))

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} belongs to the server extra")
        return None

sys.meta_path.insert(0, Refuse())
import policy_engine

after_root = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "google"))
namespace = {}
exec("from policy_engine import *", namespace)
public = sorted(n for n in namespace if n != "__builtins__")
request = namespace["check_request"]("acme", "alice", "pr-reviewer", "github", "repo")
print(json.dumps({
    "after_root": after_root,
    "public": public,
    "request_org": request.organization,
    "loaded_blocked": sorted({m.split(".")[0] for m in sys.modules} & blocked),
}))
"""


def test_the_root_exports_its_api_with_the_client_dependencies_alone() -> None:
    blocked = _server_only_modules()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(blocked)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["public"] == sorted(policy_engine.__all__)
    assert report["request_org"] == "acme"
    assert report["loaded_blocked"] == []
    # `import policy_engine` alone loads no gRPC: the server's modules all import it first.
    assert report["after_root"] == []


def test_every_name_in_all_resolves_to_what_its_module_defines() -> None:
    lazy = policy_engine._LAZY
    assert set(policy_engine.__all__) == {"PolicyEngineError", "__version__", *lazy}
    for name, module in lazy.items():
        assert getattr(policy_engine, name) is getattr(importlib.import_module(module), name)
    assert "PdpClient" in dir(policy_engine)
    assert policy_engine.__version__ == importlib.metadata.version("policy-engine")
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = policy_engine.nothing_here
    # An unknown name falls through to the submodule, as a plain package's would.
    from policy_engine import metrics

    assert metrics.__name__ == "policy_engine.metrics"


def _exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in a module of policy_engine (generated code and the
    `__main__` entry points, which run when imported, aside)."""
    found: list[type[BaseException]] = []
    for info in pkgutil.walk_packages(policy_engine.__path__, "policy_engine."):
        if info.name.startswith("policy_engine.api.kontext") or info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError as exc:  # an optional extra that is not installed here
            pytest.fail(f"{info.name} does not import: {exc}")
        found += [
            value
            for value in vars(module).values()
            if inspect.isclass(value)
            and issubclass(value, BaseException)
            and value.__module__ == info.name
        ]
    return found


def test_every_exception_the_package_defines_is_a_policy_engine_error() -> None:
    classes = _exception_classes()
    names = {cls.__name__ for cls in classes}
    assert {"RequestValueError", "ConfigError", "PolicyLoadError", "BundleError"} <= names
    public = [cls for cls in classes if not cls.__name__.startswith("_")]
    outside = [cls.__qualname__ for cls in public if not issubclass(cls, PolicyEngineError)]
    assert outside == [], "not under PolicyEngineError"
    for cls in public:
        base = BUILTIN_BASES.get(cls.__name__)
        if base is not None:
            assert issubclass(cls, base), f"{cls.__name__} lost its base {base.__name__}"
    assert set(BUILTIN_BASES) <= names  # the table names no class that is gone

    # README's Errors section lists every one, so a new class is documented where it is added.
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n### Errors\n", 1)[1].split("\n#", 1)[0]
    undocumented = sorted(cls.__name__ for cls in public if f"`{cls.__name__}`" not in section)
    assert undocumented == []


def test_the_client_refuses_a_bearer_token_without_tls_with_a_project_error() -> None:
    from policy_engine import ClientConfigError, PdpClient

    with pytest.raises(ClientConfigError, match="needs TLS") as caught:
        PdpClient("127.0.0.1:9", bearer_token="secret")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, PolicyEngineError)


def test_request_value_errors_are_caught_as_the_root_and_as_value_errors() -> None:
    from policy_engine import RequestValueError, check_request

    with pytest.raises(PolicyEngineError) as caught:
        check_request("acme", "alice", "app", "github", "repo", subject_attributes={"n": 2**60})
    assert type(caught.value) is RequestValueError
    assert isinstance(caught.value, ValueError)
    assert caught.value.path == "subject.attributes.n"
