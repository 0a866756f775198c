"""The strict YAML reader builds values straight from parser events: it must accept, refuse,
type, position and report exactly as the reader it replaced, which composed PyYAML nodes with
PyYAML's own Composer and checked them. That reader is kept here as the reference; random
documents (valid ones, broken ones, anchors, aliases, tags, merge keys, duplicates, deep
nesting, complex keys) go through both, with libyaml and with PyYAML's own parser."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yaml._yaml import CParser
from yaml.composer import Composer
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from policy_engine.policy import yamlpos
from policy_engine.policy.yamlpos import (
    MAX_DEPTH,
    PositionedDict,
    StrictYamlError,
    YamlProblem,
    ambiguity,
    load_documents,
)

# -- the reference: the node-composing reader this module replaced ----------------------------


class _ReferenceComposer(Composer, BaseResolver):
    problems: list[YamlProblem]

    def _start(self, what: str) -> None:
        Composer.__init__(self)
        BaseResolver.__init__(self)
        self.problems = []
        self._depth = 0
        self._what = what

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise StrictYamlError(
                None, None, f"aliases (*{event.anchor}) are not allowed in {self._what}",
                event.start_mark,
            )  # fmt: skip
        if event.anchor is not None:
            raise StrictYamlError(
                None, None, f"anchors (&{event.anchor}) are not allowed in {self._what}",
                event.start_mark,
            )  # fmt: skip
        if event.tag is not None:
            raise StrictYamlError(
                None, None,
                f"tags ({event.tag}) are not allowed in {self._what}: write text in quotes instead",
                event.start_mark,
            )  # fmt: skip
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

    def construct(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return [self.construct(child) for child in node.value]
        return self._mapping(node)  # type: ignore[arg-type]

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        text: str = node.value
        if node.style:
            return text
        if text in ("true", "false"):
            return text == "true"
        if text in ("", "~", "null"):
            return None
        if yamlpos._CANONICAL_INT.fullmatch(text):
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
        mapping.key_lines, mapping.value_lines, mapping.block_scalar = {}, {}, {}
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
                continue
            mapping[key] = value
            mapping.key_lines[str(key)] = line
            mapping.value_lines[str(key)] = value_node.start_mark.line + 1
            mapping.block_scalar[str(key)] = getattr(value_node, "style", None) in ("|", ">")
        return mapping


class _ReferencePy(_ReferenceComposer, Reader, Scanner, Parser):
    def __init__(self, text: str, what: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        self._start(what)


class _ReferenceC(_ReferenceComposer, CParser):  # type: ignore[misc]
    def __init__(self, text: str, what: str) -> None:
        CParser.__init__(self, text)
        self._start(what)


def reference_load(text: str, *, pure_python: bool, what: str = "policy files") -> Any:
    yamlpos._refuse_ambiguous_line_breaks(text, what)
    loader = (_ReferencePy if pure_python else _ReferenceC)(text, what)
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            documents.append((loader.construct(node), node.start_mark.line + 1))
    finally:
        loader.dispose()
    return documents, loader.problems


# -- comparing ---------------------------------------------------------------------------------


def shape(value: Any) -> Any:
    """`value` with every type and position spelled out (1 and True differ, so do lines)."""
    if isinstance(value, PositionedDict):
        return (
            "mapping", value.line, value.key_lines, value.value_lines, value.block_scalar,
            [(type(k).__name__, k, shape(v)) for k, v in value.items()],
        )  # fmt: skip
    if isinstance(value, list):
        return ["list", *(shape(item) for item in value)]
    return (type(value).__name__, value)


def outcome(load: Any, text: str, pure_python: bool) -> Any:
    try:
        documents, problems = load(text, pure_python=pure_python)
    except (yaml.YAMLError, ValueError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = (mark.line, mark.column) if mark is not None else None
        return ("error", type(exc).__name__, str(exc), where)
    return ("ok", [(shape(v), line) for v, line in documents], problems)


def ours(text: str, *, pure_python: bool) -> Any:
    loaded = load_documents(text, pure_python=pure_python)
    return [(d.value, d.line) for d in loaded.documents], loaded.problems


def assert_same(text: str) -> None:
    for pure_python in (False, True):
        expected = outcome(reference_load, text, pure_python)
        assert outcome(ours, text, pure_python) == expected, (pure_python, text)


# -- random documents --------------------------------------------------------------------------

PLAIN_TEXTS = (
        "a", "b", "x y", "repo:read", "user-97", "2fa", "0", "1", "-3", "007", "0x1F", "1:30",
        "1.5", ".inf", ".NaN", "2024-01-01", "2024-1-1 10:00:00", "y", "No", "on", "OFF",
        "true", "True", "false", "null", "NULL", "~", "<<", "=", "+1", "1_000", "0b101",
        "-.5e3", "1e3", "+.inf", "é", "x # comment", "",
)  # fmt: skip
QUOTED_TEXTS = ("'a'", '"b"', "'<<'", "'1'", '"true"', "''", '"x\\ty"')
DECORATION = st.sampled_from(["", "", "", "", "&a ", "!!str ", "!t ", "! "])
KEYS = st.sampled_from(["a", "b", "a", "<<", "1", "true", "~", "'a'", '"b"', "[k]", "{k: v}", ""])


def scalar() -> st.SearchStrategy[str]:
    # The alias last: sampled_from draws (and shrinks) toward the front, and an alias stops
    # reading, so most documents must do without.
    return st.sampled_from([*PLAIN_TEXTS, *QUOTED_TEXTS, "*a"])


def render(tree: Any, indent: int) -> list[str]:
    """Block YAML lines for `tree`: ("map", [(key, value)]), ("seq", [values]), ("flow", text)
    or a scalar's text; `indent` spaces before each line."""
    pad = " " * indent
    if isinstance(tree, str):
        return [pad + tree]
    kind, items = tree
    if kind == "flow":
        return [pad + items]
    lines: list[str] = []
    for item in items:
        key, value = item if kind == "map" else ("-", item)
        head = pad + (f"{key}:" if kind == "map" else "-")
        if isinstance(value, str):
            lines.append(f"{head} {value}")
        elif value[0] == "block":
            lines.append(f"{head} {value[1]}")
            lines.append(pad + "  " + "text line")
        else:
            lines.append(head)
            lines.extend(render(value, indent + 2))
    return lines


def flow(children: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=3).map(lambda xs: ("flow", "[" + ", ".join(xs) + "]")),
        st.lists(st.tuples(KEYS, children), max_size=3).map(
            lambda kvs: ("flow", "{" + ", ".join(f"{k}: {v}" for k, v in kvs) + "}")
        ),
    )


def decorated(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(DECORATION, values).map(
        lambda dv: dv[0] + dv[1] if isinstance(dv[1], str) else dv[1]
    )


TREES = st.recursive(
    decorated(st.one_of(scalar(), st.sampled_from([("block", "|"), ("block", ">-")]))),
    lambda children: st.one_of(
        st.lists(st.tuples(KEYS, children), min_size=1, max_size=4).map(lambda kv: ("map", kv)),
        st.lists(children, min_size=1, max_size=3).map(lambda xs: ("seq", xs)),
        flow(scalar()),
    ),
    max_leaves=12,
)


@st.composite
def documents(draw: st.DrawFn) -> str:
    parts = []
    for index in range(draw(st.integers(1, 3))):
        tree = draw(TREES)
        lines = render(tree, 0) if not isinstance(tree, tuple) or tree[0] != "block" else ["x"]
        if index or draw(st.booleans()):
            lines.insert(0, "---")
        parts.extend(lines)
    text = "\n".join(parts) + "\n"
    if draw(st.integers(0, 9)) == 0:  # now and then, break it somewhere
        cut = draw(st.integers(0, len(text)))
        text = (
            text[:cut]
            + draw(st.sampled_from(["  ", "\n- ", ": ", "[", "}", "\t", "'"]))
            + text[cut:]
        )
    return text


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_random_documents_read_exactly_as_the_node_composer_read_them(text: str) -> None:
    assert_same(text)


@pytest.mark.parametrize(
    "text",
    [
        "a: &x 1\n",
        "a: *x\n",
        "&x a: 1\n",
        "? &x [a]\n: 1\n",
        "a: !!str 0123\n",
        "!t {a: b}\n",
        "<<: {layer: org}\nkind: Policy\n",
        "<<: [*x]\n",
        "a: " + "[" * (MAX_DEPTH + 8) + "]" * (MAX_DEPTH + 8) + "\n",
        "a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n",
        "a: 1\na: 2\n1: x\ntrue: y\n~: z\nnull: w\n",
        "? [a, no]\n: yes\nb: on\n",
        "{[x]: 1, a: no}\n",
        "a: |\n  t\nb: >\n  u\nc: 'q'\nd:\n  - x\n",
        "--- a\n--- b\n...\n",
        "---\n---\n",
        "",
        "# only a comment\n",
        "a: 1\n b: 2\n",
        "a: [1, 2\n",
        "a: 1\n---\nb: &x 2\n",
        "a: no\n---\nb: [\n",
        "- [a, *b]\n",
    ],
)
def test_chosen_documents_read_exactly_as_the_node_composer_read_them(text: str) -> None:
    assert_same(text)


def test_config_files_are_named_in_messages() -> None:
    with pytest.raises(StrictYamlError, match="anchors \\(&x\\) are not allowed in config files"):
        load_documents("a: &x 1\n", what="config files")
    loaded = load_documents("a: 1\n<<: {b: 2}\n", what="config files")
    assert [p.message for p in loaded.problems] == [
        "merge keys (<<) are not allowed in config files"
    ]


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789aAeEbBoOxXyYnNtTfFlLsSuU.:-+_~<=T Z", max_size=12))
def test_the_ambiguity_check_names_what_every_pattern_names(text: str) -> None:
    """The word table and first-character dispatch give what trying every pattern gave."""
    expected = None
    if not (text in ("true", "false", "", "~", "null") or yamlpos._CANONICAL_INT.fullmatch(text)):
        for what, pattern in REFERENCE_PATTERNS:
            if pattern.fullmatch(text):
                expected = what
                break
    assert ambiguity(text) == expected


# The patterns as the replaced reader tried them, in order.
REFERENCE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
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


@pytest.mark.parametrize("pure_python", [False, True])
@pytest.mark.parametrize("digits", [41, 4300, 5000, 100_000])
def test_an_overlong_integer_is_a_problem_on_its_line_not_a_crash(
    digits: int, pure_python: bool
) -> None:
    # Past sys.get_int_max_str_digits, int() raises ValueError: it once escaped as a traceback.
    loaded = load_documents("a: 1\nb: " + "7" * digits + "\n", pure_python=pure_python)
    assert [(p.line, p.ambiguous) for p in loaded.problems] == [(2, False)]
    assert f"{digits:,} digits is too long" in loaded.problems[0].message


def test_forty_digits_still_read_as_an_integer() -> None:
    assert load_documents("a: " + "9" * 40 + "\n").documents[0].value["a"] == int("9" * 40)
