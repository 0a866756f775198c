"""The CEL grammar's LALR tables are cached by lark in a private per-user directory, and any
trouble with that file (stale, corrupt, unwritable, not private) falls back to building them.

Each case runs a fresh interpreter (the parser is built once per process) with
``XDG_CACHE_HOME`` pointing into the test's own directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Prints whether lark loaded the tables from its cache (opened the file and did not build and
# save them after), then what the compiler makes of a few
# expressions (values, errors with positions) and the parse of one, rule names as str.
PROBE = r"""
import json, logging, sys
from policy_engine.cel import CelCompileError, compile_expression
from policy_engine.cel.compiler import _full_parse
from tests.cel.support import ACTIVATION, DECLARATIONS

class Seen(logging.Handler):  # lark logs opening the file, and saving after building
    messages = []
    def emit(self, record):
        Seen.messages.append(record.getMessage().split(":")[0])

lark_logger = logging.getLogger("lark")
lark_logger.setLevel(logging.DEBUG)
lark_logger.handlers = [Seen()]
out = []
for text in ['"staff" in subject.attributes.groups && i < 8', 's.matches("(")', "i +", "1 @ 2"]:
    try:
        out.append(repr(compile_expression(text, DECLARATIONS).evaluate(ACTIVATION)))
    except CelCompileError as exc:
        out.append([exc.message, exc.line, exc.column])
tree = _full_parse("a.b(true) ? [1, 2u] : {'k': -3.5}")
out.append(repr(tree).replace("Token('RULE', '", "'").replace("')", "'"))
cached = Seen.messages == ["Loading grammar from cache"]
json.dump({"cached": cached, "out": out}, sys.stdout)
"""

ROOT = Path(__file__).resolve().parents[2]


def probe(cache_home: Path) -> dict[str, object]:
    environment = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stderr == ""
    result: dict[str, object] = json.loads(run.stdout)
    return result


def cache_file(cache_home: Path) -> Path:
    return cache_home / "policy-engine" / "cel-lark-tables.pickle"


def test_the_tables_are_cached_and_a_cached_parser_parses_as_a_built_one(tmp_path: Path) -> None:
    built = probe(tmp_path)
    assert built["cached"] is False
    assert cache_file(tmp_path).is_file()
    assert (cache_file(tmp_path).parent.stat().st_mode & 0o777) == 0o700
    loaded = probe(tmp_path)
    assert loaded["cached"] is True
    assert loaded["out"] == built["out"]


def test_a_corrupt_or_stale_cache_file_is_rebuilt(tmp_path: Path) -> None:
    reference = probe(tmp_path)
    for garbage in (b"", b"not a pickle", cache_file(tmp_path).read_bytes()[:-100]):
        cache_file(tmp_path).write_bytes(garbage)
        again = probe(tmp_path)
        assert again == {**reference, "cached": False}
        assert probe(tmp_path) == {**reference, "cached": True}  # rewritten whole
    # another grammar's (or lark version's) tables: a different key on the first line
    data = cache_file(tmp_path).read_bytes()
    cache_file(tmp_path).write_bytes(b"0" * 64 + data[64:])
    assert probe(tmp_path) == {**reference, "cached": False}


def test_no_cache_where_the_directory_cannot_be_made_or_is_not_private(tmp_path: Path) -> None:
    reference = probe(tmp_path / "good")
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    assert probe(in_the_way) == {**reference, "cached": False}
    shared = tmp_path / "shared"
    (shared / "policy-engine").mkdir(parents=True)
    (shared / "policy-engine").chmod(0o777)
    for _ in range(2):
        assert probe(shared) == {**reference, "cached": False}
    assert not cache_file(shared).exists()
