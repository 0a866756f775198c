"""Edge cases where a hostile differential run (against Google's C++ runtime and cel-go's
sources) found this evaluator giving another answer than the spec's: each case states the
spec's answer, so a regression is a failing test even without the oracle installed."""

from __future__ import annotations

import math

import pytest

from tests.cel.support import ev


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
