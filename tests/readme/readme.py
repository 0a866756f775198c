"""README.md's shell examples, read as the tests run them.

Which fenced blocks are examples: a block whose info string is `sh`, `bash`, `shell` or
`console`, or a block with no info string whose first line starts with `$ ` (a transcript).
In a transcript, the lines starting with `$ ` are commands and the other lines the output it
must print (every line without an ellipsis `…` must appear). In the other blocks every line
that is neither blank nor starts with `#` is a command; `#` lines are sample output. A line
ending in `\\` continues on the next.

Markers: HTML comments (invisible on GitHub) on the lines directly above the fence, one
directive each:

* `<!-- readme-test: skip: REASON -->`: the whole block is not run (listed with its reason).
* `<!-- readme-test: skip "PREFIX": REASON -->`: its commands starting with PREFIX are not.
* `<!-- readme-test: redis -->`: a real redis-server on a free port; `redis://H:6379` in the
  commands (H: `host`, `localhost`, `127.0.0.1`) points at it instead (never port 6379).
* `<!-- readme-test: setup: SHELL -->`: run first (files the example takes as given).
* `<!-- readme-test: decisions-after "PREFIX": NAME=VALUE ... -->`: once the command starting
  with PREFIX has run, a real `pdp serve` of `policies/` with these settings (environment
  variables) answers a few dozen Checks and is stopped with SIGTERM (e.g. to write an audit
  log for the commands that follow).

Commands that serve until stopped (`pdp serve`, `make run`) are started, must answer
`pdp status` (exit 0: every component ready), and are then stopped with SIGTERM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

SHELL_INFOS = frozenset({"sh", "bash", "shell", "console"})
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
SKIP_PREFIX = re.compile(r'^skip\s+"(?P<prefix>[^"]+)":\s*(?P<reason>.+)$')
DECISIONS_AFTER = re.compile(r'^decisions-after\s+"(?P<prefix>[^"]+)":\s*(?P<env>.*)$')
SERVES = re.compile(r"(^|\s)(pdp serve|make run)(\s|$)")


@dataclass
class Block:
    """One example block: where it starts (1-based line of the fence), its commands and the
    markers above it."""

    line: int
    transcript: bool
    commands: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    skip: str | None = None
    skip_prefixes: dict[str, str] = field(default_factory=dict)
    redis: bool = False
    setup: list[str] = field(default_factory=list)
    decisions_after: dict[str, dict[str, str]] = field(default_factory=dict)

    def skipped_command(self, command: str) -> str | None:
        """The reason `command` is not run, or None."""
        for prefix, reason in self.skip_prefixes.items():
            if command.startswith(prefix):
                return reason
        return None


class MarkerError(ValueError):
    """A `readme-test` marker this module does not understand (named with its line)."""


def _apply(block: Block, body: str, line: int) -> None:
    if body == "redis":
        block.redis = True
    elif body.startswith("setup:"):
        block.setup.append(body.removeprefix("setup:").strip())
    elif match := SKIP_PREFIX.match(body):
        block.skip_prefixes[match["prefix"]] = match["reason"]
    elif body.startswith("skip:"):
        block.skip = body.removeprefix("skip:").strip()
    elif match := DECISIONS_AFTER.match(body):
        pairs = [pair.partition("=") for pair in match["env"].split()]
        block.decisions_after[match["prefix"]] = {k: v for k, _, v in pairs}
    else:
        raise MarkerError(f"README.md:{line}: unknown readme-test marker {body!r}")


def _commands(lines: list[str], transcript: bool) -> tuple[list[str], list[str]]:
    commands: list[str] = []
    expected: list[str] = []
    pending: str | None = None
    for raw in lines:
        if pending is not None:
            pending += "\n" + raw
            if not raw.endswith("\\"):
                commands.append(pending)
                pending = None
            continue
        text = raw.strip()
        if transcript:
            if not raw.startswith("$ "):
                if text:
                    expected.append(text)
                continue
            text = raw[2:]
        elif not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending = text
        else:
            commands.append(text)
    if pending is not None:
        commands.append(pending)
    return commands, expected


def extract_blocks(text: str) -> list[Block]:
    """Every example block of a Markdown text, in order (rule: see the module docstring).

    Raises MarkerError for a marker it does not know, or one above a block that is no example.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        fence = lines[index]
        if not fence.startswith("```"):
            index += 1
            continue
        info = fence[3:].strip()
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        body = lines[index + 1 : end]
        transcript = info == "console" or (not info and bool(body) and body[0].startswith("$ "))
        markers: list[tuple[int, str]] = []
        above = index - 1
        while above >= 0 and (match := MARKER.match(lines[above])):
            markers.insert(0, (above + 1, match["body"]))
            above -= 1
        if info in SHELL_INFOS or transcript:
            commands, expected = _commands(body, transcript)
            block = Block(line=index + 1, transcript=transcript)
            block.commands, block.expected = commands, expected
            for line, marker in markers:
                _apply(block, marker, line)
            blocks.append(block)
        elif markers:
            raise MarkerError(f"README.md:{markers[0][0]}: a readme-test marker above no example")
        index = end + 1
    return blocks


def serves(command: str) -> bool:
    """Whether `command` serves until it is stopped."""
    return bool(SERVES.search(command))
