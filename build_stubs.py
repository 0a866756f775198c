"""The gRPC stubs of policy_engine.api, generated from protos/ at build time (never committed).

One generator for every way the package is built, so the stubs cannot drift from the .proto:
`setup.py` runs it as the `build_py` step of `pip install .`, `pip wheel .`, `python -m build`
(sdist, then a wheel from it) and editable installs, and `make generate` runs it as a script
(`python build_stubs.py`) for the checkout's own `.venv`.

Input: every `*.proto` below `protos/` (the tree mirrors the proto packages: `kontext/pdp/v1`).
Output, below `<out>/kontext/...`: `*_pb2.py`, `*_pb2_grpc.py` and `*_pb2.pyi` for each, an
empty `__init__.py` in each folder, and `from kontext.` imports rewritten to
`from policy_engine.api.kontext.` (protoc writes imports relative to its include root; the
stubs live inside our package). Needs `grpcio-tools` (a build requirement, and in the dev
extra for `make generate`), never at run time: the generated code needs only `grpcio` and
`protobuf`, at least the versions of the tools that wrote it (it checks at import), which is
why pyproject.toml holds the build's grpcio-tools to the series whose versions it requires.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("policy_engine") / "api"  # where the stubs go, inside the built tree
PACKAGE = "policy_engine.api"
_IMPORT = re.compile(r"^(from|import) kontext\.", re.MULTILINE)


class StubError(RuntimeError):
    """protoc failed or found nothing to compile; the message carries protoc's output."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto below `proto_root`, relative to it, sorted (protoc's import paths)."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto below `proto_root` into `out_dir` (the `policy_engine/api` folder
    of a source tree or a build directory); return the files written. Raises StubError."""
    protos = proto_files(proto_root)
    if not protos:
        raise StubError(f"no .proto files below {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}",
        *(str(p) for p in protos),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StubError(
            f"protoc failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}"
        )
    written: list[Path] = []
    for proto in protos:
        stem = out_dir / proto.with_suffix("")
        for generated in (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"):
            path = Path(generated)
            path.write_text(_IMPORT.sub(rf"\1 {PACKAGE}.kontext.", path.read_text()))
            written.append(path)
        folder = stem.parent
        while folder != out_dir:  # regular packages, so any package finder sees them
            marker = folder / "__init__.py"
            if not marker.exists():
                marker.write_text("")
            if marker not in written:
                written.append(marker)
            folder = folder.parent
    return written


if __name__ == "__main__":
    try:
        for path in generate(ROOT / PACKAGE_DIR):
            print(path.relative_to(ROOT))
    except StubError as exc:
        sys.exit(f"build_stubs: {exc}")
