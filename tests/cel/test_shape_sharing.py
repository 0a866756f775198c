"""Shared compilation of a shape: a text whose tokens match a known template is compiled from
the shape's compiled literal-free subtrees plus its own literals, and must come out exactly as a
from-scratch compile (lark's own parse, nothing shared): the same error (message, line,
column), the same variables, the same value or evaluation error on every activation.

The from-scratch side replaces ``compiler._parse`` with lark's parse, which switches every kind
of sharing off (see ``compile_expression``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from policy_engine.cel import (
    CelCompileError,
    CelEvaluationError,
    CompileLimits,
    Declarations,
    compile_expression,
    compiler,
)
from policy_engine.engine.activation import CEL_DECLARATIONS
from tests.cel.support import ACTIVATION, DECLARATIONS


@pytest.fixture(autouse=True)
def fresh_templates() -> Iterator[None]:
    compiler._TEMPLATES.clear()
    yield
    compiler._TEMPLATES.clear()


@contextmanager
def from_scratch() -> Iterator[None]:
    """compile_expression with lark's own parse of every text and nothing shared."""
    with mock.patch.object(compiler, "_parse", compiler._full_parse):
        yield


def outcome(text: str, declarations: Declarations = DECLARATIONS) -> Any:
    try:
        return compile_expression(text, declarations)
    except CelCompileError as exc:
        return ("error", exc.message, exc.line, exc.column)


def evaluate(compiled: Any, activation: dict[str, Any]) -> tuple[str, str]:
    try:
        value = compiled.evaluate(activation)
    except CelEvaluationError as exc:
        return ("error", exc.message)
    return ("value", repr(value))  # repr: NaN == NaN, 1 != True, 1.0 != 1


ACTIVATIONS: list[dict[str, Any]] = [
    ACTIVATION,
    {**ACTIVATION, "i": 0, "j": 2**63 - 1, "s": "a+b", "l": [], "m": {}, "f": math.nan},
    {**ACTIVATION, "i": -1, "s": "", "ip": "192.168.0.1", "l": [7, "x", 2.5], "b": False},
]


def assert_same(shared: Any, scratch: Any, text: str) -> None:
    if isinstance(scratch, tuple) or isinstance(shared, tuple):
        assert shared == scratch, text
        return
    assert shared.variables == scratch.variables, text
    for activation in ACTIVATIONS:
        assert evaluate(shared, activation) == evaluate(scratch, activation), (text, activation)


# --------------------------------------------------------------------------------------------
# Random literals in shapes that exercise every compile-time use of a literal's value


def _quoted(body: str) -> str:
    return '"' + body.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


ints = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
    st.sampled_from(["0", "1", "2", "9223372036854775807", "9223372036854775808", "0x10"]),
    st.integers(min_value=0, max_value=2**65).map(hex),
)
uints = st.one_of(
    st.integers(min_value=0, max_value=2**65).map(lambda n: f"{n}u"),
    st.sampled_from(["0u", "18446744073709551615u", "18446744073709551616u"]),
)
floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr).filter(lambda t: "e" not in t),
    st.sampled_from(["0.0", "1.5", "1e3", "2.5e-3", ".5"]),
)
strings = st.one_of(
    st.text(max_size=6).map(_quoted),
    # escapes, valid and not: a bad one is a compile error at the literal
    st.sampled_from(
        [r'"\u00e9"', r'"\q"', r'"\ud800"', r'"\x4"', r'"\101"', r"'single'", r'r"\d+"']
    ),
    st.sampled_from(['"""tri\nple"""', "'''a'''"]),
)
regexes = st.sampled_from(['"a+"', '"("', '"[a-z]+"', '"a{2,1}"', '"^x$"', r'"\\d"'])
cidrs = st.sampled_from(['"10.0.0.0/8"', '"10.0.0.0/33"', '"::1/128"', '"nope"'])
zones = st.sampled_from(['"UTC"', '"Europe/Berlin"', '"Mars/Base"', '"+02:00"'])
hhmms = st.sampled_from(['"09:00"', '"25:00"', '"9"', '"22:30"'])
byteses = st.sampled_from(['b"ab"', r'b"\xff"', r'b"\u00e9"', "b''"])

# Each shape: a format string and one strategy per hole.
SHAPES: list[tuple[str, tuple[st.SearchStrategy[str], ...]]] = [
    ("i == {} && s != {}", (ints, strings)),
    ("{} + {} == i", (ints, ints)),  # folded; an overflow is left to run time
    ("{} / {} > j || b", (ints, ints)),  # a division by zero is not folded
    ("{} < {} ? s : {}", (ints, ints, strings)),  # a constant condition picks a branch
    ("{} == {} && b", (ints, ints)),  # a constant operand decides or drops out
    ("s in [{}, {}, {}]", (strings, strings, strings)),  # a frozenset of strings
    ("i in [{}, {}]", (ints, ints)),  # a frozenset of ints
    ("i in [{}, {}]", (ints, strings)),  # mixed: the general path
    ("s.matches({}) && i > {}", (regexes, ints)),  # a regex prepared at compile time
    ("ip.inCidr({}) || s == {}", (cidrs, strings)),
    ("now.getHours({}) >= {}", (zones, ints)),
    ("now.betweenHours({}, {}, {})", (hhmms, hhmms, zones)),
    ("l.exists(x, x == {}) && m.a != {}", (ints, floats)),
    ('{{"k": {}, {}: 2}}.k == i', (ints, strings)),  # a folded map, duplicate keys or not
    ("[{}, {}][i % 2] == {}", (ints, ints, uints)),
    ("f * {} < {} && size({}) > 0", (floats, floats, byteses)),
    ("-{} == j && !({} == s)", (ints, strings)),
    ("l.map(x, x + {}).filter(y, y > {}) == l", (ints, ints)),
    ('s.startsWithAny([{}, "x"]) || subject.name == {}', (strings, strings)),
    ("subject.attributes.groups.all(g, g != {}) && has(subject.name)", (strings,)),
]


def texts(
    pattern: str, holes: tuple[st.SearchStrategy[str], ...]
) -> st.SearchStrategy[tuple[str, str]]:
    one = st.tuples(*holes).map(lambda literals: pattern.format(*literals))
    return st.tuples(one, one)


@st.composite
def shape_texts(draw: Callable[..., Any]) -> tuple[str, str]:
    pattern, holes = draw(st.sampled_from(SHAPES))
    pair: tuple[str, str] = draw(texts(pattern, holes))
    return pair


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pair=shape_texts())
def test_a_text_compiled_through_its_shape_is_compiled_as_from_scratch(
    pair: tuple[str, str],
) -> None:
    compiler._TEMPLATES.clear()
    first, second = pair
    assert_same(outcome(first), _scratch(first), first)  # records the template and shape
    template = compiler._TEMPLATES.get(compiler._skeleton(second))
    shared = (
        template is not None
        and template.shape(DECLARATIONS, CompileLimits()) is not None
        and template._lex(second) is not None
    )
    event(f"shared: {shared}")
    with mock.patch.object(
        compiler._Template, "rebuild", autospec=True, side_effect=compiler._Template.rebuild
    ) as rebuild:
        got = outcome(second)
    if shared:
        assert rebuild.call_count == 0, "a known shape builds no full tree"
    assert_same(got, _scratch(second), second)


def _scratch(text: str) -> Any:
    with from_scratch():
        return outcome(text)


# --------------------------------------------------------------------------------------------
# What is shared, and when it is not


def functions_in(fn: Callable[..., Any]) -> set[int]:
    """The ids of the functions built at compile time (nested ones, not module-level ones)
    reachable from ``fn`` through what they close over or bind as default arguments."""
    seen: set[int] = set()
    pending: list[Any] = [fn]
    while pending:
        item = pending.pop()
        if not callable(item) or "<locals>" not in getattr(item, "__qualname__", ""):
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        bound = [cell.cell_contents for cell in item.__closure__ or ()]
        bound.extend(item.__defaults__ or ())
        for value in bound:
            pending.extend(value if isinstance(value, tuple) else (value,))
    return seen


def test_texts_of_one_shape_share_the_closures_of_their_literal_free_parts() -> None:
    texts = [
        f'"team-{g}" in subject.attributes.groups && scope.startsWith("r{g}")' for g in range(3)
    ]
    compiled = [compile_expression(text, CEL_DECLARATIONS) for text in texts]
    first, second, third = (functions_in(c._evaluator) for c in compiled)
    # subject.attributes.groups and scope are compiled once for the shape
    assert len(first & second & third) >= 3
    request = {
        "subject": {"id": "u", "kind": "user", "attributes": {"groups": ["team-1"]}},
        "scope": "r1x",
        "integration": {"id": "github"},
    }
    assert [c.evaluate(request) for c in compiled] == [False, True, False]


def test_a_shape_is_compiled_once_per_environment() -> None:
    narrow = Declarations({"s": None})
    for declarations in (narrow, DECLARATIONS):
        assert not isinstance(outcome('s == "a"', declarations), tuple)
    template = compiler._TEMPLATES[compiler._skeleton('s == "a"')]
    assert template is not None
    assert template.shape(narrow, CompileLimits()) is not None
    assert template.shape(DECLARATIONS, CompileLimits()) is not None
    # an environment that refuses the shape's names: an error, from scratch or not
    other = Declarations({"t": None})
    assert outcome('s == "b"', other) == _scratch_in('s == "b"', other)
    assert outcome('s == "b"', other)[1] == "unknown variable 's'"
    # limits are part of the environment: a tighter node limit fails the same way
    tight = CompileLimits(max_ast_nodes=2)
    with pytest.raises(CelCompileError) as shared_error:
        compile_expression('s == "c"', DECLARATIONS, tight)
    with from_scratch(), pytest.raises(CelCompileError) as scratch_error:
        compile_expression('s == "c"', DECLARATIONS, tight)
    assert str(shared_error.value) == str(scratch_error.value)


def _scratch_in(text: str, declarations: Declarations) -> Any:
    with from_scratch():
        return outcome(text, declarations)


def test_a_literal_error_in_the_first_text_of_a_shape_leaves_the_next_text_correct() -> None:
    bad, good = 's.matches("(") && i > 1', 's.matches("a+") && i > 2'
    assert outcome(bad) == _scratch(bad)
    assert isinstance(outcome(bad), tuple)
    assert_same(outcome(good), _scratch(good), good)
    assert_same(outcome(bad.replace("1", "3")), _scratch(bad.replace("1", "3")), bad)


def test_every_cel_test_expression_compiles_through_its_shape_as_from_scratch() -> None:
    from tests.cel.test_parse_sharing import TEST_EXPRESSIONS, swapped_variants

    shared = 0
    for text in TEST_EXPRESSIONS:
        for variant in swapped_variants(text):
            compiler._TEMPLATES.clear()
            outcome(text)  # records the template, and the shape if it compiles
            template = compiler._TEMPLATES.get(compiler._skeleton(variant))
            fits = (
                template is not None
                and template.shape(DECLARATIONS, CompileLimits()) is not None
                and template._lex(variant) is not None
            )
            with mock.patch.object(
                compiler._Template,
                "rebuild",
                autospec=True,
                side_effect=compiler._Template.rebuild,
            ) as rebuild:
                got = outcome(variant)
            if fits:
                shared += 1
                assert rebuild.call_count == 0, variant
            assert_same(got, _scratch(variant), variant)
    assert shared > 200, shared
