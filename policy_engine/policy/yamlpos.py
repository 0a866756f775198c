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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import yaml
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.scanner import Scanner

from policy_engine.errors import PolicyEngineError

MAX_DEPTH = 32  # mappings and sequences nested in each other; policies need about 6
MAX_INT_DIGITS = 40  # longer decimal integers are refused: no setting or field needs more


class StrictYamlError(PolicyEngineError, yaml.MarkedYAMLError):
    """A construct strict policy YAML refuses outright (an anchor, alias, tag, merge key,
    or nesting beyond MAX_DEPTH); `problem_mark` is where it starts."""


class PositionedDict(dict[str, Any]):
    """A mapping that remembers the line of itself, of each key, and of each value's first line."""

    __slots__ = ("block_scalar", "key_lines", "line", "value_lines")

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
# non-string; a plain scalar that is one of these and not canonical above is ambiguous.
# The words are YAML 1.1's bool and null spellings and its merge and value keys, looked up
# exactly; every other form a reader types starts with a digit, a sign or a dot, and only
# such text is tried against the patterns, in this order (the first that matches names it).
_MERGE_OR_VALUE_KEY = "a YAML 1.1 merge key or value key"
_YAML_1_1_BOOLEANS = (
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE",
    "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF",
)  # fmt: skip
_AMBIGUOUS_WORDS: dict[str, str] = {
    **dict.fromkeys(_YAML_1_1_BOOLEANS, "a boolean"),
    **dict.fromkeys(("~", "null", "Null", "NULL"), "null"),
    "<<": _MERGE_OR_VALUE_KEY,
    "=": _MERGE_OR_VALUE_KEY,
}
_NUMERIC_FIRST = frozenset("0123456789+-.")
_AMBIGUOUS_NUMERIC: tuple[tuple[str, re.Pattern[str]], ...] = (
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
)

# Plain scalars typed as something other than text (the canonical forms above).
_CANONICAL_VALUES: dict[str, bool | None] = {**_CANONICAL_BOOL, **dict.fromkeys(_CANONICAL_NULL)}


def ambiguity(text: str) -> str | None:
    """What some YAML reader would take the plain scalar `text` for, when that is not text
    and not what every reader agrees on; None when `text` is unambiguous."""
    if text in _CANONICAL_BOOL or text in _CANONICAL_NULL or _CANONICAL_INT.fullmatch(text):
        return None
    return _non_canonical_ambiguity(text)


def _non_canonical_ambiguity(text: str) -> str | None:
    """ambiguity() for a `text` known not to be canonical (not empty, either)."""
    what = _AMBIGUOUS_WORDS.get(text)
    if what is not None or text[0] not in _NUMERIC_FIRST:
        return what
    for what, pattern in _AMBIGUOUS_NUMERIC:
        if pattern.fullmatch(text):
            return what
    return None


class _Composer:
    """Builds values straight from parser events (libyaml's or PyYAML's own), checking each
    event as it arrives, before the next one is parsed: the first anchor, alias, tag or level
    too deep stops reading there (so an alias bomb costs nothing), exactly where PyYAML's
    composer would. No yaml Node objects and no PyYAML constructor: no implicit typing, no
    merge handling. Non-fatal problems are collected in document order: for each mapping
    entry, the key's, then the value's, then a duplicate key's."""

    __slots__ = ("_depth", "_get_event", "_what", "problems")

    def __init__(self, get_event: Callable[[], Any], what: str) -> None:
        self._get_event = get_event
        self.problems: list[YamlProblem] = []
        self._what = what
        self._depth = 0

    def documents(self, into: list[YamlDocument]) -> None:
        """Reads the whole stream (raises yaml.YAMLError, StrictYamlError, see load_documents)."""
        get = self._get_event
        get()  # STREAM-START
        while get().__class__ is not StreamEndEvent:  # DOCUMENT-START, or the end
            root = get()
            value = self._node(root)
            get()  # DOCUMENT-END: parsed before the document is used, as PyYAML does
            into.append(YamlDocument(value, root.start_mark.line + 1))

    def _refuse(self, event: Any) -> NoReturn:
        """Raises StrictYamlError for an alias, anchor or tag on `event`, checked in that order."""
        if event.__class__ is AliasEvent:
            message = f"aliases (*{event.anchor}) are not allowed in {self._what}"
        elif event.anchor is not None:
            message = f"anchors (&{event.anchor}) are not allowed in {self._what}"
        else:
            message = (
                f"tags ({event.tag}) are not allowed in {self._what}: write text in quotes instead"
            )
        raise StrictYamlError(None, None, message, event.start_mark)

    def _node(self, event: Any) -> Any:
        """The value of the node that starts with `event` (its events are read to its end)."""
        kind = event.__class__
        if kind is ScalarEvent:
            if event.anchor is not None or event.tag is not None:
                self._refuse(event)
            # Quoted or block: always text, exactly as written (plain: "" from libyaml,
            # None from PyYAML's own parser).
            return event.value if event.style else self._plain(event)
        if kind is MappingStartEvent:
            return self._mapping(event)
        if kind is SequenceStartEvent:
            return self._sequence(event)
        self._refuse(event)  # an alias: the only other event a node can start with

    def _ignored(self, event: Any) -> None:
        """Reads the node starting with `event` for its fatal errors only: its non-fatal
        problems are not reported (it is dropped, with a problem of its own)."""
        kept = self.problems
        self.problems = []
        try:
            self._node(event)
        finally:
            self.problems = kept

    def _plain(self, event: Any) -> Any:
        text: str = event.value
        if text in _CANONICAL_VALUES:
            return _CANONICAL_VALUES[text]
        if text[0] not in _NUMERIC_FIRST:  # most text: only the words can be read otherwise
            what = _AMBIGUOUS_WORDS.get(text)
            if what is None:
                return text
        elif _CANONICAL_INT.fullmatch(text):
            if len(text.lstrip("+-")) > MAX_INT_DIGITS:
                # No field takes such a number, and int() would refuse it past Python's
                # digit limit (sys.get_int_max_str_digits): report it here, with its line.
                self.problems.append(
                    YamlProblem(
                        event.start_mark.line + 1,
                        f"a number of {len(text.lstrip('+-')):,} digits is too long "
                        f"(at most {MAX_INT_DIGITS} digits)",
                    )
                )
                return text
            return int(text)
        else:
            what = _non_canonical_ambiguity(text)
        if what is not None:
            self.problems.append(
                YamlProblem(
                    event.start_mark.line + 1,
                    f"`{text}` is ambiguous: some YAML readers take it for {what}. "
                    f"Write '{text}' in quotes if you mean the text"
                    + (" (or true/false for a yes/no field)" if what == "a boolean" else ""),
                    ambiguous=True,
                )
            )
        return text

    def _enter(self, start: Any) -> None:
        if start.anchor is not None or start.tag is not None:
            self._refuse(start)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise StrictYamlError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", start.start_mark
            )

    def _sequence(self, start: Any) -> list[Any]:
        self._enter(start)
        get = self._get_event
        items: list[Any] = []
        while True:
            event = get()
            if event.__class__ is SequenceEndEvent:
                break
            items.append(self._node(event))
        self._depth -= 1
        return items

    def _mapping(self, start: Any) -> PositionedDict:
        self._enter(start)
        get = self._get_event
        problems = self.problems
        mapping = PositionedDict()
        mapping.line = line = start.start_mark.line + 1
        key_lines: dict[str, int] = {}
        mapping.key_lines = key_lines
        mapping.value_lines = value_lines = {}
        mapping.block_scalar = block_scalar = {}
        while True:
            event = get()
            kind = event.__class__
            if kind is MappingEndEvent:
                break
            key_line = event.start_mark.line + 1
            if kind is not ScalarEvent:
                self._ignored(event)
                self._ignored(get())
                problems.append(YamlProblem(key_line, "a mapping key must be plain text"))
                continue
            if event.anchor is not None or event.tag is not None:
                self._refuse(event)
            style = event.style
            if style:
                key = event.value
            elif event.value == "<<":
                self._ignored(get())
                problems.append(
                    YamlProblem(key_line, f"merge keys (<<) are not allowed in {self._what}")
                )
                continue
            else:
                key = self._plain(event)
            value_event = get()
            value = self._node(value_event)
            name = key if key.__class__ is str else str(key)
            if key in mapping:
                first = key_lines.get(name, line)
                problems.append(
                    YamlProblem(
                        key_line,
                        f"duplicate key {name!r} at lines {first} and {key_line} "
                        "(YAML requires unique keys; which one was meant?)",
                    )
                )
                continue  # keep the first; the file is refused anyway
            mapping[key] = value
            key_lines[name] = key_line
            value_lines[name] = value_event.start_mark.line + 1
            block_scalar[name] = value_event.__class__ is ScalarEvent and value_event.style in (
                "|",
                ">",
            )
        self._depth -= 1
        return mapping


class _PyParser(Reader, Scanner, Parser):
    """PyYAML's own scanner and parser, for when libyaml is missing (and for tests)."""

    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)


if yaml.__with_libyaml__:
    # libyaml scans and parses (about 8x faster); its events are the same classes.
    from yaml._yaml import CParser

    _FastParser: type[CParser | _PyParser] = CParser
else:  # pragma: no cover - PyYAML built without libyaml
    _FastParser = _PyParser


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
    parser = (_PyParser if pure_python else _FastParser)(text)
    composer = _Composer(parser.get_event, what)
    result = YamlDocuments()
    try:
        composer.documents(result.documents)
    finally:
        parser.dispose()
    result.problems.extend(composer.problems)
    return result


def error_line(error: yaml.YAMLError) -> int:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return mark.line + 1 if mark is not None else 1
