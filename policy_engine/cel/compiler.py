"""Compile CEL text once into a tree of plain Python closures; evaluate it per request.

Why not use cel-python's runners: its ``InterpretedRunner`` walks the lark tree and boxes
every value in ``celtypes`` on each evaluation, and its ``CompiledRunner`` ``exec``s into
module globals of ``celpy.evaluation``, which races when requests are evaluated on a thread
pool; both are far too slow for a per-request path (figures below). We keep cel-python's
grammar (a conformant lark LALR grammar, ``celpy/cel.lark``) and only replace what happens
after parsing:

* every AST node becomes one closure ``fn(activation) -> value`` built once at compile time;
* names are resolved, functions looked up, arities checked, literals decoded and literal
  regexes/globs/CIDRs/time zones prepared at compile time (errors carry line and column);
* constant sub-expressions are folded, and ``x in ["a", "b"]`` against a literal list of
  strings or ints becomes a ``frozenset`` lookup;
* ``&&``/``||`` chains and same-precedence operator chains are flattened, so long
  conjunctions neither nest closures nor deepen the Python stack;
* comprehension variables live in a per-evaluation child frame (a small dict), so compiled
  expressions hold no mutable state and are safe to share between threads.

Measured with ``python -m policy_engine.cel.bench`` (Python 3.11, lark 1.3.1, cel-python 0.5.0,
all three in the same run on the 2-vCPU dev container; best of 5 repeats; celpy is handed an
activation already converted to ``celtypes``) for
``"engineering" in subject.attributes.groups && integration.id in ["github","linear"]
&& scope.startsWith("re")``:

================================  ==================
evaluator                          µs per evaluation
================================  ==================
this module                        1.2
celpy ``CompiledRunner``           83
celpy ``InterpretedRunner``        566
================================  ==================

Compiling that expression takes ~0.6 ms (almost all of it lark parsing); building the parser
once per process takes ~0.25 s, on first use.

Type checking
-------------
Every compiled node carries its static type (:mod:`policy_engine.cel.types`), inferred from
its children as the node is built: literals, declared variables (``Declarations.types``,
dyn when absent), field selection, and each operator's and function's overloads
(``OPERATOR_SIGNATURES``, ``Function.signatures``). With ``Declarations.checked`` a call with
no overload for the known argument types is a compile error at the call's position, as with
cel-go's checker; an operand of type dyn matches any overload, so attributes are checked
when evaluated (fail closed). A type never depends on a literal's value, only on its token
type, so the shared shapes below carry their types with their closures.

Sharing parses
--------------
Large policy sets hold thousands of conditions of a few shapes that differ only in their
literals (``"team-12" in subject.attributes.groups`` ...). The first text of a shape is parsed
by lark (through its interactive API, which runs the same lexer and parser loop as
``Lark.parse``), recording each token the parser was fed and the parser state whose
contextual lexer produced it. A later text of the same shape is only lexed, token i by the
sublexer of recorded state i, and must yield the same token types, the same values for every
token but string, bytes, int, uint and float literals, and then the end of input; its tree is
the recorded one with its own tokens put in place (values and positions) and every meta
recomputed from them. That tree is exactly what ``Lark.parse`` returns for it, because:

* lark's contextual lexer lexes each token with the sublexer of the parser's current state,
  and an LALR parser's state after tokens 0..i-1 depends only on their types. Induction on i:
  lark's own parse of the new text is in recorded state i when it lexes token i, so it gets
  the very token our lexing got (same sublexer, same text, same offset), and it meets the
  end of input where we did;
* the parser's actions depend only on (state, token type), so it shifts and reduces exactly
  as for the first text, and the tree builder (``ChildFilter`` keeps or drops a child by its
  place in the rule, ``PropagatePositions`` copies the positions of the first and last
  child) never reads a token's value: equal type sequences give equal shapes, and each meta
  attribute copies the same attribute of the token at the same index. The template records
  that index per meta group, found by the group's position, which is unique per token;
* ``lexer_callbacks`` (true/false become BOOL_LIT) run inside the sublexer, and an IDENT's
  value is part of the key; sharing is switched off if the parser has per-terminal callbacks
  (which could read values) or the lexer is not contextual.

Checks: a template is kept only if rebuilding its own text through it gives back the recorded
tree (tokens, positions and metas compared one by one); a text whose tokens differ from the
template's in any way, or anything unexpected while lexing or rebuilding, gets a full parse;
a syntax error always comes from a full parse, so errors (message, line, column) are exactly
those of ``Lark.parse``. Templates are looked up by a skeleton of the text (literal-looking
lexemes and whitespace replaced by placeholders), which only picks the candidate: the token
check above decides. At most ``_MAX_TEMPLATES`` shapes are kept, oldest dropped first.

Measured with 20,000 distinct conditions from the scale benchmark's generator (seven shapes;
same process, best of 3, CPU time on a loaded 2-vCPU box): parsing 8.9 s -> 4.0 s, compiling
(parse plus closures) 11.2 s -> 6.3 s; a cold load of the 10,000-user distinct set 23.7 s
-> 17.5 s, lark's share of its profile 53% -> 15%. What is left of a shared parse is lark's
lexing (~40%) and building the new tree.

Sharing compiled shapes
-----------------------
A shared parse still built every node of the new tree and compiled it into ~10 closures of
its own. Now the first text of a template in an environment (declarations and limits) is
compiled with the compiler recording, for every subtree without a literal token, the node it
compiled to, the AST nodes it counted and the variables it read (a ``_Shape``). A later text
of that template in that environment is only lexed (:meth:`_Template._lex`); the tree it is
compiled from holds its own tokens only on the *spine*, the nodes with a literal below them,
and the recorded text's literal-free subtrees everywhere else, which the compiler does not
walk again: it takes their recorded node, count and variables (``_Compiler.compile``). Its
result is the from-scratch compile's, because:

* a literal-free subtree of a text of the template is the recorded one but for positions
  (same rules, token types and values: the template's token check), and compiling it
  depends on nothing else but the environment and the enclosing comprehension variables
  (themselves identifiers, so the same): same closures, same counts, same variables. Its
  positions matter only for compile errors, and it raised none when recorded, in the same
  environment; whether it raises never depends on a literal elsewhere (node counts and
  nesting depths are structural);
* the spine is compiled as before, from the new tokens: literal decoding, int ranges,
  prepared regexes, CIDRs, zones and times, constant folding and the specialisations that
  depend on a literal's value all run per text, raising the same errors at the same
  positions (a spine node's meta keeps its first token's line and column: all the compiler
  reads). The spine also leaves out chains of single-child precedence rules that the
  compiler would only descend through (see :func:`_skippable`);
* closures hold no per-evaluation state (see above), so one closure serves every text.

A text that fails the token check gets a full compile; so does every text while the shape is
not recorded (a first text that fails to compile records nothing). At most
``_MAX_SHAPES_PER_TEMPLATE`` environments per template are kept. With ``_parse`` replaced
(tests compare with lark's own parse) nothing is shared.

Evaluators also bind what they use as default arguments (see "Closure builders"), and a
:class:`CompiledExpression` is slotted with an interned variable set.

Measured on the 20,000 distinct conditions (seven shapes) of the scale benchmark's
generator, pinned to one core, medians of 3 to 5 interleaved runs: a compile 212 -> 74 µs
per condition (lexing, now one loop over lark's scanners, is about half of what is left); the
cold in-process load of the 10,000-user distinct set 6.8 -> 3.7 s CPU, RSS after it 171 ->
126 MB (templated set: 1.9 -> 1.7 s, 103 -> 102 MB); evaluation 0.69 -> 0.66 µs per
condition on those shapes (bound defaults are fast locals).
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, cast

import celpy.celparser
from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedToken
from lark.lexer import ContextualLexer
from lark.tree import Meta
from lark.utils import TextSlice

from policy_engine.cel.errors import CelCompileError, CelEvaluationError
from policy_engine.cel.functions import MACRO_ARITIES, OPERATOR_SIGNATURES, Function
from policy_engine.cel.library import EXTENSION_MACRO_ARITIES, FUNCTIONS, GLOBALS, METHODS
from policy_engine.cel.literals import parse_int, parse_string, parse_uint
from policy_engine.cel.types import (
    BOOL,
    BYTES,
    DOUBLE,
    DYN,
    INT,
    NULL,
    STRING,
    TYPE,
    UINT,
    CelT,
    Signature,
    elements,
    join,
    list_of,
    map_of,
    optional_of,
    resolve,
)
from policy_engine.cel.values import (
    BINARY_OPERATORS,
    MAX_FOLDED_ALLOCATION,
    TYPES,
    Optional,
    as_cel_error,
    build_map,
    has_field,
    index,
    kind_of,
    list_contains,
    logical_not,
    negate,
    no_overload,
    optional_index,
    optional_select,
    reset_allocation,
    select_field,
)


class Evaluator(Protocol):
    """A compiled node: called with the activation, returns the node's value. A Protocol
    rather than `Callable[[Any], Any]` so that closures binding what they use as defaulted
    parameters (`lambda act, value=value: value`) are evaluators too."""

    def __call__(self, act: Any, /) -> Any: ...


@dataclass(frozen=True)
class Declarations:
    """The variables an expression may reference, and their CEL types.

    ``variables`` maps a name to the frozenset of its known field names (``subject.nme`` is
    then a compile error), or to ``None`` for a scalar or free-form map. ``types`` gives a
    variable's static type (:mod:`policy_engine.cel.types`; dyn when absent), and with
    ``checked`` (the default) an expression is type-checked as it compiles: a call or
    operator with no overload for its operands' known types is a compile error, as with
    cel-go's checker. Values of type dyn are never refused; they fail closed at evaluation.
    """

    variables: Mapping[str, frozenset[str] | None]
    #: CEL's container (a dotted namespace such as ``com.example``): a name ``y`` means
    #: ``com.example.y``, then ``com.y``, then ``y``, whichever is declared first; ``.y``
    #: means ``y`` only. Variable names may be dotted (``a.b``): the longest declared
    #: prefix of a selection ``a.b.c`` is the variable, the rest are field selections.
    container: str = ""
    types: Mapping[str, CelT] = field(default_factory=lambda: MappingProxyType({}))
    checked: bool = True

    @classmethod
    def typed(cls, types: Mapping[str, CelT], container: str = "") -> Declarations:
        """Declarations from variable types alone: a variable whose type has known fields
        (:func:`policy_engine.cel.types.record`) accepts only those fields."""
        variables = {
            name: None if t.fields is None else frozenset(f for f, _ in t.fields)
            for name, t in types.items()
        }
        return cls(variables, container, MappingProxyType(dict(types)))

    @property
    def key(self) -> tuple[Any, ...]:
        """A hashable value equal for equal declarations (they hold mappings)."""
        return (
            tuple(sorted(self.variables.items())),
            self.container,
            tuple(sorted(self.types.items())),
            self.checked,
        )


@dataclass(frozen=True)
class CompileLimits:
    """Bounds on what a policy author can make the server compile and evaluate.

    ``max_nesting_depth`` (an addition to the agreed interface, with a default) bounds how
    deeply closures nest, so evaluation needs a bounded Python stack whatever the caller's
    own stack depth is.
    """

    max_expression_length: int = 4096
    max_ast_nodes: int = 2000
    max_comprehension_nesting: int = 2
    max_nesting_depth: int = 100


@dataclass(frozen=True, eq=False, slots=True)
class CompiledExpression:
    """A compiled expression: immutable, thread-safe, evaluated any number of times.

    Slotted, and ``variables`` interned (texts of one shape read the same variables): tens of
    thousands of conditions are held at once, each costing only what it must.
    """

    source: str
    variables: frozenset[str]
    _evaluator: Evaluator = field(repr=False)
    #: The static type of the result (:mod:`policy_engine.cel.types`): dyn when unknown.
    result_type: CelT = DYN

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        """Evaluate against ``activation``; raises :class:`CelEvaluationError` and nothing else
        (also when the values it builds exceed :data:`~policy_engine.cel.values.MAX_ALLOCATION`)."""
        reset_allocation()
        try:
            return self._evaluator(activation)
        except CelEvaluationError:
            raise
        except Exception as exc:
            raise as_cel_error(exc) from exc


def compile_expression(
    source: str, declarations: Declarations, limits: CompileLimits = CompileLimits()
) -> CompiledExpression:
    """Parse and compile ``source``; raises :class:`CelCompileError` for anything unacceptable."""
    if len(source) > limits.max_expression_length:
        line, column = _offset_position(source, limits.max_expression_length)
        raise CelCompileError(
            f"expression longer than {limits.max_expression_length} characters", line, column
        )
    compiler = _Compiler(declarations, limits)
    reset_allocation(MAX_FOLDED_ALLOCATION)  # what constant folding may build and keep
    try:
        node = _compile_shared(source, compiler)
        if node is None:
            node = compiler.compile(_parse(source))
    except RecursionError:
        raise CelCompileError("expression is nested too deeply") from None
    variables = frozenset(compiler.referenced)
    if len(_VARIABLE_SETS) < _MAX_VARIABLE_SETS:
        variables = _VARIABLE_SETS.setdefault(variables, variables)
    return CompiledExpression(
        source=source, variables=variables, _evaluator=node.fn, result_type=node.ctype
    )


def require_bool(compiled: CompiledExpression) -> None:
    """Raises :class:`CelCompileError` unless ``compiled`` is of type bool or dyn (a policy
    condition: a dyn result that is no bool fails closed at evaluation)."""
    if compiled.result_type not in (BOOL, DYN):
        raise CelCompileError(
            f"a condition must be a bool, and this expression is of type '{compiled.result_type}'"
        )


# One frozenset per distinct set of variables read (a handful: subsets of the declared
# names): each condition holds a shared one. Bounded, whatever the declarations.
_VARIABLE_SETS: dict[frozenset[str], frozenset[str]] = {}
_MAX_VARIABLE_SETS = 4096


def _compile_shared(source: str, compiler: _Compiler) -> _Node | None:
    """``source`` compiled by ``compiler``: through its shape's shared compilation when one
    is recorded for ``compiler``'s environment (see "Sharing compiled shapes" in the module
    doc), else from its tree, recording the shape's compilation when the tree is one of a
    template's. None, ``compiler`` untouched, when a recorded shape does not fit the text
    (the caller compiles lark's tree). Raises :class:`CelCompileError` as compiling lark's
    tree would."""
    if _parse is not _shared_parse:  # parses are not shared (tests replace _parse): nor this
        return None
    skeleton = _skeleton(source)
    template = _TEMPLATES.get(skeleton)
    if template is not None:
        shape = template.shape(compiler.declarations, compiler.limits)
        if shape is not None:
            tokens = template._lex(source)
            if tokens is None:
                return None
            try:
                spine = shape.spine(tokens)
            except Exception:  # anything unexpected: the full path decides
                return None
            compiler.shared = shape.compiled
            return compiler.compile(spine)
    tree = _parse(source)
    template = _TEMPLATES.get(skeleton)
    items = template.aligned(tree) if template is not None else None
    if template is None or items is None:
        return compiler.compile(tree)
    holds_literal = template.holds_literal()
    compiler.recording = {
        id(item): None
        for item, literal in zip(items, holds_literal, strict=True)
        if not literal and isinstance(item, Tree)
    }
    node = compiler.compile(tree)
    # Anything unexpected while recording: this shape's texts keep being compiled in full.
    with contextlib.suppress(Exception):
        template.add_shape(_Shape.build(template, items, compiler))
    return node


# --------------------------------------------------------------------------------------------
# Parsing


def _bool_literal(token: Token) -> Token:
    """``true``/``false`` lex as IDENT in the grammar; retype them, keeping the position."""
    if token.value in ("true", "false"):
        return Token.new_borrow_pos("BOOL_LIT", token.value, token)
    return token


# cel-python 0.5's grammar rules we extend, and what replaces each: backtick-quoted field
# names (``m.`content-type```, a ``QUOTED_IDENT``) and the optional syntax of cel-go's
# optionals library (``m.?f``, ``l[?0]``, ``[?x]``, ``{?k: v}``).
_GRAMMAR_CHANGES = {
    "member         : member_dot | member_dot_arg | member_index | member_object | primary\n": (
        "member         : member_dot | member_dot_arg | member_index | member_object | primary\n"
        "               | member_dot_opt | member_index_opt\n"
        'member_dot_opt : member "." "?" (IDENT | QUOTED_IDENT)\n'
        'member_index_opt : member "[" "?" expr "]"\n'
        'opt_expr       : "?" expr\n'
        "?list_element  : expr | opt_expr\n"
    ),
    'member_dot     : member "." IDENT\n': 'member_dot     : member "." (IDENT | QUOTED_IDENT)\n',
    'list_lit       : "[" [exprlist] "]"\n': 'list_lit       : "[" [list_elements] "]"\n'
    'list_elements  : list_element ("," list_element)*\n',
    'mapinits       : expr ":" expr ("," expr ":" expr)*\n': (
        'mapinits       : list_element ":" expr ("," list_element ":" expr)*\n'
    ),
}


def _grammar() -> str:
    """cel-python's grammar (``celpy/cel.lark``) with :data:`_GRAMMAR_CHANGES`."""
    grammar = (Path(celpy.celparser.__file__).parent / "cel.lark").read_text()
    for rule, replacement in _GRAMMAR_CHANGES.items():
        if rule not in grammar:  # pragma: no cover - a cel-python upgrade changed it
            raise RuntimeError(f"cel-python's grammar changed: {rule.strip()!r} not found")
        grammar = grammar.replace(rule, replacement)
    return grammar + "\nQUOTED_IDENT   : /`[_a-zA-Z0-9.\\/ -]+`/\n"


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    """cel-python's grammar and parser options, in our own Lark instance.

    celpy's ``CELParser`` keeps a process-wide singleton whose tree class depends on which
    runner created it first; building our own instance leaves celpy's untouched.

    The LALR tables are built at every start (~0.1 s of CPU), never taken from a cache
    file: lark's ``cache=`` unpickles its file before checking it, so whoever can write that
    file or any folder on its path (a shared ``/tmp``, a ``HOME`` or ``XDG_CACHE_HOME``
    another user controls) could run code in the server.
    """
    return Lark(
        _grammar(),
        parser="lalr",
        start="expr",
        g_regex_flags=re.M,
        lexer_callbacks={"IDENT": _bool_literal},
        propagate_positions=True,
        maybe_placeholders=False,
        priority="invert",
    )


def _offset_position(source: str, offset: int) -> tuple[int, int]:
    offset = max(0, min(offset, len(source)))
    line = source.count("\n", 0, offset) + 1
    return line, offset - (source.rfind("\n", 0, offset) + 1) + 1


def _end_of_input(source: str) -> CelCompileError:
    line, column = _offset_position(source, len(source.rstrip()))
    return CelCompileError("syntax error: unexpected end of expression", line, column)


def _full_parse(source: str) -> Tree:
    """lark's own parse of ``source``; raises :class:`CelCompileError` for a syntax error."""
    try:
        return _parser().parse(source)
    except UnexpectedCharacters as exc:
        at = exc.pos_in_stream  # lark types it Optional: None would be past the end
        char = source[at] if at is not None and at < len(source) else ""
        raise CelCompileError(
            f"syntax error: unexpected character {char!r}", exc.line, exc.column
        ) from None
    except UnexpectedToken as exc:
        if exc.token.type == "$END":
            raise _end_of_input(source) from None
        raise CelCompileError(
            f"syntax error: unexpected {exc.token.value!r}", exc.line, exc.column
        ) from None
    except UnexpectedEOF:
        raise _end_of_input(source) from None
    except RecursionError:
        raise CelCompileError("expression is nested too deeply") from None
    except LarkError as exc:
        raise CelCompileError(f"syntax error: {exc}") from None


def _parse(source: str) -> Tree:
    """The lark tree of ``source``, equal to :func:`_full_parse`'s (tokens, positions and
    metas included; see "Sharing parses" in the module doc); raises :class:`CelCompileError`.
    """
    skeleton = _skeleton(source)
    template = _TEMPLATES.get(skeleton, _MISSING)
    if template is None:  # this shape was refused: parse every text of it in full
        return _full_parse(source)
    if template is not _MISSING:
        tree = template.rebuild(source)
        return tree if tree is not None else _full_parse(source)
    recorded = _recording_parse(source)
    if recorded is None:  # a syntax error (or anything unexpected): lark's parse reports it
        return _full_parse(source)
    tree, tokens, states = recorded
    _remember(skeleton, _Template.build(source, tree, tokens, states))
    return tree


_shared_parse = _parse


# --------------------------------------------------------------------------------------------
# Sharing parses between texts that differ only in literals (see the module doc)

# Terminals whose value may differ between texts sharing a parse: their value is read only
# by _Compiler._literal, never by the parser or the tree builder.
_LITERAL_TERMINALS = frozenset(
    {"INT_LIT", "UINT_LIT", "FLOAT_LIT", "STRING_LIT", "MLSTRING_LIT", "BYTES_LIT"}
)
# A lookup key only: texts with equal skeletons are candidates for one template, and a
# candidate is used only once its own tokens are shown to match (_Template.rebuild).
_SKELETON_LITERAL = re.compile(
    r"""(?<![\w.])(?:[bB][rR]?|[rR][bB]?)?(?:\"\"\"(?:\\.|[^\\])*?\"\"\"|'''(?:\\.|[^\\])*?'''"""
    r"""|"(?:\\.|[^\\"\n])*"|'(?:\\.|[^\\'\n])*')"""
    r"|(?<![\w.])(?:0[xX][0-9a-fA-F]+|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)[uU]?"
    r"|\s+",
    re.S,
)
_MAX_TEMPLATES = 1024  # shapes remembered; each is a few KB
_MAX_SHAPES_PER_TEMPLATE = 8  # environments a shape's compilation is kept for
_MISSING: Any = object()
_new_meta = object.__new__
_TEMPLATES: dict[str, _Template | None] = {}
_TEMPLATES_LOCK = threading.Lock()

# The meta attributes lark's PropagatePositions sets: each copies one token's position, and
# the three of a group always come from the same token (found by its unique position).
_META_GROUPS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("start_pos", "start_pos", (("line", "line"), ("column", "column"))),
    (
        "container_start_pos",
        "start_pos",
        (("container_line", "line"), ("container_column", "column")),
    ),
    ("end_pos", "end_pos", (("end_line", "end_line"), ("end_column", "end_column"))),
    (
        "container_end_pos",
        "end_pos",
        (("container_end_line", "end_line"), ("container_end_column", "end_column")),
    ),
)
_META_ATTRIBUTES = frozenset(
    {"empty"} | {name for group in _META_GROUPS for name in (group[0], *(a for a, _ in group[2]))}
)
# A meta spec: (start token, end token) when the start and container-start groups copy one
# token, the end and container-end groups another, and empty is False (every node of
# cel.lark); else (empty, ((meta attribute, token index, token attribute), ...)).
# (meta attribute, token index, token attribute): a meta value copied from a token.
_CopiedMeta = tuple[tuple[str, int, str], ...]
_MetaSpec = tuple[int, int] | tuple[bool, _CopiedMeta]
_Step = int | tuple[str, int, _MetaSpec]


def _skeleton_part(match: re.Match[str]) -> str:
    text = match.group()
    if text[0].isspace():
        return " "
    return "\x00" if text[-1] in "\"'" else "\x01"


def _skeleton(source: str) -> str:
    """``source`` with whitespace runs and literal-looking lexemes replaced by placeholders."""
    return _SKELETON_LITERAL.sub(_skeleton_part, source)


def _remember(skeleton: str, template: _Template | None) -> None:
    with _TEMPLATES_LOCK:
        if skeleton not in _TEMPLATES and len(_TEMPLATES) >= _MAX_TEMPLATES:
            del _TEMPLATES[next(iter(_TEMPLATES))]  # oldest first
        _TEMPLATES.setdefault(skeleton, template)


def _recording_parse(source: str) -> tuple[Tree, list[Token], list[int]] | None:
    """lark's parse of ``source`` through its interactive API, recording what it consumed.

    Returns the tree, the tokens the parser was fed (in order) and, for each token and for
    the end of input, the parser state whose contextual lexer produced it; None on any error
    (the caller then lets :func:`_full_parse` produce the error).
    """
    try:
        interactive = _parser().parse_interactive(source)
        states: list[int] = []
        tokens: list[Token] = []
        # iter_parse feeds a token only when asked for the next one, so while a token is
        # held here the parser is still in the state the lexer picked it in.
        for token in interactive.iter_parse():
            states.append(interactive.parser_state.position)
            tokens.append(token)
        states.append(interactive.parser_state.position)  # the state that lexed the end
        tree = interactive.feed_eof(tokens[-1] if tokens else None)
    except Exception:
        return None
    if not isinstance(tree, Tree):
        return None
    return tree, tokens, states


@functools.lru_cache(maxsize=1)
def _sharing_supported() -> bool:
    """Sharing relies on a contextual lexer and on no per-terminal parser callbacks (which
    could look at token values); anything else and every text is parsed in full."""
    parser = _parser()
    frontend = parser.parser
    callbacks = frontend.parser.parser.callbacks
    return isinstance(frontend.lexer, ContextualLexer) and not any(
        isinstance(key, str) for key in callbacks
    )


@dataclass(frozen=True, eq=False)
class _Template:
    """The parse of one text, abstracted over its literal values, rebuilt for another text.

    ``sublexers[i]`` is the contextual lexer the parser used for token i (the last one found
    the end of input); ``expected[i]`` is token i's type and, unless it is a literal, its
    value. ``program`` rebuilds the tree in post-order from a new text's tokens: an ``int``
    pushes that token; ``(data, child count, meta spec)`` pops the children and pushes a
    new tree, its meta copied from the tokens the spec names (see ``_MetaSpec``).
    """

    sublexers: tuple[Any, ...]
    expected: tuple[tuple[str, str | None], ...]
    program: tuple[_Step, ...]
    # The shape's shared compilations, one per environment (declarations and limits).
    shapes: list[_Shape] = field(default_factory=list, repr=False)

    @classmethod
    def build(
        cls, source: str, tree: Tree, tokens: list[Token], states: list[int]
    ) -> _Template | None:
        """A template from a recorded parse, or None (never share this shape) unless
        rebuilding ``source`` through it gives back exactly ``tree``."""
        try:
            if not _sharing_supported():
                return None
            lexers = _parser().parser.lexer.lexers
            template = cls(
                sublexers=tuple(lexers[state] for state in states),
                expected=tuple(
                    (t.type, None if t.type in _LITERAL_TERMINALS else t.value) for t in tokens
                ),
                program=_program(tree, tokens),
            )
            rebuilt = template.rebuild(source)
        except Exception:
            return None
        if rebuilt is None or not _same_tree(rebuilt, tree):
            return None
        return template

    def rebuild(self, source: str) -> Tree | None:
        """The tree of ``source`` if lark's parse of it takes exactly this template's
        steps (see the module doc), else None."""
        tokens = self._lex(source)
        return None if tokens is None else self._assemble(tokens)

    def _assemble(self, tokens: list[Token]) -> Tree | None:
        """The tree the program builds from ``tokens`` (a text's tokens from :meth:`_lex`)."""
        starts = [
            {
                "empty": False,
                "line": t.line,
                "column": t.column,
                "start_pos": t.start_pos,
                "container_line": t.line,
                "container_column": t.column,
                "container_start_pos": t.start_pos,
            }
            for t in tokens
        ]
        ends = [
            {
                "end_line": t.end_line,
                "end_column": t.end_column,
                "end_pos": t.end_pos,
                "container_end_line": t.end_line,
                "container_end_column": t.end_column,
                "container_end_pos": t.end_pos,
            }
            for t in tokens
        ]
        stack: list[Any] = []
        for step in self.program:
            if type(step) is int:
                stack.append(tokens[step])
                continue
            data, count, spec = cast(tuple[str, int, _MetaSpec], step)
            if count:
                children = stack[-count:]
                del stack[-count:]
            else:
                children = []
            first, second = spec  # _MetaSpec's two forms, told apart by type(first)
            if type(first) is int:
                meta = _new_meta(Meta)  # no __init__: every attribute is set from the dicts
                meta.__dict__ = {**starts[first], **ends[cast(int, second)]}
            else:
                meta = Meta()
                meta.empty = bool(first)
                for attribute, index, token_attribute in cast(_CopiedMeta, second):
                    setattr(meta, attribute, getattr(tokens[index], token_attribute))
            stack.append(Tree(data, children, meta))
        return stack[0] if len(stack) == 1 and isinstance(stack[0], Tree) else None

    def _lex(self, source: str) -> list[Token] | None:
        """``source``'s tokens, each lexed by the sublexer the template's parse used at that
        point; None unless they match the template's types (and non-literal values) one for
        one and are followed by the end of input.

        The loop is lark's ``BasicLexer.next_token`` (lark 1.3) over the recorded sublexers'
        own scanners, ignored and newline terminals and callbacks, minus its per-token method
        calls and state objects (lexing was half of a shared compile): the same tokens, with
        the same values and positions, as tests/cel/test_parse_sharing.py checks against
        lark's own parse. A lexing error (no terminal matches) is a None, as before.
        """
        text = TextSlice(source, 0, len(source))
        end = len(source)
        expected = self.expected
        last = len(expected)
        tokens: list[Token] = []
        pos, line, line_start = 0, 1, 0  # lark's LineCounter: column = pos - line_start + 1
        try:
            for index, sublexer in enumerate(self.sublexers):
                scanner = sublexer.scanner
                ignore_types = sublexer.ignore_types
                newline_types = sublexer.newline_types
                callbacks = sublexer.callback
                while True:
                    if pos >= end:  # the end of input: right after the last token only
                        return tokens if index == last else None
                    match = scanner.match(text, pos)
                    if not match:
                        return None
                    value, kind = match
                    ignored = kind in ignore_types
                    token = None
                    if not ignored or kind in callbacks:
                        token = Token(kind, value, pos, line, pos - line_start + 1)
                    if kind in newline_types:
                        newlines = value.count("\n")
                        if newlines:
                            line += newlines
                            line_start = pos + value.rindex("\n") + 1
                    pos += len(value)
                    if token is None:
                        continue
                    token.end_line = line
                    token.end_column = pos - line_start + 1
                    token.end_pos = pos
                    if kind in callbacks:
                        token = callbacks[kind](token)
                    if ignored:
                        continue
                    if index == last:
                        return None  # a token after the template's last one
                    want_kind, want_value = expected[index]
                    if not isinstance(token, Token) or token.type != want_kind:
                        return None
                    if want_value is not None and token.value != want_value:
                        return None
                    tokens.append(token)
                    break
        except Exception:  # anything unexpected: the full parse decides
            return None
        return None  # pragma: no cover (the last sublexer's loop always returns)

    def shape(self, declarations: Declarations, limits: CompileLimits) -> _Shape | None:
        """The shared compilation of this shape in an environment, if one was recorded."""
        for shape in self.shapes:
            if shape.limits == limits and (
                shape.declarations is declarations or shape.declarations == declarations
            ):
                return shape
        return None

    def add_shape(self, shape: _Shape) -> None:
        with _TEMPLATES_LOCK:
            if self.shape(shape.declarations, shape.limits) is None:
                if len(self.shapes) >= _MAX_SHAPES_PER_TEMPLATE:
                    del self.shapes[0]  # oldest first
                self.shapes.append(shape)

    def aligned(self, tree: Tree) -> list[Tree | Token] | None:
        """``tree``'s nodes and tokens in post-order, one per program step, if ``tree`` has
        the structure, token types and non-literal values the program builds; else None."""
        items: list[Tree | Token] = []
        pending: list[tuple[Any, bool]] = [(tree, False)]
        while pending:
            item, expanded = pending.pop()
            if expanded or isinstance(item, Token):
                items.append(item)
            elif isinstance(item, Tree):
                pending.append((item, True))
                pending.extend((child, False) for child in reversed(item.children))
            else:
                return None
        if len(items) != len(self.program):
            return None
        for item, step in zip(items, self.program, strict=True):
            if type(step) is int:
                kind, value = self.expected[step]
                if not isinstance(item, Token) or item.type != kind:
                    return None
                if value is not None and item.value != value:
                    return None
            elif (
                not isinstance(item, Tree)
                or (item.data, len(item.children)) != cast(tuple[str, int, _MetaSpec], step)[:2]
            ):
                return None
        return items

    def holds_literal(self) -> list[bool]:
        """For each program step: whether its token, or a token under its tree, is a literal
        (whose value may differ between this shape's texts)."""
        holds: list[bool] = []
        stack: list[bool] = []
        for step in self.program:
            if type(step) is int:
                literal = self.expected[step][0] in _LITERAL_TERMINALS
            else:
                count = cast(tuple[str, int, _MetaSpec], step)[1]
                literal = any(stack[len(stack) - count :])
                del stack[len(stack) - count :]
            stack.append(literal)
            holds.append(literal)
        return holds


# Rules whose handlers look at a child's rule and child count without descending into it.
_FLATTENED = frozenset(
    {"conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary"}
)


def _skippable(steps: tuple[_Step, ...], at: int, descended: int) -> bool:
    """Whether a spine may hold the node of step ``descended`` in place of that of step
    ``at``, a chain of single-child precedence rules (``relation -> addition -> ... ->
    primary``) above it: the compiler then does exactly what it does with the chain.

    It compiles a chain by compiling the node :func:`_descend` reaches, which is the same; a
    handler that looks at a child without descending (``_logical``, ``_binary``,
    ``_unary``) only goes on into a child of its own rule with two children, which the chain
    head is not and the node reached must not be either; and the compiler reads no meta but
    the first token's line and column, the same for the chain and the node it ends at.
    """
    if descended == at:
        return False
    head, end = steps[at], steps[descended]
    if type(end) is not tuple:
        return False
    head_spec = cast(tuple[str, int, _MetaSpec], head)[2]
    return type(head_spec[0]) is int and type(end[2][0]) is int and end[0] not in _FLATTENED


class _StartMeta:
    """What the compiler reads of a node's lark ``Meta`` (:func:`_position`: its first
    token's line and column), for the nodes a shared compilation rebuilds."""

    __slots__ = ("column", "line")
    empty = False

    def __init__(self, token: Token) -> None:
        self.line = token.line
        self.column = token.column


# A compiled literal-free subtree: its node, the AST nodes it counted, the variables it read.
_Shared = tuple["_Node", int, frozenset[str]]
# A spine step: an int pushes that token of the new text, a Tree pushes that literal-free
# subtree of the recorded text, a tuple builds a node as in _Step.
_SpineStep = int | Tree | tuple[str, int, _MetaSpec]


@dataclass(frozen=True, eq=False)
class _Shape:
    """One template's compilation in one environment, shared by all texts of the template.

    ``compiled`` maps the id of each literal-free subtree of the recorded text's ``tree`` (kept
    alive here, so ids stay unique) to its compiled node; ``program`` rebuilds only the nodes
    above a literal (the spine) from a new text's tokens, with those subtrees in place.
    """

    declarations: Declarations
    limits: CompileLimits
    tree: Tree
    program: tuple[_SpineStep, ...]
    compiled: dict[int, _Shared] = field(repr=False)

    @classmethod
    def build(cls, template: _Template, items: list[Tree | Token], compiler: _Compiler) -> _Shape:
        """The shape recorded by ``compiler``'s compilation of the tree whose post-order
        ``items`` match ``template``'s program (:meth:`_Template.aligned`)."""
        steps = template.program
        holds_literal = template.holds_literal()
        children: list[list[int]] = []
        descended: list[int] = []  # the step _descend reaches from each step
        stack: list[int] = []
        for at, step in enumerate(steps):
            node = None if type(step) is int else cast(tuple[str, int, _MetaSpec], step)
            count = 0 if node is None else node[1]
            children.append(stack[len(stack) - count :])
            del stack[len(stack) - count :]
            stack.append(at)
            passthrough = node is not None and count == 1 and node[0] in _PASSTHROUGH
            descended.append(descended[children[at][0]] if passthrough else at)
        program: list[_SpineStep] = []
        pending = [(len(steps) - 1, False)]
        while pending:
            at, expanded = pending.pop()
            step = steps[at]
            if type(step) is int:
                program.append(step)  # every token comes from the new text: its positions
            elif not holds_literal[at]:
                program.append(cast(Tree, items[at]))  # a literal-free subtree: a Tree
            elif expanded:
                data, count, meta = cast(tuple[str, int, _MetaSpec], step)
                program.append((str(data), count, meta))  # a str compares faster than a Token
            elif _skippable(steps, at, descended[at]):
                pending.append((children[at][0], False))
            else:
                pending.append((at, True))
                pending.extend((child, False) for child in reversed(children[at]))
        recorded = compiler.recording or {}
        return cls(
            declarations=compiler.declarations,
            limits=compiler.limits,
            tree=cast(Tree, items[-1]),  # the root
            program=tuple(program),
            compiled={key: value for key, value in recorded.items() if value is not None},
        )

    def spine(self, tokens: list[Token]) -> Tree:
        """The tree to compile for a text with ``tokens``: lark's tree of that text, but for
        the literal-free subtrees (the recorded text's, equal but for positions, compiled
        already) and metas holding only what the compiler reads."""
        starts = [_StartMeta(token) for token in tokens]
        stack: list[Any] = []
        for step in self.program:
            kind = type(step)
            if kind is int:
                stack.append(tokens[cast(int, step)])
            elif kind is tuple:
                data, count, (first, second) = cast(tuple[str, int, _MetaSpec], step)
                if count:
                    children = stack[-count:]
                    del stack[-count:]
                else:
                    children = []
                if type(first) is int:
                    meta: Any = starts[first]
                else:
                    meta = Meta()
                    meta.empty = first
                    for attribute, source, token_attribute in cast(_CopiedMeta, second):
                        setattr(meta, attribute, getattr(tokens[source], token_attribute))
                stack.append(Tree(data, children, meta))
            else:
                stack.append(step)
        return stack[0]


def _program(tree: Tree, tokens: list[Token]) -> tuple[_Step, ...]:
    """The post-order rebuild program of ``tree`` (see :class:`_Template`); raises
    ValueError when a leaf or a meta value cannot be traced to exactly one token."""
    index_of = {id(token): index for index, token in enumerate(tokens)}
    by_position = {
        "start_pos": {token.start_pos: index for index, token in enumerate(tokens)},
        "end_pos": {token.end_pos: index for index, token in enumerate(tokens)},
    }
    if any(len(positions) != len(tokens) for positions in by_position.values()):
        raise ValueError("tokens share a position")
    program: list[_Step] = []
    # Iterative post-order: nesting depth is bounded only by the expression length.
    pending: list[tuple[Tree | Token, bool]] = [(tree, False)]
    while pending:
        item, expanded = pending.pop()
        if isinstance(item, Token):
            if id(item) not in index_of:
                raise ValueError("a leaf the parser was not fed")
            program.append(index_of[id(item)])
        elif not isinstance(item, Tree) or not isinstance(item.data, str):
            raise ValueError("unexpected tree node")
        elif expanded:
            program.append((item.data, len(item.children), _meta_spec(item, tokens, by_position)))
        else:
            pending.append((item, True))
            pending.extend((child, False) for child in reversed(item.children))
    return tuple(program)


def _meta_spec(
    tree: Tree, tokens: list[Token], by_position: dict[str, dict[int | None, int]]
) -> _MetaSpec:
    """Which token attribute each of ``tree``'s meta attributes was copied from; raises
    ValueError for an attribute lark's PropagatePositions would not have set that way."""
    values = vars(tree.meta)
    if not set(values) <= _META_ATTRIBUTES:
        raise ValueError(f"unknown meta attributes {set(values) - _META_ATTRIBUTES}")
    spec: list[tuple[str, int, str]] = []
    sources: list[int | None] = []
    for key_attribute, token_attribute, companions in _META_GROUPS:
        if key_attribute not in values:
            if any(attribute in values for attribute, _ in companions):
                raise ValueError("a partial position")
            sources.append(None)
            continue
        index = by_position[token_attribute][values[key_attribute]]
        sources.append(index)
        spec.append((key_attribute, index, token_attribute))
        for attribute, source in companions:
            if values.get(attribute, _MISSING) != getattr(tokens[index], source):
                raise ValueError("a position from two tokens")
            spec.append((attribute, index, source))
    start, container_start, end, container_end = sources
    empty = values.get("empty", True)
    if (
        empty is False
        and start is not None
        and start == container_start
        and end is not None
        and end == container_end
    ):
        return start, end
    return bool(empty), tuple(spec)


def _same_tree(left: Tree | Token, right: Tree | Token) -> bool:
    """Equal trees: same rules, same tokens (type, value, every position), same metas."""
    pending = [(left, right)]
    while pending:
        a, b = pending.pop()
        if isinstance(a, Token) or isinstance(b, Token):
            if not (isinstance(a, Token) and isinstance(b, Token)) or _token_facts(
                a
            ) != _token_facts(b):
                return False
            continue
        if a.data != b.data or len(a.children) != len(b.children):
            return False
        if vars(a.meta) != vars(b.meta):
            return False
        pending.extend(zip(a.children, b.children, strict=True))
    return True


def _token_facts(token: Token) -> tuple[Any, ...]:
    return (
        token.type,
        token.value,
        token.start_pos,
        token.line,
        token.column,
        token.end_line,
        token.end_column,
        token.end_pos,
    )


def _position(where: Tree | Token) -> tuple[int, int]:
    """Line and column of a token, or of the first positioned token inside a subtree."""
    stack: list[Tree | Token] = [where]
    while stack:
        item = stack.pop()
        if isinstance(item, Token):
            if item.line is not None and item.column is not None:
                return item.line, item.column
            continue
        if not item.meta.empty:
            return item.meta.line, item.meta.column
        stack.extend(reversed(item.children))
    return 1, 1


# Single-child rules that only encode precedence: compiling them is compiling their child.
_PASSTHROUGH = frozenset(
    {
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
        "primary",
        "paren_expr",
    }
)


def _field_name(token: Token) -> str:
    """A field's name: an IDENT, or a QUOTED_IDENT without its backticks."""
    text = str(token)
    return text[1:-1] if token.type == "QUOTED_IDENT" else text


def _descend(tree: Tree) -> Tree:
    while tree.data in _PASSTHROUGH and len(tree.children) == 1:
        tree = tree.children[0]
    return tree


_BINARY_SYMBOLS = {
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_in": "in",
    "addition_add": "+",
    "addition_sub": "-",
    "multiplication_mul": "*",
    "multiplication_div": "/",
    "multiplication_mod": "%",
}


# --------------------------------------------------------------------------------------------
# Compiled nodes


class _Node:
    """A compiled sub-expression: its closure, its value when known at compile time, and its
    static type (``ctype``; what the checker infers from the text alone, never from a
    literal's value, so texts of one shape get the same types)."""

    __slots__ = ("ctype", "fn", "is_const", "value")

    def __init__(
        self, fn: Evaluator, is_const: bool = False, value: Any = None, ctype: CelT = DYN
    ) -> None:
        self.fn = fn
        self.is_const = is_const
        self.value = value
        self.ctype = ctype


def _const(value: Any, ctype: CelT) -> _Node:
    if type(value) is list:
        value = tuple(value)  # constants are shared by every evaluation: keep them immutable
    elif type(value) is dict:
        value = MappingProxyType(value)
    return _Node(lambda act, value=value: value, True, value, ctype)


def _fold(ctype: CelT, compute: Callable[..., Any], *args: Any) -> _Node | None:
    """Evaluate a pure operation on constants now; None when it fails (it fails at run time)."""
    try:
        return _const(compute(*args), ctype)
    except Exception:
        return None


def _typed(node: _Node, ctype: CelT) -> _Node:
    """``node`` with the static type ``ctype``."""
    if node.ctype == ctype:
        return node
    return _Node(node.fn, node.is_const, node.value, ctype)


_LITERAL_TYPES = {
    "INT_LIT": INT,
    "UINT_LIT": UINT,
    "FLOAT_LIT": DOUBLE,
    "STRING_LIT": STRING,
    "MLSTRING_LIT": STRING,
    "BYTES_LIT": BYTES,
    "BOOL_LIT": BOOL,
    "NULL_LIT": NULL,
}
_UNARY_SYMBOLS: dict[Callable[[Any], Any], str] = {logical_not: "!_", negate: "-_"}


def _unwrap(ctype: CelT) -> CelT:
    """What an optional of type ``ctype`` holds (dyn for dyn); other types as they are."""
    return ctype.params[0] if ctype.kind == "optional_type" else ctype


def _present(value: Any) -> bool:
    """An optional entry's value: included when present; anything but an optional is an
    error."""
    if type(value) is Optional:
        return value.has_value()
    raise no_overload("?_", value)


# Comprehension iterations one outermost comprehension may run, nested ones included. With
# nesting bounded at compile time, this bounds any condition's evaluation cost:
# at most (expression nodes) x (this budget) node evaluations, whatever the input.
MAX_COMPREHENSION_ITERATIONS = 10_000


class _Frame(dict[str, Any]):
    """The activation inside a comprehension: loop variables, plus the request activation.

    `root`: the request activation; `budget`: a one-item list, the iterations left to the
    outermost comprehension (shared by its nested frames)."""

    __slots__ = ("budget", "root")

    root: Any
    budget: list[int]


def _top_frame(act: Any) -> _Frame:
    frame = _Frame()
    frame.root = act
    frame.budget = [MAX_COMPREHENSION_ITERATIONS]
    return frame


def _nested_frame(act: _Frame) -> _Frame:
    frame = _Frame(act)
    frame.root = act.root
    frame.budget = act.budget  # shared: nested loops draw on their outermost loop's budget
    return frame


def _charge(frame: _Frame, items: Any, macro: str) -> None:
    """Pays for a loop before it runs, so a runaway product of loops stops at once."""
    frame.budget[0] -= len(items)
    if frame.budget[0] < 0:
        raise CelEvaluationError(
            f"{macro}(): more than {MAX_COMPREHENSION_ITERATIONS} comprehension iterations"
        )


def _iterable(value: Any, macro: str) -> Any:
    """Comprehensions range over list elements or map keys."""
    tv = type(value)
    if tv is list or tv is tuple or tv is dict or kind_of(value) in ("list", "map"):
        return value
    raise no_overload(macro, value)


# --------------------------------------------------------------------------------------------
# Closure builders (one per operator family)
#
# What an evaluator needs is bound as default arguments, not closed over: one defaults tuple
# per function instead of a cell per name plus a closure tuple (~40 bytes a name, with
# tens of thousands of conditions held), and read as fast locals. Evaluators are only ever
# called with the activation.


def _make_logical(fns: tuple[Evaluator, ...], decisive: bool, symbol: str) -> Evaluator:
    """``&&`` (decisive False) / ``||`` (decisive True) over any number of operands.

    Any operand equal to the decisive value decides the result, whatever errors the others
    raise (CEL's commutative error absorption); otherwise the first error (or non-bool
    operand) is raised.
    """
    other = not decisive

    def logical(
        act: Any,
        fns: tuple[Evaluator, ...] = fns,
        decisive: bool = decisive,
        other: bool = other,
        symbol: str = symbol,
    ) -> bool:
        error: BaseException | None = None
        for fn in fns:
            try:
                value = fn(act)
            except Exception as exc:
                if error is None:
                    error = exc
                continue
            if value is decisive:
                return decisive
            if value is not other and error is None:
                error = no_overload(symbol, value)
        if error is not None:
            raise as_cel_error(error)
        return other

    return logical


def _make_binary(symbol: str, left: _Node, right: _Node) -> Evaluator:
    """One binary operator, specialised for a constant operand where that pays off."""
    op = BINARY_OPERATORS[symbol]
    lf, rf = left.fn, right.fn
    if right.is_const:
        constant = right.value
        if symbol == "in" and type(constant) is tuple:
            fast = _make_constant_membership(lf, constant)
            if fast is not None:
                return fast
        if symbol in ("==", "!=") and (type(constant) in (str, bytes) or constant is None):
            # Python == on these agrees with CEL for every plain value on the other side.
            if symbol == "==":
                return lambda act, lf=lf, constant=constant: lf(act) == constant
            return lambda act, lf=lf, constant=constant: lf(act) != constant
        return lambda act, op=op, lf=lf, constant=constant: op(lf(act), constant)
    if left.is_const:
        constant = left.value
        return lambda act, op=op, constant=constant, rf=rf: op(constant, rf(act))
    return lambda act, op=op, lf=lf, rf=rf: op(lf(act), rf(act))


def _make_constant_membership(lf: Evaluator, members: tuple[Any, ...]) -> Evaluator | None:
    """``x in [literal, ...]`` as a frozenset lookup when that preserves CEL equality.

    Only for lists of exactly-str or exactly-int elements, and only for needles of exactly
    that type; any other needle (a double compares with ints as doubles do) takes the
    general path.
    """
    if not members:
        return None
    if all(type(m) is str for m in members):
        strings = frozenset(members)

        def in_strings(
            act: Any, lf: Evaluator = lf, strings: frozenset[str] = strings, members: Any = members
        ) -> bool:
            needle = lf(act)
            if type(needle) is str:
                return needle in strings
            return list_contains(members, needle)

        return in_strings
    if all(type(m) is int for m in members):
        ints = frozenset(members)

        def in_ints(
            act: Any, lf: Evaluator = lf, ints: frozenset[int] = ints, members: Any = members
        ) -> bool:
            needle = lf(act)
            if type(needle) is int:
                return needle in ints
            return list_contains(members, needle)

        return in_ints
    return None


_ChainStep = tuple[Callable[[Any, Any], Any], Evaluator]


def _make_chain(first: Evaluator, rest: tuple[_ChainStep, ...]) -> Evaluator:
    """A left-associative run of same-precedence operators, evaluated in a loop."""

    def chain(act: Any, first: Evaluator = first, rest: tuple[_ChainStep, ...] = rest) -> Any:
        value = first(act)
        for op, fn in rest:
            value = op(value, fn(act))
        return value

    return chain


def _make_unary(operand: Evaluator, ops: tuple[Callable[[Any], Any], ...]) -> Evaluator:
    if len(ops) == 1:
        op = ops[0]
        return lambda act, op=op, operand=operand: op(operand(act))

    def unary(
        act: Any, operand: Evaluator = operand, ops: tuple[Callable[[Any], Any], ...] = ops
    ) -> Any:
        value = operand(act)
        for op in ops:
            value = op(value)
        return value

    return unary


def _make_select(operand: Evaluator, name: str) -> Evaluator:
    def select(act: Any, operand: Evaluator = operand, name: str = name) -> Any:
        obj = operand(act)
        if type(obj) is dict:
            try:
                return obj[name]
            except KeyError:
                raise CelEvaluationError(f"no such key: {name!r}") from None
        return select_field(obj, name)

    return select


def _make_call(impl: Callable[..., Any], args: Sequence[_Node]) -> Evaluator:
    """A function call with constant arguments bound at compile time."""
    fns = tuple(a.fn for a in args)
    if len(args) == 1:
        f0 = fns[0]
        return lambda act, impl=impl, f0=f0: impl(f0(act))
    if len(args) == 2:
        f0, f1 = fns
        if args[1].is_const:
            c1 = args[1].value
            return lambda act, impl=impl, f0=f0, c1=c1: impl(f0(act), c1)
        return lambda act, impl=impl, f0=f0, f1=f1: impl(f0(act), f1(act))
    return lambda act, impl=impl, fns=fns: impl(*[fn(act) for fn in fns])


def _make_lazy_call(impl: Callable[..., Any], args: Sequence[_Node]) -> Evaluator:
    """A call whose last argument is handed over unevaluated, as a thunk."""
    fns = tuple(a.fn for a in args[:-1])
    last = args[-1].fn
    return lambda act, impl=impl, fns=fns, last=last: impl(
        *[fn(act) for fn in fns], lambda: last(act)
    )


def _prepared(fn: Evaluator, prepare: Callable[[Any], Any]) -> Evaluator:
    return lambda act, fn=fn, prepare=prepare: prepare(fn(act))


MacroBuilder = Callable[..., Evaluator]


def _quantifier(decisive: bool) -> MacroBuilder:
    """``all`` (decisive False) and ``exists`` (decisive True), absorbing errors like &&/||."""

    def build(
        name: str, target: Evaluator, var: str, new_frame: Evaluator, predicate: Evaluator
    ) -> Evaluator:
        other = not decisive

        def quantifier(
            act: Any,
            name: str = name,
            target: Evaluator = target,
            var: str = var,
            new_frame: Evaluator = new_frame,
            predicate: Evaluator = predicate,
            decisive: bool = decisive,
            other: bool = other,
        ) -> bool:
            items = _iterable(target(act), name)
            frame = new_frame(act)
            _charge(frame, items, name)
            error: BaseException | None = None
            for item in items:
                frame[var] = item
                try:
                    value = predicate(frame)
                except Exception as exc:
                    if error is None:
                        error = exc
                    continue
                if value is decisive:
                    return decisive
                if value is not other and error is None:
                    error = no_overload(name, value)
            if error is not None:
                raise as_cel_error(error)
            return other

        return quantifier

    return build


def _build_exists_one(
    name: str, target: Evaluator, var: str, new_frame: Evaluator, predicate: Evaluator
) -> Evaluator:
    """``exists_one``: exactly one element satisfies the predicate; any error propagates."""

    def exists_one(
        act: Any,
        name: str = name,
        target: Evaluator = target,
        var: str = var,
        new_frame: Evaluator = new_frame,
        predicate: Evaluator = predicate,
    ) -> bool:
        items = _iterable(target(act), name)
        frame = new_frame(act)
        _charge(frame, items, name)
        count = 0
        for item in items:
            frame[var] = item
            value = predicate(frame)
            if value is True:
                count += 1
            elif value is not False:
                raise no_overload(name, value)
        return count == 1

    return exists_one


def _build_collect(
    name: str, target: Evaluator, var: str, new_frame: Evaluator, *bodies: Evaluator
) -> Evaluator:
    """``filter(x, p)``, ``map(x, t)`` and ``map(x, p, t)``: an optional filter, then a map."""
    predicate: Evaluator | None
    transform: Evaluator | None
    if name == "filter":
        predicate, transform = bodies[0], None
    elif len(bodies) == 1:
        predicate, transform = None, bodies[0]
    else:
        predicate, transform = bodies

    def collect(
        act: Any,
        name: str = name,
        target: Evaluator = target,
        var: str = var,
        new_frame: Evaluator = new_frame,
        predicate: Evaluator | None = predicate,
        transform: Evaluator | None = transform,
    ) -> list[Any]:
        items = _iterable(target(act), name)
        frame = new_frame(act)
        _charge(frame, items, name)
        out = []
        for item in items:
            frame[var] = item
            if predicate is not None:
                keep = predicate(frame)
                if keep is False:
                    continue
                if keep is not True:
                    raise no_overload(name, keep)
            out.append(item if transform is None else transform(frame))
        return out

    return collect


# The last part of every namespaced function's name (``of`` of ``optional.of``), and bind:
# only a method call of one of these names may be a namespaced call.
_NAMESPACED = frozenset(name.rpartition(".")[2] for name in GLOBALS if "." in name) | {"bind"}

# The two-variable comprehensions and their argument counts (variables included).
_TWO_VARIABLE: dict[str, tuple[int, ...]] = {
    "all": (3,),
    "exists": (3,),
    "existsOne": (3,),
    "transformList": (3, 4),
    "transformMap": (3, 4),
}


def _pairs(value: Any, name: str, frame: _Frame) -> list[tuple[Any, Any]]:
    """(index, element) of a list, (key, value) of a map, paid for (``_charge``) before
    they are built: a list of a million is refused at once, not after a second of pairing
    (a hundred such loops absorbed by || took minutes)."""
    items = _iterable(value, name)
    _charge(frame, items, name)
    if kind_of(items) == "map":
        return list(items.items())
    return list(enumerate(items))


def _build_two_variable(
    name: str,
    target: Evaluator,
    variables: tuple[str, str],
    new_frame: Evaluator,
    bodies: tuple[Evaluator, ...],
) -> Evaluator:
    """The evaluator of a two-variable comprehension (see _Compiler._comprehension2)."""
    first, second = variables
    if name in ("all", "exists"):
        decisive = name == "exists"
        predicate = bodies[0]

        def quantifier(act: Any) -> bool:
            frame = new_frame(act)
            pairs = _pairs(target(act), name, frame)
            error: BaseException | None = None
            for a, b in pairs:
                frame[first], frame[second] = a, b
                try:
                    value = predicate(frame)
                except Exception as exc:
                    if error is None:
                        error = exc
                    continue
                if value is decisive:
                    return decisive
                if value is not (not decisive) and error is None:
                    error = no_overload(name, value)
            if error is not None:
                raise as_cel_error(error)
            return not decisive

        return quantifier

    def collect(act: Any) -> Any:
        frame = new_frame(act)
        pairs = _pairs(target(act), name, frame)
        count = 0
        out_list: list[Any] = []
        out_map: list[tuple[Any, Any]] = []
        for a, b in pairs:
            frame[first], frame[second] = a, b
            if name == "existsOne":
                value = bodies[0](frame)
                if value is True:
                    count += 1
                elif value is not False:
                    raise no_overload(name, value)
                continue
            if len(bodies) == 2:
                keep = bodies[0](frame)
                if keep is False:
                    continue
                if keep is not True:
                    raise no_overload(name, keep)
            result = bodies[-1](frame)
            if name == "transformList":
                out_list.append(result)
            else:
                out_map.append((a, result))
        if name == "existsOne":
            return count == 1
        return out_list if name == "transformList" else build_map(out_map)

    return collect


_COMPREHENSIONS: dict[str, MacroBuilder] = {
    "all": _quantifier(decisive=False),
    "exists": _quantifier(decisive=True),
    "exists_one": _build_exists_one,
    "map": _build_collect,
    "filter": _build_collect,
}


# --------------------------------------------------------------------------------------------
# The compiler


class _Compiler:
    """Walks one lark tree; holds only per-compilation state."""

    def __init__(self, declarations: Declarations, limits: CompileLimits) -> None:
        self.declarations = declarations
        self.declared = declarations.variables
        self.types = declarations.types
        self.checked = declarations.checked
        self.limits = limits
        self.referenced: set[str] = set()
        self.loop_vars: tuple[str, ...] = ()  # enclosing comprehension variables, innermost last
        self.loop_types: tuple[CelT, ...] = ()  # their static types, in the same order
        self.comprehensions = 0  # enclosing comprehensions (loops, not cel.bind or optMap)
        self.nodes = 0
        self.depth = 0
        # Sharing a shape's compilation (see the module doc): subtrees compiled already, by
        # id; or, while recording, the ids of the subtrees to record, and what they compiled to.
        self.shared: dict[int, _Shared] | None = None
        self.recording: dict[int, _Shared | None] | None = None

    def error(self, message: str, where: Tree | Token) -> CelCompileError:
        line, column = _position(where)
        return CelCompileError(message, line, column)

    def refuse(self, message: str, where: Tree | Token) -> CelT:
        """A type check failed: a compile error when checking, else the type is dyn (the
        operation fails closed at evaluation)."""
        if self.checked:
            raise self.error(message, where)
        return DYN

    def overload(
        self,
        name: str,
        signatures: Sequence[Signature],
        arguments: Sequence[CelT],
        where: Tree | Token,
    ) -> CelT:
        """The result type of ``name`` applied to ``arguments`` (see :func:`resolve`)."""
        if not signatures:
            return DYN
        found = resolve(signatures, arguments)
        if found is not None:
            return found
        kinds = ", ".join(str(t) for t in arguments)
        return self.refuse(f"no matching overload for '{name}' applied to ({kinds})", where)

    def operator(self, symbol: str, arguments: Sequence[CelT], where: Tree | Token) -> CelT:
        return self.overload(symbol, OPERATOR_SIGNATURES[symbol], arguments, where)

    def count(self, where: Tree | Token, nodes: int = 1) -> None:
        self.nodes += nodes
        if self.nodes > self.limits.max_ast_nodes:
            raise self.error(
                f"expression too large: more than {self.limits.max_ast_nodes} nodes", where
            )

    def compile(self, tree: Tree) -> _Node:
        if self.shared is not None:
            known = self.shared.get(id(tree))
            if known is not None:
                # Compiled once for the shape, in this environment, at this very place: the
                # same node, the same count, the same variables as compiling it again.
                node, nodes, names = known
                self.nodes += nodes
                self.referenced.update(names)
                return node
        elif self.recording is not None and id(tree) in self.recording:
            return self._record(tree)
        return self._compile(tree)

    def _record(self, tree: Tree) -> _Node:
        """Compile a literal-free subtree, noting its node, node count and variables."""
        outer_referenced, outer_nodes = self.referenced, self.nodes
        self.referenced = set()
        try:
            node = self._compile(tree)
            self.recording[id(tree)] = (  # type: ignore[index]
                node,
                self.nodes - outer_nodes,
                frozenset(self.referenced),
            )
        finally:
            outer_referenced |= self.referenced
            self.referenced = outer_referenced
        return node

    def _compile(self, tree: Tree) -> _Node:
        tree = _descend(tree)
        self.count(tree)
        self.depth += 1
        try:
            if self.depth > self.limits.max_nesting_depth:
                raise self.error(
                    f"expression nested deeper than {self.limits.max_nesting_depth} levels", tree
                )
            return _HANDLERS[tree.data](self, tree)
        finally:
            self.depth -= 1

    # -- operators -----------------------------------------------------------------------

    def _ternary(self, tree: Tree) -> _Node:
        condition, when_true, when_false = (self.compile(child) for child in tree.children)
        ctype = self.operator(
            "_?_:_", (condition.ctype, when_true.ctype, when_false.ctype), tree.children[1]
        )
        if condition.is_const and type(condition.value) is bool:
            return _typed(when_true if condition.value else when_false, ctype)
        cf, tf, ff = condition.fn, when_true.fn, when_false.fn

        def ternary(act: Any, cf: Evaluator = cf, tf: Evaluator = tf, ff: Evaluator = ff) -> Any:
            test = cf(act)
            if test is True:
                return tf(act)
            if test is False:
                return ff(act)
            raise no_overload("_?_:_", test)

        return _Node(ternary, ctype=ctype)

    def _logical(self, tree: Tree) -> _Node:
        rule = tree.data
        operand_trees: list[Tree] = []
        while tree.data == rule and len(tree.children) == 2:
            operand_trees.append(tree.children[1])
            tree = tree.children[0]
        operand_trees.append(tree)
        operand_trees.reverse()
        self.count(tree, len(operand_trees) - 2)
        decisive = rule == "conditionalor"
        symbol = "||" if decisive else "&&"
        nodes = [self.compile(operand) for operand in operand_trees]
        for at, node in enumerate(nodes):
            if node.ctype not in (BOOL, DYN):
                other = nodes[at - 1 if at else min(1, len(nodes) - 1)].ctype
                pair = (other, node.ctype) if at else (node.ctype, other)
                self.operator(symbol, pair, operand_trees[at])
        if any(node.is_const and node.value is decisive for node in nodes):
            return _const(decisive, BOOL)  # decides the result whatever the others do
        # A constant identity operand (true for &&, false for ||) can be dropped.
        fns = [n.fn for n in nodes if not (n.is_const and n.value is (not decisive))]
        if not fns:
            return _const(not decisive, BOOL)
        return _Node(_make_logical(tuple(fns), decisive, symbol), ctype=BOOL)

    def _binary(self, tree: Tree) -> _Node:
        rule = tree.data
        steps: list[tuple[str, Tree]] = []
        while tree.data == rule and len(tree.children) == 2:
            operator_tree, right = tree.children
            steps.append((_BINARY_SYMBOLS[operator_tree.data], right))
            tree = operator_tree.children[0]
        steps.reverse()
        self.count(tree, len(steps) - 1)
        accumulated = self.compile(tree)
        ctype = accumulated.ctype
        pending: list[tuple[str, _Node]] = []
        for symbol, right_tree in steps:
            right = self.compile(right_tree)
            ctype = self.operator(symbol, (ctype, right.ctype), right_tree)
            if not pending and accumulated.is_const and right.is_const:
                folded = _fold(ctype, BINARY_OPERATORS[symbol], accumulated.value, right.value)
                if folded is not None:
                    accumulated = folded
                    continue
            pending.append((symbol, right))
        if not pending:
            return _typed(accumulated, ctype)
        symbol, right = pending[0]
        first = _make_binary(symbol, accumulated, right)
        if len(pending) == 1:
            return _Node(first, ctype=ctype)
        rest = tuple((BINARY_OPERATORS[s], node.fn) for s, node in pending[1:])
        return _Node(_make_chain(first, rest), ctype=ctype)

    def _unary(self, tree: Tree) -> _Node:
        ops: list[Callable[[Any], Any]] = []
        while tree.data == "unary" and len(tree.children) == 2:
            ops.append(logical_not if tree.children[0].data == "unary_not" else negate)
            tree = tree.children[1]
        self.count(tree, len(ops) - 1)
        ops.reverse()  # innermost operator applies first
        operand = self.compile(tree)
        ctype = operand.ctype
        for op in ops:
            ctype = self.operator(_UNARY_SYMBOLS[op], (ctype,), tree)
        if operand.is_const:
            folded = _fold(ctype, _make_unary(lambda act: operand.value, tuple(ops)), None)
            if folded is not None:
                return folded
        return _Node(_make_unary(operand.fn, tuple(ops)), ctype=ctype)

    # -- names and members ---------------------------------------------------------------

    def _ident(self, tree: Tree) -> _Node:
        token = cast(Token, tree.children[0])
        name = str(token)
        root_only = tree.data == "dot_ident"
        if name in self.loop_vars and not root_only:
            return _Node(self._variable(name, token), ctype=self._loop_type(name))
        return self._resolve(name, tree if root_only else token, root_only)

    def _loop_type(self, name: str) -> CelT:
        """The static type of the innermost comprehension variable called ``name``."""
        for variable, ctype in zip(
            reversed(self.loop_vars), reversed(self.loop_types), strict=True
        ):
            if variable == name:
                return ctype
        return DYN  # pragma: no cover - only called for a loop variable

    def _candidates(self, name: str, root_only: bool) -> list[str]:
        """The names ``name`` may mean in the container, most qualified first."""
        if root_only or not self.declarations.container:
            return [name]
        parts = self.declarations.container.split(".")
        return [".".join((*parts[:n], name)) for n in range(len(parts), -1, -1)]

    def _lookup(self, name: str, root_only: bool) -> str | None:
        """The declared variable ``name`` resolves to, if any."""
        for candidate in self._candidates(name, root_only):
            if candidate in self.declared:
                return candidate
        return None

    def _resolve(self, name: str, where: Tree | Token, root_only: bool) -> _Node:
        """An identifier: a declared variable, else a type denotation (``int``)."""
        found = self._lookup(name, root_only)
        if found is not None:
            fn = self._variable(found, where, declared_only=True)  # type: ignore[arg-type]
            return _Node(fn, ctype=self.types.get(found, DYN))
        denoted = TYPES.get(name)
        if denoted is not None:
            return _const(denoted, TYPE)
        raise self.error(f"unknown variable '{name}'", where)

    def _qualified(self, tree: Tree) -> tuple[list[str], bool] | None:
        """The names of a selection chain ``a.b.c`` (or ``.a.b.c``: root_only), else None."""
        parts: list[str] = []
        tree = _descend(tree)
        while tree.data == "member_dot":
            operand, field = tree.children
            field_token = cast(Token, field)  # IDENT, or a reserved word's token
            if field_token.type != "IDENT":
                return None
            parts.append(str(field_token))
            tree = _descend(operand)
        if tree.data not in ("ident", "dot_ident"):
            return None
        parts.append(str(tree.children[0]))
        parts.reverse()
        return parts, tree.data == "dot_ident"

    def _variable(self, name: str, token: Token, declared_only: bool = False) -> Evaluator:
        """A comprehension variable (unless ``declared_only``: a resolved declared name)."""
        if name in self.loop_vars and not declared_only:
            return lambda act, name=name: act[name]  # the comprehension frame always holds it
        if name not in self.declared:
            raise self.error(f"unknown variable '{name}'", token)
        self.referenced.add(name)
        if self.loop_vars:  # inside a comprehension the activation is a _Frame

            def frame_variable(act: Any, name: str = name) -> Any:
                try:
                    return act.root[name]
                except KeyError:
                    raise CelEvaluationError(f"no value for variable '{name}'") from None

            return frame_variable

        def variable(act: Any, name: str = name) -> Any:
            try:
                return act[name]
            except KeyError:
                raise CelEvaluationError(f"no value for variable '{name}'") from None

        return variable

    def _check_field(self, operand_tree: Tree, field_token: Token) -> None:
        """``var.f`` on a declared variable with known fields: ``f`` must be one of them."""
        operand = _descend(operand_tree)
        if operand.data != "ident":
            return
        name = str(operand.children[0])
        if name in self.loop_vars or name not in self.declared:
            return
        fields = self.declared[name]
        if fields is not None and _field_name(field_token) not in fields:
            raise self.error(f"unknown field '{field_token}' on '{name}'", field_token)

    def _select_qualified(self, tree: Tree) -> _Node | None:
        """``a.b.c`` where a dotted prefix of at least two names is a declared variable or
        the whole is a type name (``google.protobuf.Timestamp``); else None."""
        qualified = self._qualified(tree)
        if qualified is None:
            return None
        parts, root_only = qualified
        if not root_only and parts[0] in self.loop_vars:
            return None  # a comprehension variable shadows every qualified name
        for length in range(len(parts), 1, -1):
            found = self._lookup(".".join(parts[:length]), root_only)
            if found is None:
                continue
            fn = self._variable(found, cast(Token, tree.children[1]), declared_only=True)
            ctype = self.types.get(found, DYN)
            for field_name in parts[length:]:
                fn = _make_select(fn, field_name)
                ctype = self._field_type(ctype, field_name, tree)
            return _Node(fn, ctype=ctype)
        denoted = TYPES.get(".".join(parts))
        return _const(denoted, TYPE) if denoted is not None else None

    def _field_type(self, ctype: CelT, name: str, where: Tree | Token) -> CelT:
        """The static type of ``x.name`` for an ``x`` of type ``ctype``."""
        if ctype.kind == "dyn":
            return DYN
        if ctype.kind == "map":
            if ctype.fields is not None:
                # A declared record (subject.external, ...): only its fields exist, at any
                # depth, as for the declared variables themselves (see _check_field).
                found = ctype.field(name)
                if found is None:
                    known = ", ".join(field for field, _ in ctype.fields)
                    return self.refuse(f"unknown field '{name}' (known: {known})", where)
                return found
            return ctype.params[1]
        if ctype.kind == "optional_type":  # o.f is o.?f
            return optional_of(_unwrap(self._field_type(ctype.params[0], name, where)))
        return self.refuse(f"type '{ctype}' does not support field selection", where)

    def _select(self, tree: Tree) -> _Node:
        qualified = self._select_qualified(tree)
        if qualified is not None:
            return qualified
        operand_tree, field = tree.children
        field_token = cast(Token, field)  # the grammar's IDENT
        operand = self.compile(operand_tree)
        self._check_field(operand_tree, field_token)
        name = _field_name(field_token)
        ctype = self._field_type(operand.ctype, name, field_token)
        if operand.is_const:
            folded = _fold(ctype, select_field, operand.value, name)
            if folded is not None:
                return folded
        return _Node(_make_select(operand.fn, name), ctype=ctype)

    def _select_optional(self, tree: Tree) -> _Node:
        """``x.?f``: the field as an optional, empty when absent."""
        operand_tree, field = tree.children
        field_token = cast(Token, field)  # the grammar's IDENT
        operand = self.compile(operand_tree)
        self._check_field(operand_tree, field_token)
        name = _field_name(field_token)
        ctype = optional_of(_unwrap(self._field_type(_unwrap(operand.ctype), name, field_token)))
        of = operand.fn
        return _Node(lambda act, of=of, name=name: optional_select(of(act), name), ctype=ctype)

    def _index_optional(self, tree: Tree) -> _Node:
        """``x[?k]``: the element or entry as an optional, empty when absent."""
        container, key = (self.compile(child) for child in tree.children)
        element = self.operator("_[_]", (_unwrap(container.ctype), key.ctype), tree.children[1])
        return _Node(
            _make_call(optional_index, (container, key)), ctype=optional_of(_unwrap(element))
        )

    def _index(self, tree: Tree) -> _Node:
        container, key = (self.compile(child) for child in tree.children)
        ctype = self.operator("_[_]", (container.ctype, key.ctype), tree.children[1])
        if container.is_const and key.is_const:
            folded = _fold(ctype, index, container.value, key.value)
            if folded is not None:
                return folded
        return _Node(_make_call(index, (container, key)), ctype=ctype)

    def _unsupported(self, tree: Tree) -> _Node:
        if tree.data == "member_object":
            raise self.error("message construction (Type{field: value}) is not supported", tree)
        raise self.error("leading-dot function calls (.f(x)) are not supported", tree)

    # -- literals --------------------------------------------------------------------------

    def _literal(self, tree: Tree) -> _Node:
        token = cast(Token, tree.children[0])
        kind = token.type
        ctype = _LITERAL_TYPES.get(kind, DYN)
        try:
            if kind == "INT_LIT":
                return _const(parse_int(token.value), ctype)
            if kind == "UINT_LIT":
                return _const(parse_uint(token.value), ctype)
            if kind == "FLOAT_LIT":
                return _const(float(token.value), ctype)
            if kind in ("STRING_LIT", "MLSTRING_LIT", "BYTES_LIT"):
                return _const(parse_string(token.value), ctype)
            if kind == "BOOL_LIT":
                return _const(token.value == "true", ctype)
            if kind == "NULL_LIT":
                return _const(None, ctype)
        except ValueError as exc:
            raise self.error(str(exc), token) from None
        raise self.error(f"unsupported literal {token.value!r}", token)  # pragma: no cover

    def _list(self, tree: Tree) -> _Node:
        children = tree.children[0].children if tree.children else []
        if any(child.data == "opt_expr" for child in children):
            return self._list_with_optionals(children)
        elements = [self.compile(child) for child in children]
        ctype = list_of(join(e.ctype for e in elements) or DYN)  # mixed elements: list(dyn)
        if all(e.is_const for e in elements):
            return _const(tuple(e.value for e in elements), ctype)
        fns = tuple(e.fn for e in elements)
        return _Node(lambda act, fns=fns: [fn(act) for fn in fns], ctype=ctype)

    def _optional_entry(self, tree: Tree, is_key: bool = False) -> tuple[_Node, bool]:
        """A list element or map key that may be marked ``?``: its node and whether it was
        marked (an element's value, or the key's map value, must then be an optional: only a
        present one is included)."""
        if tree.data != "opt_expr":
            return self.compile(tree), False
        node = self.compile(tree.children[0])
        if not is_key and node.ctype.kind not in ("optional_type", "dyn"):
            self.refuse(f"an optional entry (?x) needs an optional, not '{node.ctype}'", tree)
        return node, True

    def _list_with_optionals(self, children: list[Tree]) -> _Node:
        entries = [self._optional_entry(child) for child in children]
        types = [_unwrap(node.ctype) if optional else node.ctype for node, optional in entries]
        parts = tuple((node.fn, optional) for node, optional in entries)

        def build(act: Any, parts: tuple[tuple[Evaluator, bool], ...] = parts) -> list[Any]:
            out = []
            for fn, optional in parts:
                value = fn(act)
                if not optional:
                    out.append(value)
                elif _present(value):
                    out.append(value.value)
            return out

        return _Node(build, ctype=list_of(join(types) or DYN))

    def _map(self, tree: Tree) -> _Node:
        children = tree.children[0].children if tree.children else []
        if any(child.data == "opt_expr" for child in children[::2]):
            return self._map_with_optionals(children)
        nodes = [self.compile(child) for child in children]
        pairs = list(zip(nodes[::2], nodes[1::2], strict=True))
        ctype = map_of(
            join(k.ctype for k, _ in pairs) or DYN, join(v.ctype for _, v in pairs) or DYN
        )
        if all(k.is_const and v.is_const for k, v in pairs):
            folded = _fold(ctype, build_map, [(k.value, v.value) for k, v in pairs])
            if folded is not None:
                return folded
        fn_pairs = tuple((k.fn, v.fn) for k, v in pairs)
        return _Node(
            lambda act, fn_pairs=fn_pairs: build_map([(kf(act), vf(act)) for kf, vf in fn_pairs]),
            ctype=ctype,
        )

    def _map_with_optionals(self, children: list[Tree]) -> _Node:
        keys = [self._optional_entry(child, is_key=True) for child in children[::2]]
        values = [self.compile(child) for child in children[1::2]]
        for (_, optional), value, value_tree in zip(keys, values, children[1::2], strict=True):
            if optional and value.ctype.kind not in ("optional_type", "dyn"):
                self.refuse(
                    f"an optional entry (?k: v) needs an optional value, not '{value.ctype}'",
                    value_tree,
                )
        value_types = [
            _unwrap(value.ctype) if optional else value.ctype
            for (_, optional), value in zip(keys, values, strict=True)
        ]
        ctype = map_of(join(k.ctype for k, _ in keys) or DYN, join(value_types) or DYN)
        parts = tuple(
            (key.fn, value.fn, optional)
            for (key, optional), value in zip(keys, values, strict=True)
        )

        def build(
            act: Any, parts: tuple[tuple[Evaluator, Evaluator, bool], ...] = parts
        ) -> dict[Any, Any]:
            pairs = []
            for kf, vf, optional in parts:
                key, value = kf(act), vf(act)
                if not optional:
                    pairs.append((key, value))
                elif _present(value):
                    pairs.append((key, value.value))
            return build_map(pairs)

        return _Node(build, ctype=ctype)

    # -- calls and macros --------------------------------------------------------------------

    def _global_call(self, tree: Tree) -> _Node:
        name_token = cast(Token, tree.children[0])
        args = list(tree.children[1].children) if len(tree.children) > 1 else []
        return self._call(name_token, None, args)

    def _method_call(self, tree: Tree) -> _Node:
        receiver, name_token = tree.children[0], cast(Token, tree.children[1])
        args = list(tree.children[2].children) if len(tree.children) > 2 else []
        return self._call(name_token, receiver, args)

    def _check_arity(
        self, name: str, token: Token, arities: frozenset[int] | tuple[int, ...], got: int
    ) -> None:
        if got not in arities:
            expected = " or ".join(str(a) for a in sorted(arities))
            raise self.error(
                f"wrong number of arguments to '{name}': expected {expected}, got {got}", token
            )

    def _namespace(self, receiver: Tree) -> str | None:
        """The namespace ``receiver`` names when it is a qualified name (``optional`` in
        ``optional.of(x)``, ``math`` in ``math.greatest(...)``) rather than a loop variable."""
        qualified = self._qualified(receiver)
        if qualified is None or qualified[1] or qualified[0][0] in self.loop_vars:
            return None
        return ".".join(qualified[0])

    def _call(self, name_token: Token, receiver: Tree | None, args: list[Tree]) -> _Node:
        name = str(name_token)
        namespace = None
        if receiver is not None and name in _NAMESPACED:
            # A namespaced function (``math.least``) takes precedence over a method call on a
            # variable of the namespace's name, as in cel-go.
            namespace = self._namespace(receiver)
            if namespace is not None and f"{namespace}.{name}" in GLOBALS:
                return self._call_function(
                    f"{namespace}.{name}", GLOBALS[f"{namespace}.{name}"], name_token, None, args
                )
        if receiver is not None and namespace == "cel" and name == "bind":
            return self._bind(name_token, args)
        if receiver is not None and name in _TWO_VARIABLE and len(args) in _TWO_VARIABLE[name]:
            return self._comprehension2(name, name_token, receiver, args)
        if receiver is not None and name == "existsOne":  # cel-go's name for exists_one
            return self._comprehension("exists_one", name_token, receiver, args)
        if receiver is not None and name in _COMPREHENSIONS:
            return self._comprehension(name, name_token, receiver, args)
        if receiver is not None and name in ("optMap", "optFlatMap"):
            return self._optional_map(name, name_token, receiver, args)
        if receiver is not None and name in ("transformList", "transformMap"):
            self._check_arity(name, name_token, _TWO_VARIABLE[name], len(args))
        if receiver is None and name == "has":
            return self._has(name_token, args)
        function = (GLOBALS if receiver is None else METHODS).get(name) or FUNCTIONS.get(name)
        if function is None:
            if name in MACRO_ARITIES:
                style = "a function: has(a.b)" if name == "has" else f"a method: list.{name}(...)"
                raise self.error(f"'{name}' must be called as {style}", name_token)
            what = "function" if receiver is None else "method"
            raise self.error(f"unknown {what} '{name}'", name_token)
        return self._call_function(name, function, name_token, receiver, args)

    def _call_function(
        self,
        name: str,
        function: Function,
        name_token: Token,
        receiver: Tree | None,
        args: list[Tree],
    ) -> _Node:
        if receiver is not None and not function.as_method:
            raise self.error(f"'{name}' is not a method; call it as {name}(...)", name_token)
        if receiver is None and not function.as_global:
            raise self.error(f"'{name}' must be called as a method: x.{name}(...)", name_token)
        receiver_count = 0 if receiver is None else 1
        self._check_arity(
            name,
            name_token,
            frozenset(a - receiver_count for a in function.arities),
            len(args),
        )
        arg_trees = ([receiver] if receiver is not None else []) + args
        return self._apply(function, arg_trees, name_token)

    def _apply(self, function: Function, arg_trees: list[Tree], where: Token) -> _Node:
        nodes: list[_Node] = []
        argument_types: list[CelT] = []
        for position, arg_tree in enumerate(arg_trees):
            node = self.compile(arg_tree)
            argument_types.append(node.ctype)
            prepare = function.preparers[position] if position < len(function.preparers) else None
            if prepare is not None:
                if node.is_const:
                    try:
                        prepared = prepare(node.value)
                    except CelEvaluationError as exc:
                        raise self.error(exc.message, arg_tree) from None
                    node = _Node(lambda act, v=prepared: v, True, prepared)
                else:
                    node = _Node(_prepared(node.fn, prepare))
            nodes.append(node)
        if function.check is not None:
            found = function.check(argument_types)
            if found is None:
                kinds = ", ".join(str(t) for t in argument_types)
                message = f"no matching overload for '{function.name}' applied to ({kinds})"
                found = self.refuse(message, where)
            ctype = found
        else:
            ctype = self.overload(function.name, function.signatures, argument_types, where)
        if function.lazy:
            return _Node(_make_lazy_call(function.impl, nodes), ctype=ctype)
        if all(n.is_const for n in nodes):
            folded = _fold(ctype, function.impl, *(n.value for n in nodes))
            if folded is not None:
                return folded
        return _Node(_make_call(function.impl, nodes), ctype=ctype)

    def _has(self, name_token: Token, args: list[Tree]) -> _Node:
        self._check_arity("has", name_token, MACRO_ARITIES["has"], len(args))
        selection = _descend(args[0])
        if selection.data != "member_dot":
            raise self.error("has() argument must be a field selection such as has(a.b)", args[0])
        operand_tree, field = selection.children
        field_token = cast(Token, field)  # the grammar's IDENT
        operand = self.compile(operand_tree)
        self._check_field(operand_tree, field_token)
        name = _field_name(field_token)
        if operand.ctype.kind not in ("map", "dyn", "optional_type"):
            self.refuse(f"type '{operand.ctype}' does not support field selection", field_token)
        of = operand.fn

        def has(act: Any, of: Evaluator = of, name: str = name) -> bool:
            obj = of(act)
            if type(obj) is dict:
                return name in obj
            return has_field(obj, name)

        return _Node(has, ctype=BOOL)

    def _optional_map(
        self, name: str, name_token: Token, target_tree: Tree, args: list[Tree]
    ) -> _Node:
        """``o.optMap(v, e)`` (an optional of ``e``) and ``o.optFlatMap(v, e)`` (``e``, an
        optional), with ``v`` bound to ``o``'s value; an empty ``o`` gives an empty optional."""
        self._check_arity(name, name_token, EXTENSION_MACRO_ARITIES[name], len(args))
        variable_tree = _descend(args[0])
        if variable_tree.data != "ident":
            raise self.error(f"{name}() needs a simple variable name first", args[0])
        variable = str(variable_tree.children[0])
        target = self.compile(target_tree)
        if target.ctype.kind not in ("optional_type", "dyn"):
            self.refuse(f"{name}() needs an optional, not '{target.ctype}'", target_tree)
        new_frame = _nested_frame if self.loop_vars else _top_frame
        (body,) = self._scoped(((variable, _unwrap(target.ctype)),), args[1:], loop=False)
        flat = name == "optFlatMap"
        if flat and body.ctype.kind not in ("optional_type", "dyn"):
            self.refuse(f"optFlatMap() needs an optional result, not '{body.ctype}'", args[1])
        ctype = (
            (body.ctype if body.ctype.kind == "optional_type" else optional_of(DYN))
            if flat
            else optional_of(body.ctype)
        )

        def optional_map(
            act: Any,
            target: Evaluator = target.fn,
            variable: str = variable,
            new_frame: Evaluator = new_frame,
            body: Evaluator = body.fn,
            flat: bool = flat,
            name: str = name,
        ) -> Any:
            optional = target(act)
            if type(optional) is not Optional:
                raise no_overload(name, optional)
            if not optional.has_value():
                return optional
            frame = new_frame(act)
            frame[variable] = optional.value
            result = body(frame)
            if not flat:
                return Optional(result)
            if type(result) is not Optional:
                raise no_overload(name, optional, result)
            return result

        return _Node(optional_map, ctype=ctype)

    def _check_nesting(self, name_token: Token) -> None:
        if self.comprehensions + 1 > self.limits.max_comprehension_nesting:
            raise self.error(
                f"comprehensions nested more than {self.limits.max_comprehension_nesting} deep",
                name_token,
            )

    def _scoped(
        self, variables: tuple[tuple[str, CelT], ...], bodies: list[Tree], loop: bool
    ) -> list[_Node]:
        """``bodies`` compiled with ``variables`` (name, type) in scope."""
        count = len(variables)
        self.loop_vars += tuple(name for name, _ in variables)
        self.loop_types += tuple(ctype for _, ctype in variables)
        self.comprehensions += loop
        try:
            return [self.compile(body) for body in bodies]
        finally:
            self.loop_vars = self.loop_vars[:-count]
            self.loop_types = self.loop_types[:-count]
            self.comprehensions -= loop

    def _variable_name(self, name: str, tree: Tree) -> str:
        variable_tree = _descend(tree)
        if variable_tree.data != "ident":
            raise self.error(f"{name}() needs a simple variable name first", tree)
        return str(variable_tree.children[0])

    def _bind(self, name_token: Token, args: list[Tree]) -> _Node:
        """``cel.bind(v, init, e)``: ``e`` with ``v`` bound to ``init`` (evaluated once)."""
        self._check_arity("cel.bind", name_token, (3,), len(args))
        variable = self._variable_name("cel.bind", args[0])
        init = self.compile(args[1])
        new_frame = _nested_frame if self.loop_vars else _top_frame
        (body,) = self._scoped(((variable, init.ctype),), args[2:], loop=False)

        def bind(
            act: Any,
            init: Evaluator = init.fn,
            variable: str = variable,
            new_frame: Evaluator = new_frame,
            body: Evaluator = body.fn,
        ) -> Any:
            value = init(act)
            frame = new_frame(act)
            frame[variable] = value
            return body(frame)

        return _Node(bind, ctype=body.ctype)

    def _comprehension2(
        self, name: str, name_token: Token, target_tree: Tree, args: list[Tree]
    ) -> _Node:
        """The two-variable comprehensions (cel-go's ext.TwoVarComprehensions): ``all``,
        ``exists``, ``existsOne`` (``(i, v, p)``), ``transformList`` and ``transformMap``
        (``(i, v[, filter], e)``); ``i``/``v`` are a list's index and element or a map's key
        and value."""
        first = self._variable_name(name, args[0])
        second = self._variable_name(name, args[1])
        if first == second:
            raise self.error(f"{name}() needs two different variable names", args[1])
        target = self.compile(target_tree)
        self._check_nesting(name_token)
        new_frame = _nested_frame if self.loop_vars else _top_frame
        kind = target.ctype.kind
        if kind == "list":
            types = (INT, target.ctype.params[0])
        elif kind == "map":
            types = (target.ctype.params[0], target.ctype.params[1])
        else:
            if kind != "dyn":
                self.refuse(
                    f"{name}() cannot range over a value of type '{target.ctype}'", target_tree
                )
            types = (DYN, DYN)
        bodies = self._scoped(((first, types[0]), (second, types[1])), args[2:], loop=True)
        transform = name.startswith("transform")
        predicates = bodies[:-1] if transform else bodies
        for body, body_tree in zip(predicates, args[2:], strict=False):
            if body.ctype not in (BOOL, DYN):
                self.refuse(f"{name}() needs a bool predicate, not '{body.ctype}'", body_tree)
        if name == "transformList":
            ctype = list_of(bodies[-1].ctype)
        elif name == "transformMap":
            ctype = map_of(types[0], bodies[-1].ctype)
        else:
            ctype = BOOL
        fns = tuple(body.fn for body in bodies)
        build = _build_two_variable(name, target.fn, (first, second), new_frame, fns)
        return _Node(build, ctype=ctype)

    def _comprehension(
        self, name: str, name_token: Token, target_tree: Tree, args: list[Tree]
    ) -> _Node:
        self._check_arity(name, name_token, MACRO_ARITIES[name], len(args))
        variable_tree = _descend(args[0])
        if variable_tree.data != "ident":
            raise self.error(f"{name}() needs a simple variable name first", args[0])
        variable = str(variable_tree.children[0])
        target = self.compile(target_tree)
        self._check_nesting(name_token)
        new_frame = _nested_frame if self.loop_vars else _top_frame
        if target.ctype.kind not in ("list", "map", "dyn"):
            self.refuse(f"{name}() cannot range over a value of type '{target.ctype}'", target_tree)
        element = elements(target.ctype)
        bodies = self._scoped(((variable, element),), args[1:], loop=True)
        # Every body but map's transform is a predicate.
        predicates = bodies if name != "map" else bodies[:-1]
        for body, body_tree in zip(predicates, args[1:], strict=False):
            if body.ctype not in (BOOL, DYN):
                self.refuse(f"{name}() needs a bool predicate, not '{body.ctype}'", body_tree)
        if name == "map":
            ctype = list_of(bodies[-1].ctype)
        elif name == "filter":
            ctype = list_of(element)
        else:
            ctype = BOOL
        build = _COMPREHENSIONS[name]
        fns = [body.fn for body in bodies]
        return _Node(build(name, target.fn, variable, new_frame, *fns), ctype=ctype)


# Each rule's handler, as a plain function of (compiler, tree): built once, and no compiler
# holds a table of bound methods of itself (a reference cycle per compilation, left to the
# cyclic collector at tens of thousands of conditions).
_HANDLERS: dict[str, Callable[[_Compiler, Tree], _Node]] = {
    "expr": _Compiler._ternary,
    "conditionalor": _Compiler._logical,
    "conditionaland": _Compiler._logical,
    "relation": _Compiler._binary,
    "addition": _Compiler._binary,
    "multiplication": _Compiler._binary,
    "unary": _Compiler._unary,
    "member_dot": _Compiler._select,
    "member_dot_opt": _Compiler._select_optional,
    "member_index_opt": _Compiler._index_optional,
    "member_dot_arg": _Compiler._method_call,
    "member_index": _Compiler._index,
    "member_object": _Compiler._unsupported,
    "dot_ident": _Compiler._ident,
    "dot_ident_arg": _Compiler._unsupported,
    "ident_arg": _Compiler._global_call,
    "ident": _Compiler._ident,
    "literal": _Compiler._literal,
    "list_lit": _Compiler._list,
    "map_lit": _Compiler._map,
}
