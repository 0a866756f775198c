"""setuptools' build_py, extended to generate the gRPC stubs from protos/ (see build_stubs.py).

Everything else about the distribution is in pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# setuptools.build_meta runs this file without its folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_stubs import PACKAGE_DIR, generate


class BuildPyWithStubs(build_py):
    """build_py, then the stubs: into the build directory for a wheel (after the copy, so a
    checkout's stale generated files are overwritten), into the source tree for an editable
    install (which imports from there)."""

    def run(self) -> None:
        super().run()
        generate(Path(PACKAGE_DIR) if self.editable_mode else Path(self.build_lib) / PACKAGE_DIR)


setup(cmdclass={"build_py": BuildPyWithStubs})
