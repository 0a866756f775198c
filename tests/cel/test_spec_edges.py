"""Edge cases where a hostile differential run (against Google's C++ runtime and cel-go's
sources) found this evaluator giving another answer than the spec's: each case states the
spec's answer, so a regression is a failing test even without the oracle installed."""

from __future__ import annotations

import math
import tracemalloc

import pytest

from policy_engine.cel import CelEvaluationError
from policy_engine.cel.values import MAX_ALLOCATION
from tests.cel.support import ACTIVATION, compile_cel, ev, ev_error


class TestMathRounding:
    """cel-go's math.round is Go's math.Round (half away from zero, exact), and ceil, floor,
    trunc keep the operand's sign on a zero result, as Go's math functions do."""

    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("math.round(0.49999999999999994)", 0.0),
            ("math.round(-0.49999999999999994)", -0.0),
            ("math.round(4503599627370497.0)", 4503599627370497.0),
            ("math.round(-4503599627370497.0)", -4503599627370497.0),
            ("math.round(2.5)", 3.0),
            ("math.round(-2.5)", -3.0),
            ("math.round(-0.4)", -0.0),
            ("math.ceil(-0.5)", -0.0),
            ("math.trunc(-0.5)", -0.0),
            ("math.floor(-0.0)", -0.0),
            ("math.floor(-0.5)", -1.0),
            ("math.ceil(0.5)", 1.0),
            ("math.trunc(1e300)", 1e300),
        ],
    )
    def test_values_and_signs(self, source: str, expected: float) -> None:
        value = ev(source)
        assert value == expected and math.copysign(1, value) == math.copysign(1, expected)

    def test_a_condition_on_a_rounded_value(self) -> None:
        assert ev("math.round(0.49999999999999994) > 0.0") is False
        assert ev("1.0 / math.ceil(-0.5) < 0.0") is True


class TestAllocationBudget:
    """What one evaluation builds is bounded (values.MAX_ALLOCATION): text that multiplies a
    value's size, or piles up copies in a comprehension, fails closed instead of taking the
    server's memory. Each case below built 10^8 or more code points before (gigabytes at
    the next step); now it stops within a few times the budget."""

    TENFOLD = "'a'" + ".replace('a', 'aaaaaaaaaa')" * 8

    @pytest.mark.parametrize(
        "source",
        [
            f"{TENFOLD}.size() > 0",
            "cel.bind(a, 'aaaaaaaaaa', cel.bind(b, a+a+a+a+a+a+a+a+a+a, cel.bind(c, "
            "b+b+b+b+b+b+b+b+b+b, cel.bind(d, c+c+c+c+c+c+c+c+c+c, cel.bind(e, "
            "d+d+d+d+d+d+d+d+d+d, cel.bind(f, e+e+e+e+e+e+e+e+e+e, cel.bind(g, "
            "f+f+f+f+f+f+f+f+f+f, cel.bind(h, g+g+g+g+g+g+g+g+g+g, size(h) > 0))))))))",
            "cel.bind(a, [0,1,2,3,4,5,6,7,8,9], cel.bind(b, a+a+a+a+a+a+a+a+a+a, cel.bind(c, "
            "b+b+b+b+b+b+b+b+b+b, cel.bind(d, c+c+c+c+c+c+c+c+c+c, cel.bind(e, "
            "d+d+d+d+d+d+d+d+d+d, cel.bind(f, e+e+e+e+e+e+e+e+e+e, cel.bind(g, "
            "f+f+f+f+f+f+f+f+f+f, cel.bind(h, g+g+g+g+g+g+g+g+g+g, size(h) > 0))))))))",
            "'%.100000000f'.format([1.0]).size() > 0",
            # Copies of one large value: each map() step builds a new string.
            "cel.bind(big, 'x'.replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx')"
            ".replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx'),"
            " l.map(a, l.map(b, big.reverse())).size() > 0)",
            "cel.bind(big, 'x'.replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx')"
            ".replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx'),"
            " '%s'.format([l.map(a, l.map(b, big))]).size() > 0)",
            "cel.bind(big, 'x'.replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx')"
            ".replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx'),"
            " l.map(a, big).join().size() > 0)",
        ],
    )
    def test_growth_fails_closed(self, source: str) -> None:
        tracemalloc.start()
        try:
            message = ev_error(source, l=list(range(99)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "exceed" in message and "code points, bytes or list elements" in message
        assert peak < 40 * MAX_ALLOCATION  # a few times the budget (4 bytes a code point)

    def test_a_folded_constant_is_bounded_too(self) -> None:
        compiled = compile_cel(f"{self.TENFOLD}.size() > 0")  # built at evaluation instead
        with pytest.raises(CelEvaluationError, match="exceed"):
            compiled.evaluate(ACTIVATION)
        assert compile_cel("'ab'.replace('a', 'aaaa') == 'aaaab'").evaluate(ACTIVATION) is True

    def test_each_evaluation_has_its_own_budget(self) -> None:
        # About 1.1 million code points an evaluation: ten of them exceed one budget.
        compiled = compile_cel("'x'" + ".replace('x', 'xxxxxxxxxx')" * 6 + ".size() == 1000000")
        for _ in range(10):
            assert compiled.evaluate(ACTIVATION) is True

    BUILT = (
        "cel.bind(a, [0,1,2,3,4,5,6,7,8,9], cel.bind(b, a+a+a+a+a+a+a+a+a+a, cel.bind(c, "
        "b+b+b+b+b+b+b+b+b+b, cel.bind(d, c+c+c+c+c+c+c+c+c+c, cel.bind(e, "
        "d+d+d+d+d+d+d+d+d+d, {})))))"
    )

    @pytest.mark.parametrize(
        "test",
        [
            "sets.intersects(e, l.map(x, x + 100))",
            "l.exists(x, x + 100 in e)",
            "l.exists(x, (e == e) == (x < 0))",  # list equality scans too
        ],
    )
    def test_scans_of_built_lists_are_charged(self, test: str) -> None:
        # 99 scans of a built list of 100,000 elements: 10^7 comparisons (quadratic: one
        # more ten-fold bind took minutes), past the budget.
        message = ev_error(self.BUILT.format(test), l=list(range(99)))
        assert "scans" in message and "exceed" in message

    def test_small_lists_scan_free(self) -> None:
        # Attribute-sized lists (at most 64 entries) are searched without charge.
        source = "l.all(x, l.all(y, y in l && l == l))"
        assert ev(source, l=list(range(64))) is True
