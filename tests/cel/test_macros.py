"""Comprehension macros: all, exists, exists_one, map, filter."""

from __future__ import annotations

import pytest

from tests.cel.support import compile_cel, ev, ev_error


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("l.all(x, x > 0)", True),
        ("l.all(x, x > 1)", False),
        ("e.all(x, false)", True),
        ("l.exists(x, x == 2)", True),
        ("l.exists(x, x == 5)", False),
        ("e.exists(x, true)", False),
        ("l.exists_one(x, x == 2)", True),
        ("l.exists_one(x, x > 1)", False),
        ("l.exists_one(x, x > 5)", False),
        ("e.exists_one(x, true)", False),
        ('subject.attributes.groups.exists(g, g.startsWith("eng"))', True),
        ('m.all(k, k in ["a", "b"])', True),
        ('m.exists(k, k == "b")', True),
        ("m.exists_one(k, m[k] == 1)", True),
    ],
)
def test_quantifiers(source: str, expected: bool) -> None:
    assert ev(source) is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("l.map(x, x * x)", [1, 4, 9]),
        ("l.map(x, x > 1, x * 10)", [20, 30]),
        ("l.filter(x, x % 2 == 1)", [1, 3]),
        ("e.map(x, x)", []),
        ("e.filter(x, true)", []),
        ("m.map(k, k + k)", ["aa", "bb"]),
        ("m.filter(k, m[k] == 1)", ["a"]),
        ("[1, 2].map(x, [x, x])", [[1, 1], [2, 2]]),
        ("l.map(x, x * 2).filter(y, y > 2)", [4, 6]),
        ("l.map(x, x).all(x, x > 0)", True),
    ],
)
def test_map_and_filter(source: str, expected: object) -> None:
    assert ev(source) == expected


class TestErrorAbsorption:
    def test_all_absorbs_errors_when_an_element_is_false(self) -> None:
        assert ev("[0, 1].all(x, 1 / x > 5)") is False  # 1/0 fails, 1/1 > 5 is false
        assert ev("[1, 0].all(x, 1 / x > 5)") is False
        assert ev('[1, "a"].all(x, x > 5)') is False

    def test_all_raises_when_no_element_is_false(self) -> None:
        assert ev_error("[0, 1].all(x, 1 / x > 0)") == "division by zero"
        assert ev_error('[1, "a"].all(x, x > 0)') == "no matching overload for '>' on (string, int)"

    def test_exists_absorbs_errors_when_an_element_is_true(self) -> None:
        assert ev("[0, 1].exists(x, 1 / x > 0)") is True
        assert ev("[1, 0].exists(x, 1 / x > 0)") is True
        assert ev('["a", 1].exists(x, x == 1 && x > 0)') is True

    def test_exists_raises_when_no_element_is_true(self) -> None:
        assert ev_error("[0, 1].exists(x, 1 / x > 5)") == "division by zero"

    def test_non_bool_predicates(self) -> None:
        assert ev_error("l.all(x, x)") == "no matching overload for 'all' on (int)"
        assert ev_error("l.exists(x, x)") == "no matching overload for 'exists' on (int)"
        assert ev("l.all(x, x == 1 ? false : x)") is False  # absorbed by a false element
        assert ev_error("l.exists_one(x, x)") == "no matching overload for 'exists_one' on (int)"
        assert ev_error("l.filter(x, x)") == "no matching overload for 'filter' on (int)"
        assert ev_error("l.map(x, x, x)") == "no matching overload for 'map' on (int)"

    def test_exists_one_map_filter_propagate_errors(self) -> None:
        assert ev_error("[0, 1].exists_one(x, 1 / x > 0)") == "division by zero"
        assert ev_error("[0, 1].map(x, 1 / x)") == "division by zero"
        assert ev_error("[0, 1].filter(x, 1 / x > 0)") == "division by zero"

    @pytest.mark.parametrize("macro", ["all", "exists", "exists_one", "map", "filter"])
    def test_range_must_be_a_list_or_map(self, macro: str) -> None:
        assert ev_error(f"s.{macro}(x, true)") == f"no matching overload for '{macro}' on (string)"

    def test_error_in_the_range_propagates(self) -> None:
        assert ev_error("m.zz.exists(x, true)") == "no such key: 'zz'"


class TestScoping:
    def test_loop_variable_shadows_only_inside(self) -> None:
        assert ev("l.map(i, i * 2) == [2, 4, 6] && i == 7") is True

    def test_outer_variables_visible(self) -> None:
        assert ev("l.filter(x, x < i - 5)") == [1]

    def test_nested_comprehensions(self) -> None:
        assert ev("l.all(x, l.exists(y, y == x))") is True
        assert ev("[[1, 2], [3]].map(row, row.map(v, v * 10))") == [[10, 20], [30]]
        assert ev("l.exists(x, l.exists(y, x + y == 6))") is True
        assert ev("l.map(x, l.filter(y, y > x).size())") == [2, 1, 0]

    def test_nested_same_name_shadows_and_restores(self) -> None:
        assert ev("[1, 2].map(x, [10].map(x, x) + [x])") == [[10, 1], [10, 2]]

    def test_loop_variable_is_not_a_declared_field_target(self) -> None:
        # `subject` here is the loop variable, so `.anything` is not checked against the
        # declared fields of the `subject` variable.
        assert ev("[{'zz': 1}].all(subject, subject.zz == 1)") is True

    def test_concurrent_evaluations_do_not_share_frames(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        expression = compile_cel("l.map(x, l.map(y, x * y + i))")

        def run(k: int) -> list[list[int]]:
            result: list[list[int]] = expression.evaluate({"l": [k, k + 1], "i": k})
            return result

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(run, range(400)))
        for k, result in enumerate(results):
            assert result == [[x * y + k for y in (k, k + 1)] for x in (k, k + 1)]
