"""build_stubs: the one generator of the gRPC stubs (the package build and `make generate`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import build_stubs
from build_stubs import StubError, generate

SERVICE = """\
syntax = "proto3";
package kontext.demo.v1;
import "kontext/demo/v1/types.proto";
import "google/protobuf/struct.proto";
service Demo { rpc Ask(Question) returns (Question); }
"""
TYPES = """\
syntax = "proto3";
package kontext.demo.v1;
import "google/protobuf/struct.proto";
message Question { string text = 1; google.protobuf.Struct attributes = 2; }
"""


def _protos(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_every_proto_is_compiled_into_importable_packages_of_policy_engine_api(
    tmp_path: Path,
) -> None:
    """Protos importing each other (and a well-known type) give stubs that import each other
    through policy_engine.api, in regular packages; they load in a fresh interpreter."""
    protos = _protos(
        tmp_path / "protos",
        {"kontext/demo/v1/service.proto": SERVICE, "kontext/demo/v1/types.proto": TYPES},
    )
    tree = tmp_path / "tree"
    written = generate(tree / "policy_engine" / "api", protos)
    api = tree / "policy_engine" / "api"
    names = {p.relative_to(api).as_posix() for p in written}
    assert {
        "kontext/__init__.py", "kontext/demo/__init__.py", "kontext/demo/v1/__init__.py",
        "kontext/demo/v1/service_pb2.py", "kontext/demo/v1/service_pb2_grpc.py",
        "kontext/demo/v1/service_pb2.pyi", "kontext/demo/v1/types_pb2.py",
    } <= names  # fmt: skip
    for path in written:
        assert "from kontext." not in path.read_text() and "import kontext." not in path.read_text()
    (tree / "policy_engine" / "__init__.py").write_text("")
    (api / "__init__.py").write_text("")
    code = (
        "from policy_engine.api.kontext.demo.v1 import service_pb2_grpc, types_pb2;"
        "print(types_pb2.Question(text='x').text, service_pb2_grpc.DemoStub.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=False
    )
    assert done.stdout.split() == ["x", "DemoStub"], done.stderr


def test_a_broken_proto_fails_the_build_naming_its_file_and_line(tmp_path: Path) -> None:
    protos = _protos(
        tmp_path / "protos",
        {"kontext/demo/v1/types.proto": TYPES.replace("string text = 1;", "string text = ;")},
    )
    with pytest.raises(StubError, match=r"kontext/demo/v1/types\.proto:4:"):
        generate(tmp_path / "out", protos)


def test_no_proto_at_all_fails_the_build(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    with pytest.raises(StubError, match=r"no \.proto files"):
        generate(tmp_path / "out", tmp_path / "protos")


def test_the_checkouts_stubs_are_the_generators_output(tmp_path: Path) -> None:
    """`make generate` left the checkout's stubs as the build makes them (same generator)."""
    written = generate(tmp_path / "api")
    for path in written:
        relative = path.relative_to(tmp_path / "api")
        checkout = build_stubs.ROOT / build_stubs.PACKAGE_DIR / relative
        assert checkout.read_text() == path.read_text(), relative
