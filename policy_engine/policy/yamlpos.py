"""Strict YAML for policy files: values read as written, every error naming file:line.

Policies use a small, unambiguous subset of YAML (YAML 1.2, https://yaml.org/spec/1.2.2/):
- no anchors, aliases or merge keys (spec 3.2.2.2, and the YAML 1.1 `<<` merge type): a
  policy never needs them, and refusing them at the event level means an alias bomb costs
  nothing (no node is composed past its first `&anchor`);
- no explicit tags (`!!str`, `!foo`): quotes say "text" without them;
- no duplicate keys at any depth (spec 3.2.1.3 requires unique keys; PyYAML silently keeps
  the last one, which can drop a deny rule);
- plain (unquoted) scalars are typed only when every YAML reader agrees: `true`, `false`,
  `null`, `~`, empty, and decimal integers without a leading zero. Any other plain scalar that
  YAML 1.1 or YAML 1.2 would read as something other than text (`no`, `on`, `y`, `0123`,
  `0x1F`, `1:30`, `1.5`, `.inf`, `2024-01-01`, `True`, `NULL`, ...) is refused with the text as
  written and a hint to quote it; everything else is text, exactly as written;
- nesting is bounded (MAX_DEPTH), so no input can exhaust the recursion limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

MAX_DEPTH = 32  # mappings and sequences nested in each other; policies need about 6


class StrictYamlError(yaml.MarkedYAMLError):
    """A construct strict policy YAML refuses outright (an anchor, alias, tag, merge key,
    or nesting beyond MAX_DEPTH); `problem_mark` is where it starts."""


class PositionedDict(dict):  # type: ignore[type-arg]
    """A mapping that remembers the line of itself, of each key, and of each value's first line."""

    line: int
    key_lines: dict[str, int]
    value_lines: dict[str, int]
    block_scalar: dict[str, bool]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


@dataclass(frozen=True, slots=True)
class YamlProblem:
    """A problem that does not stop reading the rest of the file (a duplicate key, an
    ambiguous scalar): all of them are reported at once. `line` is 1-based."""

    line: int
    message: str
    # An ambiguous plain scalar (kept as text): fatal where the text is the value, harmless
    # where a schema types every value itself (the server's config file, like its env vars).
    ambiguous: bool = False


@dataclass(frozen=True, slots=True)
class YamlDocument:
    value: Any
    line: int


@dataclass(slots=True)
class YamlDocuments:
    documents: list[YamlDocument] = field(default_factory=list)
    problems: list[YamlProblem] = field(default_factory=list)


# Plain scalars every YAML reader (1.1, 1.2 core, 1.2 JSON-compatible) types the same way.
_CANONICAL_BOOL = {"true": True, "false": False}
_CANONICAL_NULL = frozenset({"", "~", "null"})
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]*")

# What YAML 1.1 (https://yaml.org/type/) or YAML 1.2 core (spec 10.3.2) would read as a
# non-string; a plain scalar matching one of these and not canonical above is ambiguous.
_AMBIGUOUS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "a boolean",
        re.compile(
            r"y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE"
            r"|on|On|ON|off|Off|OFF"
        ),
    ),
    ("null", re.compile(r"~|null|Null|NULL")),
    (
        "a date or time",
        re.compile(
            r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
            r"(?:(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]*)?"
            r"(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?)?"
        ),
    ),
    (
        "a sexagesimal (base 60) number",
        re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?"),
    ),
    (
        "a number",
        re.compile(
            r"[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?0x[0-9a-fA-F_]+"
            r"|[-+]?[0-9][0-9_]*"
            r"|[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
        ),
    ),
    ("a YAML 1.1 merge key or value key", re.compile(r"<<|=")),
)


def ambiguity(text: str) -> str | None:
    """What some YAML reader would take the plain scalar `text` for, when that is not text
    and not what every reader agrees on; None when `text` is unambiguous."""
    if text in _CANONICAL_BOOL or text in _CANONICAL_NULL or _CANONICAL_INT.fullmatch(text):
        return None
    for what, pattern in _AMBIGUOUS:
        if pattern.fullmatch(text):
            return what
    return None


class _StrictComposer(Composer, BaseResolver):
    """PyYAML's composer with our checks on every event, and our own construction (no PyYAML
    constructor, so no implicit typing and no merge handling). Mixed into a parser below."""

    problems: list[YamlProblem]
    _depth: int
    _what: str

    def _start(self, what: str = "policy files") -> None:
        Composer.__init__(self)
        BaseResolver.__init__(self)
        self.problems = []
        self._depth = 0
        self._what = what

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise StrictYamlError(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed in {self._what}",
                event.start_mark,
            )
        if event.anchor is not None:  # type: ignore[attr-defined]
            raise StrictYamlError(
                None,
                None,
                f"anchors (&{event.anchor}) are not allowed in {self._what}",  # type: ignore[attr-defined]
                event.start_mark,
            )
        if event.tag is not None:  # type: ignore[attr-defined]
            raise StrictYamlError(
                None,
                None,
                f"tags ({event.tag}) are not allowed in {self._what}: "  # type: ignore[attr-defined]
                "write text in quotes instead",
                event.start_mark,
            )
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise StrictYamlError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)

    # -- construction: our own, from nodes --------------------------------------------------

    def construct(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return [self.construct(child) for child in node.value]
        return self._mapping(node)  # type: ignore[arg-type]

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        text: str = node.value
        if node.style:  # quoted or block: always text, exactly as written (plain: None or "")
            return text
        if text in _CANONICAL_BOOL:
            return _CANONICAL_BOOL[text]
        if text in _CANONICAL_NULL:
            return None
        if _CANONICAL_INT.fullmatch(text):
            return int(text)
        what = ambiguity(text)
        if what is not None:
            self.problems.append(
                YamlProblem(
                    node.start_mark.line + 1,
                    f"`{text}` is ambiguous: some YAML readers take it for {what}. "
                    f"Write '{text}' in quotes if you mean the text"
                    + (" (or true/false for a yes/no field)" if what == "a boolean" else ""),
                    ambiguous=True,
                )
            )
        return text

    def _mapping(self, node: yaml.MappingNode) -> PositionedDict:
        mapping = PositionedDict()
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        mapping.value_lines = {}
        mapping.block_scalar = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(YamlProblem(line, "a mapping key must be plain text"))
                continue
            if not key_node.style and key_node.value == "<<":
                self.problems.append(
                    YamlProblem(line, f"merge keys (<<) are not allowed in {self._what}")
                )
                continue
            key = self._scalar(key_node)
            value = self.construct(value_node)
            if key in mapping:
                first = mapping.key_lines.get(str(key), mapping.line)
                self.problems.append(
                    YamlProblem(
                        line,
                        f"duplicate key {str(key)!r} at lines {first} and {line} "
                        "(YAML requires unique keys; which one was meant?)",
                    )
                )
                continue  # keep the first; the file is refused anyway
            mapping[key] = value
            mapping.key_lines[str(key)] = line
            mapping.value_lines[str(key)] = value_node.start_mark.line + 1
            mapping.block_scalar[str(key)] = getattr(value_node, "style", None) in ("|", ">")
        return mapping


class _PyLoader(_StrictComposer, Reader, Scanner, Parser):
    def __init__(self, text: str, what: str = "policy files") -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        self._start(what)


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _CLoader(_StrictComposer, CParser):  # type: ignore[misc]
        """libyaml scans and parses (about 8x faster); events are checked the same way."""

        def __init__(self, text: str, what: str = "policy files") -> None:
            CParser.__init__(self, text)
            self._start(what)

    _Loader: type[_StrictComposer] = _CLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _Loader = _PyLoader


# YAML 1.1 (which PyYAML and libyaml follow here) ends a line at NEL, LS and PS; YAML 1.2
# (spec 5.4) does not, and neither do editors, grep or a reviewer reading a diff: text after
# one of them that looks like part of a comment would be read as a key. Refused anywhere.
_AMBIGUOUS_LINE_BREAK = re.compile("[\x85\u2028\u2029]")


def _refuse_ambiguous_line_breaks(text: str, what: str) -> None:
    found = _AMBIGUOUS_LINE_BREAK.search(text)
    if found is None:
        return
    before = text[: found.start()].replace("\r\n", "\n").replace("\r", "\n")
    line = before.count("\n")
    column = len(before) - before.rfind("\n") - 1
    mark = yaml.Mark("<text>", found.start(), line, column, None, None)  # type: ignore[arg-type]
    raise StrictYamlError(
        None,
        None,
        f"U+{ord(found.group()):04X} is not allowed in {what}: some YAML readers end a line "
        "there and others (and editors) do not, so the file could be read two ways",
        mark,
    )


def load_documents(
    text: str, *, pure_python: bool = False, what: str = "policy files"
) -> YamlDocuments:
    """Parse every document of a (multi-document) YAML text under the strict rules above.

    Returns the documents and the problems that did not stop reading (duplicate keys,
    ambiguous scalars, merge keys); raises yaml.YAMLError (StrictYamlError for anchors,
    aliases, tags, NEL/LS/PS characters and excessive nesting) with a mark for problems that
    stop it.
    `pure_python` uses PyYAML's own scanner instead of libyaml (tests compare the two); `what`
    names the kind of file in messages ("policy files", "config files").
    """
    _refuse_ambiguous_line_breaks(text, what)
    loader = (_PyLoader if pure_python else _Loader)(text, what)  # type: ignore[call-arg]
    result = YamlDocuments()
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            result.documents.append(YamlDocument(loader.construct(node), node.start_mark.line + 1))
    finally:
        loader.dispose()  # type: ignore[attr-defined]
    result.problems.extend(loader.problems)
    return result


def error_line(error: yaml.YAMLError) -> int:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return mark.line + 1 if mark is not None else 1
