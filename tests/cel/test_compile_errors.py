"""Every kind of compile error, with its position, and the compile limits."""

from __future__ import annotations

import pytest

from policy_engine.cel import CelCompileError, CompileLimits, Declarations, compile_expression
from tests.cel.support import compile_cel, compile_error


@pytest.mark.parametrize(
    ("source", "message", "line", "column"),
    [
        # syntax
        ("1 +", "syntax error: unexpected end of expression", 1, 4),
        ("a ## b", "syntax error: unexpected character '#'", 1, 3),
        ("s ==\n  (i +)", "syntax error: unexpected ')'", 2, 7),
        ('"unterminated', "syntax error: unexpected character '\"'", 1, 1),
        ("", "syntax error: unexpected end of expression", 1, 1),
        ("l.all(x,)", "syntax error: unexpected ')'", 1, 9),
        # names
        ("sbject.id", "unknown variable 'sbject'", 1, 1),
        ('subject.id == "x" &&\n  sbject.name == "y"', "unknown variable 'sbject'", 2, 3),
        ("subject.nme", "unknown field 'nme' on 'subject'", 1, 9),
        ("has(subject.nme)", "unknown field 'nme' on 'subject'", 1, 13),
        ("integration.name", "unknown field 'name' on 'integration'", 1, 13),
        ("l.all(x, x > y)", "unknown variable 'y'", 1, 14),
        ("l.all(x, true) && x", "unknown variable 'x'", 1, 19),
        # functions
        ("foo(1)", "unknown function 'foo'", 1, 1),
        ("s.foo()", "unknown method 'foo'", 1, 3),
        ("s.\n  startswith('a')", "unknown method 'startswith'", 2, 3),
        ("size(s, s)", "wrong number of arguments to 'size': expected 1, got 2", 1, 1),
        ("s.size(1)", "wrong number of arguments to 'size': expected 0, got 1", 1, 3),
        ("s.startsWith()", "wrong number of arguments to 'startsWith': expected 1, got 0", 1, 3),
        ("now.getHours(1, 2)",
         "wrong number of arguments to 'getHours': expected 0 or 1, got 2",
         1, 5),
        ("matches(s)", "wrong number of arguments to 'matches': expected 2, got 1", 1, 1),
        ("startsWith(s, 'a')", "'startsWith' must be called as a method: x.startsWith(...)", 1, 1),
        ("s.int()", "'int' is not a method; call it as int(...)", 1, 3),
        # macros
        ("has(m.a, m.b)", "wrong number of arguments to 'has': expected 1, got 2", 1, 1),
        ("has(m)", "has() argument must be a field selection such as has(a.b)", 1, 5),
        ("has(m['a'])", "has() argument must be a field selection such as has(a.b)", 1, 5),
        ("l.all(x)", "wrong number of arguments to 'all': expected 2, got 1", 1, 3),
        ("l.map(x, x, x, x)", "wrong number of arguments to 'map': expected 2 or 3, got 4", 1, 3),
        ("l.exists(1, true)", "exists() needs a simple variable name first", 1, 10),
        ("l.filter(x.y, true)", "filter() needs a simple variable name first", 1, 10),
        ("all(l, true)", "'all' must be called as a method: list.all(...)", 1, 1),
        ("m.has(a)", "'has' must be called as a function: has(a.b)", 1, 3),
        # unsupported syntax
        ("Foo{a: 1}", "message construction (Type{field: value}) is not supported", 1, 1),
        ("s == .x", "unknown variable 'x'", 1, 6),  # .x: x in the root scope only
        (".f(1)", "leading-dot function calls (.f(x)) are not supported", 1, 1),
        # literal arguments validated at compile time
        ('s.matches("(")',
         "invalid regular expression '(': missing ): (",
         1, 11),
        ('matches(s, "[a-")',
         "invalid regular expression '[a-': missing ]: [a-",
         1, 12),
        ('ip.inCidr("10.0.0.0/33")', "invalid CIDR: '10.0.0.0/33'", 1, 11),
        ('inCidr(ip, "nope")', "invalid CIDR: 'nope'", 1, 12),
        ('now.timeOfDay("Mars/Base")', "unknown time zone: 'Mars/Base'", 1, 15),
        ('now.getDayOfWeek("")', "unknown time zone: ''", 1, 18),
        ('now.betweenHours("7:00", "09:00", "UTC")',
         "invalid time of day '7:00': expected HH:MM, 00:00-23:59",
         1, 18),
        ("s.glob(1)", "expected a string glob pattern, got int", 1, 8),
        # literals
        ("9223372036854775808", "int literal out of range: 9223372036854775808", 1, 1),
        ('"\\z"', "invalid escape sequence: \\z", 1, 1),
    ],
)  # fmt: skip
def test_compile_errors(source: str, message: str, line: int, column: int) -> None:
    error = compile_error(source)
    assert (error.message, error.line, error.column) == (message, line, column)


def test_error_str_includes_position() -> None:
    error = compile_error("s ==\n  nope")
    assert str(error) == "unknown variable 'nope' (line 2, column 3)"


def test_errors_in_unevaluated_branches_are_still_reported() -> None:
    assert compile_error("false && nope").message == "unknown variable 'nope'"
    assert compile_error("true || s.matches('(')").message.startswith("invalid regular")
    assert compile_error("true ? 1 : foo()").message == "unknown function 'foo'"


def test_regex_literal_is_compiled_once() -> None:
    # A literal pattern is prepared at compile time; evaluation never sees the string.
    expression = compile_cel('s.matches("^h")')
    assert expression.evaluate({"s": "hi"}) is True


class TestLimits:
    def test_expression_length(self) -> None:
        limits = CompileLimits(max_expression_length=20)
        source = "s == 'abc' ||\n  s == 'defghijk'"
        error = compile_error(source, limits)
        assert error.message == "expression longer than 20 characters"
        assert (error.line, error.column) == (2, 7)
        compile_cel("s == 'abc' || i == 1", limits)  # exactly 20 characters is fine

    def test_default_length_limit(self) -> None:
        source = " || ".join(["s == 'x'"] * 400)
        assert len(source) > 4096
        error = compile_error(source)
        assert error.message == "expression longer than 4096 characters"

    def test_huge_expression_is_rejected_by_node_count(self) -> None:
        source = "1" + "+1" * 1200  # < 4096 characters, > 2000 nodes
        assert len(source) < 4096
        error = compile_error(source)
        assert error.message == "expression too large: more than 2000 nodes"

    def test_node_limit_counts_list_elements(self) -> None:
        limits = CompileLimits(max_ast_nodes=10)
        compile_cel("[1, 2, 3, 4, 5, 6, 7, 8, 9]", limits)
        assert compile_error("[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]", limits).message == (
            "expression too large: more than 10 nodes"
        )

    def test_comprehension_nesting(self) -> None:
        compile_cel("l.all(x, l.all(y, x + y > 0))")
        error = compile_error("l.all(x,\n  l.all(y,\n    l.all(z, x + y + z > 0)))")
        assert error.message == "comprehensions nested more than 2 deep"
        assert (error.line, error.column) == (3, 7)

    def test_pathological_nested_comprehension(self) -> None:
        source = "[0,1].all(a, " * 10 + "true" + ")" * 10
        assert compile_error(source).message == "comprehensions nested more than 2 deep"

    def test_comprehensions_in_the_range_do_not_nest(self) -> None:
        compile_cel("l.map(x, x).map(y, y).map(z, z).all(w, w > 0)")

    def test_nesting_limit_of_zero_disables_comprehensions(self) -> None:
        limits = CompileLimits(max_comprehension_nesting=0)
        assert compile_error("l.all(x, true)", limits).message == (
            "comprehensions nested more than 0 deep"
        )

    def test_deep_nesting(self) -> None:
        source = "[" * 150 + "]" * 150
        assert compile_error(source).message == "expression nested deeper than 100 levels"
        source = "s" + ".a" * 150
        assert compile_error(source).message == "expression nested deeper than 100 levels"
        source = "b ? 1 : " * 120 + "0"
        assert compile_error(source).message == "expression nested deeper than 100 levels"

    def test_shallow_long_chains_are_not_deep(self) -> None:
        # Operator chains are flattened: long, but neither deep to compile nor to evaluate.
        assert compile_cel(" && ".join(["b"] * 300)).evaluate({"b": True}) is True
        assert compile_cel(" + ".join(["1"] * 300)).evaluate({}) == 300
        assert compile_cel(" + ".join(["i"] * 300)).evaluate({"i": 2}) == 600
        assert compile_cel("!" * 301 + "b").evaluate({"b": True}) is False
        assert compile_cel("(" * 500 + "i" + ")" * 500).evaluate({"i": 1}) == 1

    def test_deepest_allowed_expression_evaluates(self) -> None:
        source = "[" * 99 + "i" + "]" * 99
        value = compile_cel(source).evaluate({"i": 1})
        for _ in range(99):
            value = value[0]
        assert value == 1

    def test_limits_apply_to_any_declarations(self) -> None:
        with pytest.raises(CelCompileError):
            compile_expression("x" * 5000, Declarations({"x" * 5000: None}))
