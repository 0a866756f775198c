"""Edge cases where a hostile differential run (against Google's C++ runtime and cel-go's
sources) found this evaluator giving another answer than the spec's: each case states the
spec's answer, so a regression is a failing test even without the oracle installed."""

from __future__ import annotations

import math
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from policy_engine.cel import CelEvaluationError
from policy_engine.cel.values import FREE_TEXT_SCAN, MAX_ALLOCATION
from policy_engine.domain.decision import Effect
from policy_engine.engine import decide
from policy_engine.policy import load_policy_set
from tests.cel.support import ACTIVATION, compile_cel, ev, ev_error
from tests.policy_builder import request
from tests.store.support import write_policy_dir


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


class TestValuesWhereTheSpecGivesAnError:
    """A second hostile review: conversions and lookups that gave a value where cel-go (and
    the C++ runtime) give an error. In an allow rule such a value can be a wrongful ALLOW."""

    @pytest.mark.parametrize("source", ["uint(-0.5)", "uint(-1e-300)", "uint(-0.9999)"])
    def test_a_negative_double_is_no_uint(self, source: str) -> None:
        # cel-go's doubleToUint64Checked refuses v < 0: no truncation toward zero first.
        assert "out of range" in ev_error(source)

    def test_negative_zero_is_a_uint(self) -> None:
        assert ev("uint(-0.0) == 0u") is True

    @pytest.mark.parametrize(
        "text",
        [
            "2024-01-01T00:00:00+24:00",
            "2024-01-01T00:00:00-99:00",
            "2024-01-01T00:00:00+23:60",
            "2024-01-01T00:00:00-00:99",
        ],
    )
    def test_an_offset_outside_rfc_3339_is_no_timestamp(self, text: str) -> None:
        assert "expected RFC 3339" in ev_error(f"timestamp('{text}')")

    def test_offsets_inside_rfc_3339_parse(self) -> None:
        assert ev("timestamp('2024-01-01T23:59:00+23:59') == timestamp('2024-01-01T00:00:00Z')")
        assert ev("timestamp('2024-01-01T00:00:00-00:01') == timestamp('2024-01-01T00:01:00Z')")

    @pytest.mark.parametrize("key", ["1.5", "1e300", "-9223372036854775808.0", "'a'", "true"])
    def test_an_optional_index_that_is_no_position_is_an_error(self, key: str) -> None:
        # Only a position past either end is absent (cel-go's IndexOrError first).
        assert "no matching overload" in ev_error(f"[1, 2][?{key}].hasValue()")
        assert "no matching overload" in ev_error(f"optional.of([1, 2])[?{key}].hasValue()")

    @pytest.mark.parametrize(
        "source",
        [
            "'%s'.format([b'\\xff'])",
            "'%s'.format([[b'\\xff']])",
            "'%s'.format([{'a': b'\\xc3'}])",
            # Two different byte strings printed alike (U+FFFD) compared equal.
            "'%s'.format([b'\\xff']) == '%s'.format([b'\\xfe'])",
        ],
    )
    def test_bytes_that_are_no_utf8_do_not_print(self, source: str) -> None:
        # cel-go's %s converts bytes as string(b) does: an error, not U+FFFD.
        assert "not valid UTF-8" in ev_error(source)

    def test_bytes_that_are_utf8_print(self) -> None:
        assert ev("'%s'.format([[b'\\xc3\\xa9', b'a']]) == '[\u00e9, a]'") is True

    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("[1, 2][?1.0].value() == 2", True),
            ("[1, 2][?1u].value() == 2", True),
            ("[1, 2][?2].hasValue()", False),
            ("[1, 2][?-1].hasValue()", False),
            ("[1, 2][?2.0].hasValue()", False),
        ],
    )
    def test_optional_positions(self, source: str, expected: bool) -> None:
        assert ev(source) is expected


class TestEndToEnd:
    """The faults above as an attacker meets them: a real policy file, the real loader, a
    request whose attributes (sent by the broker) reach the condition through decide()."""

    NOW = datetime(2024, 7, 1, 20, 30, tzinfo=UTC)

    @pytest.mark.parametrize(
        ("condition", "benign", "attack"),
        [
            # Allowed while nothing is owed: a debt of -0.5 was uint 0.
            ("uint(subject.attributes.debt) == 0u", {"debt": 0.0}, {"debt": -0.5}),
            # A grant that lasts until its expiry: -99:00 moved it four days on.
            (
                "timestamp(subject.attributes.expires) > now",
                {"expires": "2024-07-02T00:00:00-01:00"},
                {"expires": "2024-07-01T00:00:00-99:00"},
            ),
            # Allowed unless the n-th ban is set: a slot of 1.5 read as "no such ban".
            (
                "!subject.attributes.bans[?subject.attributes.slot].orValue(false)",
                {"bans": [False, True], "slot": 2},
                {"bans": [False, True], "slot": 1.5},
            ),
        ],
    )
    def test_no_wrongful_allow(
        self,
        tmp_path: Path,
        condition: str,
        benign: dict[str, Any],
        attack: dict[str, Any],
    ) -> None:
        org = (
            "kind: Policy\nname: attack\nlayer: org\ntarget:\n  integrations: [github]\n"
            f"rules:\n  - name: the-rule\n    effect: allow\n    condition: {condition!r}\n"
        )
        policies = load_policy_set(write_policy_dir(tmp_path, org))
        assert decide(policies, request(**benign), now=self.NOW).effect is Effect.ALLOW
        assert decide(policies, request(**attack), now=self.NOW).effect is Effect.DENY


class _CountingList(list):  # type: ignore[type-arg]
    """A list that counts how many of its elements were read by iteration."""

    reads = 0

    def __iter__(self) -> Any:
        for item in super().__iter__():
            type(self).reads += 1
            yield item


class TestLoopsArePaidForFirst:
    """A loop is refused before it touches a list longer than the iteration budget: each of
    a hundred two-variable loops absorbed by || paired a million elements first (9 s for
    one evaluation, the server's loop blocked)."""

    @pytest.mark.parametrize(
        "source",
        [
            "l.transformList(i, v, v).size() > 0",
            "l.transformList(i, v, v > 0, v).size() > 0",
            "l.transformMap(i, v, v).size() > 0",
            "l.all(i, v, v >= 0)",
            "l.exists(i, v, v < 0)",
            "l.existsOne(i, v, v < 0)",
            "l.map(x, x).size() > 0",
            "l.exists(x, x < 0)",
        ],
    )
    def test_a_long_list_is_refused_unread(self, source: str) -> None:
        _CountingList.reads = 0
        message = ev_error(source, l=_CountingList(range(20_000)))
        assert "comprehension iterations" in message
        assert _CountingList.reads == 0

    def test_a_short_list_is_read_once(self) -> None:
        _CountingList.reads = 0
        assert ev("l.transformList(i, v, v * i)[2] == 4", l=_CountingList([0, 1, 2])) is True
        assert _CountingList.reads == 3


class TestASpentBudgetStopsWork:
    """Once an evaluation's budget is spent (an error || absorbs), an operation that charges
    after its work, or reads a list before charging, refuses to start: a few hundred such
    operands after one absorbed error repeated a million-element join or quote each
    (10 s for one evaluation)."""

    # l[0] == 'a' is no constant: the compiler cannot fold the || away.
    SPEND = "'x'" + ".replace('x', 'xxxxxxxxxx')" * 7 + ".size() > 0 || l[0] == 'a'"

    def test_join_reads_nothing_after_the_budget_is_spent(self) -> None:
        _CountingList.reads = 0
        message = ev_error(f"({self.SPEND}) && l.join().size() > 0", l=_CountingList("ab"))
        assert "exceed" in message and _CountingList.reads == 0

    def test_a_charged_function_does_not_start(self) -> None:
        text = "x" * 1_000_000
        source = f"({self.SPEND}) && s.split('').size() > 0"
        tracemalloc.start()
        try:
            message = ev_error(source, l=["b"], s=text)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # The spend builds a million code points (1 MB); a split would add a list of a
        # million parts (8 MB).
        assert "exceed" in message and peak < 5 * len(text)

    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("'abc'.split('', 2)", ["a", "bc"]),
            ("'abc'.split('', 3)", ["a", "b", "c"]),
            ("'abc'.split('', 9)", ["a", "b", "c"]),
            ("'abc'.split('', -1)", ["a", "b", "c"]),
            ("'a😀c'.split('', 2)", ["a", "😀c"]),
            ("''.split('', 2)", []),
        ],
    )
    def test_split_into_code_points_with_a_limit(self, source: str, expected: list[str]) -> None:
        assert list(ev(source)) == expected

    def test_split_with_a_limit_does_not_explode_the_whole_text(self) -> None:
        text = "x" * 1_000_000
        tracemalloc.start()
        try:
            assert ev("s.split('', 2).size() == 2", s=text) is True
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * len(text)  # a copy of the tail, not a list of a million parts


class TestSearchesOfBuiltTextAreCharged:
    """Searching a string longer than FREE_TEXT_SCAN draws on the evaluation's budget as a
    list scan does: a built text of a million code points searched in a loop of 99 (or by a
    few hundred operands of ||) stops at the budget instead of taking seconds."""

    BIG = "'x'" + ".replace('x', 'xxxxxxxxxx')" * 6  # a million code points

    @pytest.mark.parametrize(
        "search",
        [
            "big.contains('y' + string(x))",
            "big.indexOf('y' + string(x)) >= 0",
            "big.lastIndexOf('y' + string(x)) >= 0",
            "big.matches('y' + string(x))",
            "big.glob('*y*')",
        ],
    )
    def test_a_search_in_a_loop_is_charged(self, search: str) -> None:
        message = ev_error(f"cel.bind(big, {self.BIG}, l.exists(x, {search}))", l=list(range(99)))
        assert "scans" in message and "exceed" in message

    def test_request_sized_text_is_searched_free(self) -> None:
        text = "x" * FREE_TEXT_SCAN
        source = "l.all(x, !s.contains('y') && s.indexOf('y') < 0 && !s.matches('y'))"
        assert ev(source, l=list(range(200)), s=text) is True  # 39 Mi code points
