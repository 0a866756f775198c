"""Every `pdp` command README mentions exists with the flags it shows, synopses included.

Checked without running anything: inline code spans starting with `pdp ` and every line
starting with `pdp ` or `$ pdp ` inside a fenced block (the usage summary too). The words
after `pdp` must name a command (and its subcommand), and each `--flag` (bracketed or not)
must be one of that command's options. Alternatives (`keygen | verify | tail`, `sign ... |
verify ...`) are read as the same command with another subcommand. A span that is a
message rather than a command (a word ending in `:`) is left out.
"""

from __future__ import annotations

import argparse
import re

import pytest

from policy_engine.cli.main import build_parser
from tests.readme.readme import README

TEXT = README.read_text()


def _mentions() -> list[str]:
    found = [" ".join(span.split()) for span in re.findall(r"`(pdp [^`]+)`", TEXT)]
    fenced = False
    pending = ""
    for line in TEXT.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        command = line.removeprefix("$ ")
        if fenced and (pending or command.startswith("pdp ")):
            pending += " " + command.split("  #")[0].strip()
            if not pending.endswith("\\"):
                found.append(pending.strip())
                pending = ""
            pending = pending.removesuffix("\\")
    return sorted({m for m in found if not any(w.endswith(":") for w in m.split())})


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _problems(mention: str) -> list[str]:
    problems: list[str] = []
    parts = mention.split(" | ")
    path: list[str] = []
    for index, part in enumerate(parts):
        words = part.split()
        if index == 0 or words[0] == "pdp":
            words = words[1:] if words[0] == "pdp" else words
            path = []
        else:
            path = path[:-1]  # an alternative subcommand at the same level
        parser = build_parser()
        for name in path:
            parser = _subcommands(parser)[name]
        rest = list(words)
        while rest and (commands := _subcommands(parser)) and not rest[0].startswith("-"):
            if rest[0] not in commands:
                if not re.fullmatch(r"[a-z][a-z-]*", rest[0]):
                    break  # a positional argument (DIR, FILE) after an optional subcommand
                problems.append(f"{mention}: no command {' '.join(['pdp', *path, rest[0]])}")
                break
            path.append(rest.pop(0))
            parser = commands[path[-1]]
        options = {o for action in parser._actions for o in action.option_strings}
        for word in rest:
            flag = word.strip("[]").split("=")[0]
            if flag.startswith("--") and flag not in options:
                problems.append(f"{mention}: pdp {' '.join(path)} has no {flag}")
    return problems


MENTIONS = _mentions()


def test_readme_mentions_the_cli() -> None:
    assert len(MENTIONS) > 20


@pytest.mark.parametrize("mention", MENTIONS)
def test_mentioned_command_and_flags_exist(mention: str) -> None:
    assert not _problems(mention)


def test_a_stale_flag_or_command_is_caught() -> None:
    assert _problems("pdp eval --policies p --no-such-flag")
    assert _problems("pdp bundle keygen --out-private K | rotate DIR")
    assert not _problems("pdp audit keygen | verify | tail")
