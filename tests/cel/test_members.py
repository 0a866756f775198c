"""Variables, field selection, indexing, has(), and the ``variables`` set."""

from __future__ import annotations

from collections import OrderedDict
from types import MappingProxyType

import pytest

from policy_engine.cel import CelEvaluationError, Declarations, compile_expression
from tests.cel.support import ACTIVATION, compile_cel, ev, ev_error


def test_variable_lookup() -> None:
    assert ev("i") == 7
    assert ev("subject") == ACTIVATION["subject"]


def test_missing_variable_in_activation() -> None:
    expression = compile_cel("s + 'x'")
    with pytest.raises(CelEvaluationError, match="no value for variable 's'"):
        expression.evaluate({})


def test_missing_variable_inside_a_comprehension() -> None:
    expression = compile_cel("l.all(x, x < i)")
    with pytest.raises(CelEvaluationError, match="no value for variable 'i'"):
        expression.evaluate({"l": [1]})


def test_activation_that_is_not_a_mapping() -> None:
    with pytest.raises(CelEvaluationError):
        compile_cel("i").evaluate(None)  # type: ignore[arg-type]


class TestSelect:
    def test_nested_fields(self) -> None:
        assert ev("subject.attributes.groups") == ["staff", "engineering"]
        assert ev("subject.attributes.level + 1") == 4

    def test_missing_key(self) -> None:
        assert ev_error("subject.attributes.teams") == "no such key: 'teams'"
        assert ev_error("m.zz") == "no such key: 'zz'"

    @pytest.mark.parametrize(
        ("source", "kind"),
        [("s.length", "string"), ("l.first", "list"), ("n.x", "null_type"), ("i.x", "int")],
    )
    def test_select_on_non_map(self, source: str, kind: str) -> None:
        field = source.split(".")[1]
        assert ev_error(source) == f"cannot select field '{field}' from a value of type {kind}"

    def test_other_mappings(self) -> None:
        assert ev("x.a", x=OrderedDict(a=1)) == 1
        assert ev("x.a", x=MappingProxyType({"a": 2})) == 2
        assert ev_error("x.b", x=OrderedDict(a=1)) == "no such key: 'b'"

    def test_free_form_variable_fields_are_not_checked(self) -> None:
        assert ev("m.a") == 1


class TestIndex:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("l[0]", 1),
            ("l[2]", 3),
            ('m["b"]', "x"),
            ('subject["attributes"]["level"]', 3),
            ("{1: 'one'}[1]", "one"),
            ("{1: 'one'}[1.0]", "one"),
            ("{true: 'yes'}[true]", "yes"),
            ("[[1, 2]][0][1]", 2),
        ],
    )
    def test_index(self, source: str, expected: object) -> None:
        assert ev(source) == expected

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("l[3]", "index out of range: 3"),
            ("l[-1]", "index out of range: -1"),
            ('m["zz"]', "no such key: 'zz'"),
            ("m[1]", "no such key: 1"),
            ("{1: 'one'}[true]", "no such key: True"),
            ("l[1.5]", "no matching overload for '_[_]' on (list, double)"),
            ("l[true]", "no matching overload for '_[_]' on (list, bool)"),
            ('l["0"]', "no matching overload for '_[_]' on (list, string)"),
            ("s[0]", "no matching overload for '_[_]' on (string, int)"),
            ("n[0]", "no matching overload for '_[_]' on (null_type, int)"),
        ],
    )
    def test_index_errors(self, source: str, message: str) -> None:
        assert ev_error(source) == message

    def test_runtime_index(self) -> None:
        assert ev("l[k]", k=1) == 2
        assert ev("x[k]", x={"a": 5}, k="a") == 5
        assert ev("x[k]", x=("a", "b"), k=1) == "b"


class TestHas:
    def test_present_and_absent(self) -> None:
        assert ev("has(m.a)") is True
        assert ev("has(m.zz)") is False
        assert ev("has(subject.attributes.level)") is True
        assert ev("has(subject.attributes.teams)") is False
        assert ev("has(x.a)", x=OrderedDict(a=None)) is True

    def test_has_errors_when_the_operand_fails(self) -> None:
        assert ev_error("has(subject.nope.x)".replace("nope", "attributes.none")) == (
            "no such key: 'none'"
        )
        assert ev_error("has(s.a)") == "has() cannot test field 'a' on a value of type string"
        assert ev_error("has(l.a)") == "has() cannot test field 'a' on a value of type list"


class TestVariablesSet:
    def test_referenced_declared_variables(self) -> None:
        expression = compile_cel('subject.id == "x" && now > now && s.startsWith("h")')
        assert expression.variables == frozenset({"subject", "now", "s"})

    def test_loop_variables_are_not_reported(self) -> None:
        assert compile_cel("l.all(x, x > i)").variables == frozenset({"l", "i"})

    def test_loop_variable_shadows_a_declared_variable(self) -> None:
        expression = compile_cel("l.exists(s, s == 2) && s == 'hello'")
        assert expression.variables == frozenset({"l", "s"})
        assert compile_cel("l.exists(s, s == 2)").variables == frozenset({"l"})
        assert ev("l.exists(s, s == 2) && s == 'hello'") is True

    def test_constant_expression(self) -> None:
        expression = compile_expression("1 + 1 == 2", Declarations({}))
        assert expression.variables == frozenset()
        assert expression.evaluate({}) is True
        assert expression.source == "1 + 1 == 2"

    def test_unevaluated_branches_still_count(self) -> None:
        assert compile_cel("false && i > 0").variables == frozenset({"i"})
