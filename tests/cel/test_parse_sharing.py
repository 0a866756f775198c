"""Shared parses (compiler.py, "Sharing parses") give exactly what a full lark parse gives.

A text parsed through another text's template must get the same tree (every token's type,
value and position, every meta), compile to the same behaviour, and fail with the same
CelCompileError as when it is parsed on its own.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lark import Lark, Token, Tree
from lark.lark import PostLex

from policy_engine.bench.scale_sets import (
    DISTINCT_ALLOW,
    DISTINCT_DENY,
    TEMPLATED_ALLOW,
    TEMPLATED_DENY,
)
from policy_engine.cel import (
    CelCompileError,
    CelEvaluationError,
    Declarations,
    compile_expression,
    compiler,
)
from policy_engine.engine.activation import CEL_DECLARATIONS
from tests.cel.support import ACTIVATION, DECLARATIONS

# --------------------------------------------------------------------------------------------
# Observing both paths


def facts(tree: Tree) -> list[tuple[Any, ...]]:
    """Everything about a lark tree, in document order: rules with their metas, tokens with
    every position (lark's own Tree equality ignores positions and metas)."""
    out: list[tuple[Any, ...]] = []
    stack: list[Tree | Token] = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, Token):
            out.append(("token", *token_facts(item)))
            continue
        out.append(("tree", item.data, len(item.children), sorted(vars(item.meta).items())))
        stack.extend(reversed(item.children))
    return out


def full_parse(text: str) -> tuple[Any, ...]:
    """lark's own parse: the tree's facts, or the error it makes."""
    try:
        return ("tree", facts(compiler._full_parse(text)))
    except CelCompileError as exc:
        return ("error", exc.message, exc.line, exc.column)


def compile_outcome(
    text: str, declarations: Declarations = DECLARATIONS
) -> tuple[Any, ...] | compiler.CompiledExpression:
    try:
        return compile_expression(text, declarations)
    except CelCompileError as exc:
        return ("error", exc.message, exc.line, exc.column)


@contextmanager
def full_parsing() -> Iterator[None]:
    """compile_expression as it was before parses were shared."""
    with mock.patch.object(compiler, "_parse", compiler._full_parse):
        yield


def evaluate(compiled: Any, activation: dict[str, Any]) -> tuple[str, Any]:
    try:
        value = compiled.evaluate(activation)
    except CelEvaluationError as exc:
        return ("error", exc.message)
    return ("value", repr(value))  # repr: NaN == NaN, 1 != True, 1.0 != 1


def assert_same_compilation(
    text: str, activations: list[dict[str, Any]], declarations: Declarations = DECLARATIONS
) -> None:
    """compile_expression with shared parsing behaves as with full parses on `activations`."""
    shared = compile_outcome(text, declarations)
    with full_parsing():
        full = compile_outcome(text, declarations)
    if isinstance(full, tuple) or isinstance(shared, tuple):
        assert shared == full
        return
    assert shared.variables == full.variables
    for activation in activations:
        assert evaluate(shared, activation) == evaluate(full, activation), activation


@pytest.fixture(autouse=True)
def fresh_templates() -> Iterator[None]:
    compiler._TEMPLATES.clear()
    yield
    compiler._TEMPLATES.clear()


class FedTokens(PostLex):
    """A second Lark instance, built like compiler._parser() plus this post-lexer, which
    records every token lark's lexer hands its parser: an oracle for what a parse consumes
    that does not go through the compiler's recording (operators never reach the tree)."""

    always_accept = ()

    def __init__(self) -> None:
        self.tokens: list[Token] = []
        self.parser = Lark(
            compiler._grammar(),
            parser="lalr",
            start="expr",
            g_regex_flags=re.M,
            lexer_callbacks={"IDENT": compiler._bool_literal},
            propagate_positions=True,
            maybe_placeholders=False,
            priority="invert",
            postlex=self,
        )

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        for token in stream:  # lazily: the contextual lexer still reads the parser's state
            self.tokens.append(token)
            yield token

    def __call__(self, text: str) -> list[tuple[Any, ...]]:
        """The tokens a parse of `text` feeds the parser, with every position; raises
        lark's error for a text that does not parse."""
        self.tokens = []
        tree = self.parser.parse(text)
        assert facts(tree) == facts(compiler._full_parse(text)), "built like _parser()"
        return [token_facts(t) for t in self.tokens]


FED_TOKENS = FedTokens()


# Everything a token carries into the tree: value and every position field.
token_facts = compiler._token_facts


def token_key(text: str) -> list[tuple[str, str | None]]:
    """The tokens lark's parse of `text` feeds its parser: type, and value unless a literal."""
    return [
        (fact[0], None if fact[0] in compiler._LITERAL_TERMINALS else fact[1])
        for fact in FED_TOKENS(text)
    ]


def template_of(text: str) -> compiler._Template | None:
    """The template a first parse of `text` records (None: refused or a syntax error)."""
    recorded = compiler._recording_parse(text)
    if recorded is None:
        return None
    tree, tokens, states = recorded
    assert facts(tree) == full_parse(text)[1], "the recording parse is lark's parse"
    assert [token_facts(t) for t in tokens] == FED_TOKENS(text), "and is fed its tokens"
    return compiler._Template.build(text, tree, tokens, states)


# --------------------------------------------------------------------------------------------
# Generated conditions: shapes with random literals and whitespace


def _escape_char(char: str, quote: str, style: int) -> str:
    if char == "\\":
        return "\\\\"
    if char == quote:
        return "\\" + quote
    if char == "\n":
        return "\\n"
    if char == "\r":
        return "\\r"
    if style == 1 and ord(char) < 0x100:
        return f"\\x{ord(char):02x}"
    if style == 2 and ord(char) < 0x10000:
        return f"\\u{ord(char):04x}"
    if style == 3:
        return f"\\U{ord(char):08x}"
    if style == 4 and ord(char) < 0o400:
        return f"\\{ord(char):03o}"
    return char


@st.composite
def string_literals(draw: st.DrawFn, form: str) -> str:
    """A CEL string (or bytes) literal of `form`, holding random text with escapes, unicode
    and both quote characters; sometimes with an escape CEL rejects."""
    text = draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=12))
    prefix = "b" if form.startswith("b") else ""
    if prefix and not draw(st.booleans()):
        text = text.encode("utf-8", "replace").decode("latin-1")  # bytes in \\x range
    body_form = form.removeprefix("b")
    if body_form in ("raw1", "raw2"):
        quote = '"' if body_form == "raw1" else "'"
        body = "".join(c for c in text if c not in (quote, "\\", "\n", "\r"))
        return f"{prefix}r{quote}{body}{quote}"
    if body_form in ("triple1", "triple2"):
        quote = '"' if body_form == "triple1" else "'"
        body = text.replace("\\", "\\\\").replace(quote, "\\" + quote)
        return f"{prefix}{quote * 3}{body}{quote * 3}"  # raw newlines allowed here
    quote = '"' if body_form == "double" else "'"
    styles = draw(st.lists(st.integers(0, 4), min_size=len(text), max_size=len(text)))
    body = "".join(_escape_char(c, quote, s) for c, s in zip(text, styles, strict=True))
    if draw(st.integers(0, 15)) == 0:
        body += draw(st.sampled_from(["\\q", "\\x4", "\\u12", "\\999"]))  # invalid escapes
    return f"{prefix}{quote}{body}{quote}"


STRING_FORMS = ("double", "single", "raw1", "raw2", "triple1", "triple2")
BYTES_FORMS = tuple("b" + form for form in STRING_FORMS)


@st.composite
def int_literals(draw: st.DrawFn, form: str) -> str:
    sign = "-" if draw(st.booleans()) else ""
    value = draw(st.one_of(st.integers(0, 1000), st.integers(0, 2**70)))
    digits = f"0x{value:x}" if form.endswith("hex") else str(value)
    if form.startswith("uint"):
        return digits + draw(st.sampled_from("uU"))
    return sign + digits


@st.composite
def float_literals(draw: st.DrawFn, form: str) -> str:
    sign = "-" if draw(st.booleans()) else ""
    whole = str(draw(st.integers(0, 10**6)))
    fraction = str(draw(st.integers(0, 10**6)))
    exponent = (
        draw(st.sampled_from("eE"))
        + draw(st.sampled_from(["", "+", "-"]))
        + str(draw(st.integers(0, 400)))
    )
    if form == "dotted":
        return f"{sign}{whole}.{fraction}"
    if form == "trailing":
        return f"{sign}{whole}."
    if form == "leading":
        return f"{sign}.{fraction}"
    if form == "exponent":
        return f"{sign}{whole}{exponent}"
    return f"{sign}{whole}.{fraction}{exponent}"


# Slot kinds: the literal strategy for a form; seed and target of one example use one form.
KINDS: dict[str, tuple[Callable[[str], st.SearchStrategy[str]], tuple[str, ...]]] = {
    "s": (string_literals, STRING_FORMS),
    "b": (string_literals, BYTES_FORMS),
    "i": (int_literals, ("int", "inthex")),
    "u": (int_literals, ("uint", "uinthex")),
    "f": (float_literals, ("dotted", "trailing", "leading", "exponent", "full")),
    # Not a literal: an identifier or keyword, so seed and target may differ in token values
    # (i, j) or types (true, null); those must never share.
    "v": (lambda form: st.sampled_from(["i", "j", "true", "false", "null"]), ("any",)),
}

# {kind} is a literal slot, {_} whitespace (spaces, tabs, newlines, or a comment line).
SHAPES = (
    "{s}{_}in subject.attributes.groups{_}&&{_}scope.startsWith({s})",
    "subject.attributes.groups.exists(x,{_}x == {s}){_}&& scope != {s}",
    "has(subject.attributes.groups) && {s} in subject.attributes.groups && size(scope) < {i}",
    "({s} in subject.attributes.groups || subject.id == {s}) && scope.startsWithAny([{s}, {s}])",
    "!({s}{_}in subject.attributes.groups)",
    "{i}-{i} < {v} && i-{i} != {i}",
    "-{i} * {i} + {v} % {i} == j",
    "{u} + {u} > {u} || {f}{_}*{_}f >= {f}",
    "[{i}, {u}, {f}, {s}, {b}].exists(x, x == i) ? {s} : {b}",
    "{{{s}: {i}, {s}: {f}}}[s] == {i}",
    "m[{s}] == {i} && l[{i}] == {i}",
    "{b} == bytes(s) || size({b}) == {i}",
    "s.matches({s}) && {s}.contains(s)",
    "{_}s + {s} == {s}{_}",
    "{s}.size() + {f} > {i}",
    "s in [{s}, {s}, {s}] && i in [{i}, {i}] && f in [{f}]",
    "i == {i} && f == {f} && s == {s} && b == {v} && n == null",
    "{i} / {i} + {u} % {u} < {u}",
)
SLOT = re.compile(r"\{([sbiufv_])\}|\{\{|\}\}")


def whitespace() -> st.SearchStrategy[str]:
    pieces = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", " // a \"comment\" 'x' 1.5\n"])
    return st.lists(pieces, max_size=3).map("".join)


@st.composite
def filled(draw: st.DrawFn, shape: str, forms: dict[int, str]) -> str:
    """`shape` with each slot filled (slot n of kind k gets a literal of forms[n])."""
    out: list[str] = []
    position = 0
    for number, match in enumerate(SLOT.finditer(shape)):
        out.append(shape[position : match.start()])
        position = match.end()
        token = match.group()
        if token in ("{{", "}}"):
            out.append(token[0])
        elif token == "{_}":
            out.append(draw(whitespace()))
        else:
            strategy, _ = KINDS[match.group(1)]
            out.append(draw(strategy(forms[number])))
    out.append(shape[position:])
    return "".join(out)


@st.composite
def shape_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """Two texts of one shape, with the same literal form in each slot."""
    shape = draw(st.sampled_from(SHAPES))
    forms = {
        number: draw(st.sampled_from(KINDS[match.group(1)][1]))
        for number, match in enumerate(SLOT.finditer(shape))
        if match.group(1) in KINDS
    }
    return draw(filled(shape, forms)), draw(filled(shape, forms))


def activations() -> st.SearchStrategy[dict[str, Any]]:
    """Request activations around the support one, with values the literals may hit."""
    strings = st.one_of(st.text(max_size=6), st.sampled_from(["", "a", "team-1", "x\ny"]))
    return st.fixed_dictionaries(
        {
            "i": st.integers(-5, 5),
            "j": st.integers(-30, 30),
            "f": st.floats(allow_nan=True),
            "s": strings,
            "scope": strings,
            "l": st.lists(st.integers(-3, 3), max_size=4),
            "m": st.dictionaries(strings, st.integers(-3, 3), max_size=3),
            "groups": st.lists(strings, max_size=3),
        }
    ).map(
        lambda d: {
            **ACTIVATION,
            **{k: v for k, v in d.items() if k != "groups"},
            "subject": {**ACTIVATION["subject"], "attributes": {"groups": d["groups"]}},
        }
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=shape_pairs(), data=st.data())
def test_a_text_parsed_through_another_texts_template_is_parsed_as_lark_parses_it(
    pair: tuple[str, str], data: st.DataObject
) -> None:
    seed, target = pair
    template = template_of(seed)
    expected = full_parse(target)
    if template is None:
        # Only a seed lark cannot parse has no template (every cel.lark tree is shareable).
        assert full_parse(seed)[0] == "error"
        event("seed does not parse")
        return
    rebuilt = template.rebuild(target)
    # Shared exactly when lark feeds the parser the seed's token types (and non-literal
    # values): "-{i}" is one INT_LIT for "-3" but MINUS INT_LIT for "--3".
    fits = expected[0] == "tree" and token_key(target) == token_key(seed)
    assert (rebuilt is not None) == fits, (seed, target)
    if rebuilt is not None:
        assert ("tree", facts(rebuilt)) == expected
    event("shared" if fits else "refused")

    # Through compile_expression: the seed stores the template, the target uses it.
    compiler._TEMPLATES.clear()
    compile_outcome(seed)
    activations_drawn = data.draw(st.lists(activations(), min_size=1, max_size=4))
    assert_same_compilation(target, activations_drawn)


JUNK = "\"'\\`rbu0x1.e-+ \n()[]{}:,?!&|<>=abc"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from(SHAPES),
    junk=st.lists(
        st.text(alphabet="\"'\\`rbu0x1.e-+ \n()[]{}:,?!&|<>=abc", max_size=5), max_size=6
    ),
)
def test_a_broken_text_of_a_known_shape_fails_as_lark_makes_it_fail(
    shape: str, junk: list[str]
) -> None:
    """Literal slots filled with junk: whatever lark makes of it (a tree or an error, with
    its message, line and column) the shared path makes of it too."""
    # A fixed, valid seed of the shape: every slot gets a plain literal of its kind.
    plain = {"s": '"a"', "b": 'b"a"', "i": "1", "u": "1u", "f": "1.5", "v": "i", "_": " "}
    seed = SLOT.sub(lambda m: plain.get(m.group(1) or "", m.group()[0]), shape)
    target = SLOT.sub(lambda m: (junk.pop() if junk else "") if m.group(1) else m.group()[0], shape)
    template = template_of(seed)
    assert template is not None, seed
    rebuilt = template.rebuild(target)
    expected = full_parse(target)
    if rebuilt is not None:
        assert ("tree", facts(rebuilt)) == expected
    compiler._TEMPLATES.clear()
    compile_outcome(seed)
    assert_same_compilation(target, [ACTIVATION])


# --------------------------------------------------------------------------------------------
# Every CEL expression of the CEL tests, and literal-swapped variants of it


def cel_test_expressions() -> list[str]:
    """Every string constant in tests/cel (most are CEL expressions; the rest must simply
    fail the same way both ways)."""
    found: set[str] = set()
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            is_string = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_string and 0 < len(node.value) <= 600:
                found.add(node.value)
    return sorted(found)


TEST_EXPRESSIONS = cel_test_expressions()
SWAPS = {
    "STRING_LIT": ['"swapped"', "'it''s'", 'r"\\d+"', '"\\u00e9\\n"', '""'],
    "MLSTRING_LIT": ['"""two\nlines"""', "'''x'''"],
    "BYTES_LIT": ['b"\\xff"', "b''", 'b"""by\ntes"""'],
    "INT_LIT": ["0", "-7", "0x1F", "123456789012"],
    "UINT_LIT": ["0u", "0x10U", "42u"],
    "FLOAT_LIT": ["0.5", "-1e3", ".25", "7.", "1.5E-2"],
}


def swapped_variants(text: str) -> list[str]:
    """`text` with every literal replaced by another of its type (a few ways)."""
    try:
        tokens = [t for t in facts(compiler._full_parse(text)) if t[0] == "token"]
    except CelCompileError:
        return []
    literals = sorted(
        {(t[3], t[8], t[1]) for t in tokens if t[1] in SWAPS}, reverse=True
    )  # by position, from the end, so earlier offsets stay valid
    if not literals:
        return []
    variants = []
    for choice in range(2):
        out = text
        for number, (start, end, kind) in enumerate(literals):
            options = SWAPS[kind]
            out = out[:start] + options[(number + choice) % len(options)] + out[end:]
        variants.append(out)
    return variants


def test_the_cel_test_suite_supplies_expressions() -> None:
    assert len(TEST_EXPRESSIONS) > 500
    assert sum(1 for t in TEST_EXPRESSIONS if swapped_variants(t)) > 200


def test_every_cel_test_expression_parses_and_compiles_the_same_through_a_template() -> None:
    templated = shared = 0
    for text in TEST_EXPRESSIONS:
        expected = full_parse(text)
        template = template_of(text)
        if expected[0] == "error":
            assert template is None, text
        else:
            assert template is not None, text  # every tree cel.lark makes is shareable
            templated += 1
            assert ("tree", facts(template.rebuild(text))) == expected, text
        for variant in swapped_variants(text):
            rebuilt = template.rebuild(variant) if template is not None else None
            if rebuilt is not None:
                shared += 1
                assert ("tree", facts(rebuilt)) == full_parse(variant), variant
            compiler._TEMPLATES.clear()
            compile_outcome(text)  # the template for the variant to use
            assert_same_compilation(variant, [ACTIVATION])
        compiler._TEMPLATES.clear()
        assert_same_compilation(text, [ACTIVATION])
    assert templated > 400 and shared > 300, (templated, shared)


# --------------------------------------------------------------------------------------------
# What is shared, and when it is not


def scale_conditions() -> list[str]:
    texts = list(TEMPLATED_ALLOW + TEMPLATED_DENY)
    for g in range(40):
        texts.append(DISTINCT_ALLOW[g % len(DISTINCT_ALLOW)].format(g=g, limit=100 + g))
        texts.append(DISTINCT_DENY[g % len(DISTINCT_DENY)].format(g=g))
    return texts


def test_the_scale_benchmarks_distinct_conditions_are_parsed_once_per_shape() -> None:
    texts = scale_conditions()
    with (
        mock.patch.object(
            compiler, "_recording_parse", wraps=compiler._recording_parse
        ) as recording,
        mock.patch.object(compiler, "_full_parse", wraps=compiler._full_parse) as full,
    ):
        for text in texts:
            compile_expression(text, CEL_DECLARATIONS)
    # Seven distinct shapes; three templated texts have one of them, two have shapes of their own.
    assert recording.call_count == len(DISTINCT_ALLOW) + len(DISTINCT_DENY) + 2
    assert full.call_count == 0
    request = {
        "subject": {"id": "u", "kind": "user", "attributes": {"groups": ["team-3"]}},
        "scope": "repo",
        "integration": {"id": "github"},
    }
    for text in texts:
        assert_same_compilation(text, [request], CEL_DECLARATIONS)


def test_a_text_whose_tokens_differ_from_the_template_is_parsed_in_full() -> None:
    compile_expression('s == "a"', DECLARATIONS)
    template = next(iter(compiler._TEMPLATES.values()))
    assert template is not None
    # Same skeleton, other identifier / operator / literal type / token count: refused.
    for other in ('i == "a"', 's != "a"', "s == 1", 's == "a" "b"', 's == "a" && b', 's =="'):
        assert template.rebuild(other) is None, other
        assert_same_compilation(other, [ACTIVATION])
    # Whitespace and comments are not tokens: they move positions only.
    commented = 's // the subject\n  ==\t"b" // c'
    assert ("tree", facts(template.rebuild(commented))) == full_parse(commented)
    # 1-2 lexes as INT MINUS INT here, as lark's contextual lexer does (a basic lexer would
    # see INT INT): the template of "1 - 2" fits it.
    compiler._TEMPLATES.clear()
    one_minus_two = template_of("1 - 2")
    assert one_minus_two is not None
    assert ("tree", facts(one_minus_two.rebuild("1-2"))) == full_parse("1-2")


def test_syntax_and_compile_errors_are_the_full_parses_on_the_shared_path() -> None:
    compile_expression('s.matches("a+") && i < 3', DECLARATIONS)
    for broken in (
        's.matches("(") && i < 3',  # invalid regex: a compile error at the literal
        's.matches("a\\q") && i < 3',  # invalid escape
        's.matches("a") && i < 99999999999999999999',  # int out of range
        's.matches("a") && i < ',  # unexpected end
        's.matches("a) && i < 3',  # unterminated string
    ):
        shared = compile_outcome(broken)
        with full_parsing():
            full = compile_outcome(broken)
        assert isinstance(full, tuple) and full[0] == "error", broken
        assert shared == full, broken


def test_positions_in_errors_come_from_the_new_text() -> None:
    compile_expression('"""a""" in subject.attributes.groups && s.matches("x")', DECLARATIONS)
    text = '"""multi\nline""" in subject.attributes.groups\n  && s.matches("(")'
    shared = compile_outcome(text)
    with full_parsing():
        full = compile_outcome(text)
    assert shared == full
    assert isinstance(shared, tuple) and shared[2] == 3  # the regex is on line 3


def test_remembered_shapes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiler, "_MAX_TEMPLATES", 4)
    names = ["i", "j", "f", "s", "b", "n", "l", "m"]
    for name in names:
        compile_expression(f"{name} == 1", DECLARATIONS)
    assert len(compiler._TEMPLATES) == 4
    assert set(compiler._TEMPLATES) == {f"{name} == \x01" for name in names[-4:]}
