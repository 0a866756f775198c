"""The CEL grammar's tables are built in memory at every start: no cache file is read or written.

A grammar cache is a pickle, and lark unpickles it before checking it, so whoever can write the
file or a folder on its path could run code in the server. Each case runs a fresh interpreter
(the parser is built once per process) with ``HOME``, ``XDG_CACHE_HOME`` and ``TMPDIR``
pointing into the test's own directory, where a planted pickle waits at every place a cache
was ever looked for.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, sys
from policy_engine.cel import CelCompileError, compile_expression
from tests.cel.support import ACTIVATION, DECLARATIONS
out = []
for text in ['"staff" in subject.attributes.groups && i < 8', 's.matches("(")', "i +"]:
    try:
        out.append(repr(compile_expression(text, DECLARATIONS).evaluate(ACTIVATION)))
    except CelCompileError as exc:
        out.append([exc.message, exc.line, exc.column])
json.dump(out, sys.stdout)
"""


class _Planted:
    """Unpickling this creates the marker file: proof that a planted cache ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _run(home: Path) -> tuple[list[object], set[Path]]:
    """The probe's output, and every file under `home` after it ran."""
    environment = {
        **os.environ,
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "TMPDIR": str(home / "tmp"),
        "PYTHONPATH": str(ROOT),
    }
    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stderr == ""
    return json.loads(run.stdout), {p for p in home.rglob("*")}


def test_no_cache_file_is_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    out, files = _run(home)
    assert len(out) == 3 and isinstance(out[1], list)  # compiled, and errors with positions
    assert files == {home / "tmp"}


def test_a_planted_grammar_cache_is_never_unpickled(tmp_path: Path) -> None:
    home = tmp_path / "home"
    marker = tmp_path / "marker"
    payload = b"0" * 64 + b"\n" + pickle.dumps(_Planted(marker))
    places = [
        home / ".cache" / "policy-engine" / "cel-lark-tables.pickle",  # this project's once
        home / "tmp" / "placeholder",
    ]
    for place in places:
        place.parent.mkdir(parents=True, exist_ok=True)
        place.parent.chmod(0o700)
        place.write_bytes(payload)
    # lark's default cache names: .lark_cache_<hash>_<version>.tmp in the temporary folder.
    (home / "tmp" / ".lark_cache_planted.tmp").write_bytes(payload)
    out, _ = _run(home)
    assert not marker.exists()
    clean = tmp_path / "clean"
    (clean / "tmp").mkdir(parents=True)
    assert out == _run(clean)[0]
