"""cel-go's extension libraries as a policy reads them: on the PDP's typed variables, checked
at load (the conformance files cover their semantics case by case)."""

from __future__ import annotations

from typing import Any

import pytest

from policy_engine.cel import (
    CelCompileError,
    CelEvaluationError,
    compile_expression,
    require_bool,
)
from policy_engine.engine.activation import CEL_DECLARATIONS

ACTIVATION: dict[str, Any] = {
    "organization": "acme",
    "subject": {
        "id": "alice",
        "kind": "user",
        "attributes": {"department": "sales", "groups": ["eng", "ops"], "level": 3},
        "claims": {},
    },
    "application": {"id": "app", "attributes": {}},
    "integration": {"id": "github", "attributes": {}},
    "scope": "repo:read",
    "context": {
        "connection": "active",
        "connected": True,
        "client_ip": "10.1.2.3",
        "session_id": "",
        "attributes": {},
    },
    "now": None,
}


def ev(source: str) -> Any:
    return compile_expression(source, CEL_DECLARATIONS).evaluate(ACTIVATION)


def refused(source: str) -> str:
    with pytest.raises(CelCompileError) as info:
        compile_expression(source, CEL_DECLARATIONS)
    return info.value.message


class TestOptionals:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ('subject.attributes.?department.orValue("none") == "sales"', True),
            ('subject.attributes.?region.orValue("none") == "none"', True),
            ("subject.attributes.?region.hasValue()", False),
            ('subject.attributes[?"level"].orValue(0) > 2', True),
            ("subject.attributes.?groups.optMap(g, size(g)).orValue(0)", 2),
            ("context.attributes.?ticket.optFlatMap(t, t.?id).hasValue()", False),
            ('[?subject.attributes.?region, ?optional.of("x")]', ["x"]),
            ('{?"r": subject.attributes.?region, "k": 1}', {"k": 1}),
            ("optional.ofNonZeroValue(subject.attributes.level).value()", 3),
            ('subject.attributes.?department.or(optional.of("x")).value()', "sales"),
            # or/orValue evaluate their argument only when they need it
            ("subject.attributes.?department.orValue(subject.attributes.missing)", "sales"),
            ("has(subject.attributes.?region.x)", False),
        ],
    )
    def test_reading_attributes_that_may_be_missing(self, source: str, expected: Any) -> None:
        assert ev(source) == expected

    def test_value_of_an_empty_optional_fails_closed(self) -> None:
        with pytest.raises(CelEvaluationError, match=r"optional\.none"):
            ev("subject.attributes.?region.value()")

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("scope.?x.hasValue()", "type 'string' does not support field selection"),
            ("scope.hasValue()", "'hasValue' applied to (string)"),
            (
                'optional.of(1).orValue("a") == 1',
                "'orValue' applied to (optional_type(int), string)",
            ),
            ("[?scope]", "an optional entry (?x) needs an optional, not 'string'"),
        ],
    )
    def test_refused_at_load(self, source: str, message: str) -> None:
        assert message in refused(source)

    def test_an_optional_is_no_condition(self) -> None:
        with pytest.raises(CelCompileError, match="a condition must be a bool"):
            require_bool(compile_expression("optional.of(scope)", CEL_DECLARATIONS))


class TestStrings:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ('scope.split(":")[0] == "repo"', True),
            ('scope.split(":", 1)', ["repo:read"]),
            ("scope.substring(0, 4).upperAscii()", "REPO"),
            ('scope.indexOf(":") == 4 && scope.lastIndexOf("e") == 6', True),
            ('scope.replace(":", "/")', "repo/read"),
            ('subject.attributes.groups.join(",")', "eng,ops"),
            ('"%s may %s".format([subject.id, scope])', "alice may repo:read"),
            ('"  x ".trim() + scope.charAt(0) + "ab".reverse()', "xrba"),
            ("strings.quote(scope)", '"repo:read"'),
        ],
    )
    def test_values(self, source: str, expected: Any) -> None:
        assert ev(source) == expected

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ('scope.charAt("1") == "r"', "'charAt' applied to (string, string)"),
            ("[1, 2].join(',') == ''", "'join' applied to (list(int), string)"),
            ("scope.split(1).size() > 0", "'split' applied to (string, int)"),
            ('"%d".format(scope) == ""', "'format' applied to (string, string)"),
        ],
    )
    def test_refused_at_load(self, source: str, message: str) -> None:
        assert message in refused(source)

    def test_an_index_out_of_range_fails_closed(self) -> None:
        with pytest.raises(CelEvaluationError, match="index out of range"):
            ev("scope.substring(3, 40) == ''")


class TestSetsMathEncoders:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ('sets.intersects(subject.attributes.groups, ["ops", "sre"])', True),
            ('sets.contains(subject.attributes.groups, ["eng"])', True),
            ('sets.contains(["eng"], subject.attributes.groups)', False),
            ('sets.equivalent(["ops", "eng", "eng"], subject.attributes.groups)', True),
            ("sets.contains([1, 2.0], [2, 1u])", True),  # CEL equality across numbers
            ("sets.intersects([true], [dyn(1)])", False),  # a bool is no number
            ("sets.contains([1], [])", True),
            ("math.greatest(subject.attributes.level, 2, 2.5)", 3),
            ("math.least([5u, 3u])", 3),
            ("math.abs(-3) + math.sign(-2)", 2),
            ("math.round(2.5) == 3.0 && math.trunc(-2.7) == -2.0", True),
            ("math.bitShiftRight(-1, 60)", 15),
            ('base64.decode(base64.encode(b"\\x00\\xff")) == b"\\x00\\xff"', True),
            ("base64.encode(bytes(scope))", "cmVwbzpyZWFk"),
            ('base64.decode("YQ") == base64.decode("YQ==\\n")', True),
        ],
    )
    def test_values(self, source: str, expected: Any) -> None:
        assert ev(source) == expected

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ('sets.contains(["a"], [1])', "'sets.contains' applied to (list(string), list(int))"),
            ("sets.intersects(scope, [])", "'sets.intersects' applied to (string, list(dyn))"),
            ('math.greatest(1, "a") == 1', "'math.greatest' applied to (int, string)"),
            ("math.ceil(1) == 1.0", "'math.ceil' applied to (int)"),
            ("math.bitAnd(1, 1u) == 1", "'math.bitAnd' applied to (int, uint)"),
            ('base64.decode(b"x") == b""', "'base64.decode' applied to (bytes)"),
        ],
    )
    def test_refused_at_load(self, source: str, message: str) -> None:
        assert message in refused(source)

    @pytest.mark.parametrize(
        "source",
        [
            "math.greatest([]) == 1",
            'base64.decode("!!") == b""',
            'base64.decode("YQ=") == b"a"',
            "math.abs(-9223372036854775808) > 0",
        ],
    )
    def test_errors_fail_closed(self, source: str) -> None:
        with pytest.raises(CelEvaluationError):
            ev(source)


class TestNetwork:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ('cidr("10.0.0.0/8").containsIP(context.client_ip)', True),
            ('cidr("10.0.0.0/8").containsIP(ip(context.client_ip))', True),
            ('context.client_ip.inCidr("10.0.0.0/8")', True),  # the project's alias stays
            ('inCidr(context.client_ip, "192.168.0.0/16")', False),
            ("isIP(context.client_ip) && ip(context.client_ip).family() == 4", True),
            ("ip(context.client_ip).isGlobalUnicast()", True),  # private is global to Go
            ('cidr("10.1.2.3/8").masked() == cidr("10.0.0.0/8")', True),
            ('string(cidr("10.1.2.3/8").ip())', "10.1.2.3"),
            ('ip("::ffff:a01:203") == ip(context.client_ip)', True),
            ('type(ip("::1")) == net.IP', True),
        ],
    )
    def test_values(self, source: str, expected: Any) -> None:
        assert ev(source) == expected

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("isIP(cidr('10.0.0.0/8'))", "'isIP' applied to (net.CIDR)"),
            ("ip(context.client_ip).containsIP(scope)", "'containsIP' applied to (net.IP, string)"),
            ('cidr("10.0.0.0/8").containsCIDR(1)', "'containsCIDR' applied to (net.CIDR, int)"),
        ],
    )
    def test_refused_at_load(self, source: str, message: str) -> None:
        assert message in refused(source)

    @pytest.mark.parametrize("text", ["10.0.0.1.5", "fe80::1%en0", "::ffff:10.0.0.1", ""])
    def test_a_bad_address_fails_closed(self, text: str) -> None:
        act = {**ACTIVATION, "context": {**ACTIVATION["context"], "client_ip": text}}
        compiled = compile_expression(
            'cidr("10.0.0.0/8").containsIP(context.client_ip)', CEL_DECLARATIONS
        )
        with pytest.raises(CelEvaluationError, match="invalid IP address"):
            compiled.evaluate(act)


class TestComprehensionsAndBind:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ('subject.attributes.groups.exists(i, g, i == 0 && g == "eng")', True),
            ('subject.attributes.all(k, v, k != "")', True),
            ("subject.attributes.groups.transformList(i, g, g + string(i))", ["eng0", "ops1"]),
            ("subject.attributes.groups.transformMap(i, g, i > 0, g)", {1: "ops"}),
            ('subject.attributes.groups.existsOne(g, g == "ops")', True),
            ('cel.bind(g, subject.attributes.groups, "eng" in g && size(g) == 2)', True),
            ('cel.bind(p, scope.split(":"), p[0] + "/" + p[1])', "repo/read"),
        ],
    )
    def test_values(self, source: str, expected: Any) -> None:
        assert ev(source) == expected

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ('[1].exists(i, v, v == "a")', "'==' applied to (int, string)"),
            ("scope.all(i, v, true)", "all() cannot range over a value of type 'string'"),
            ("[1].transformList(i, v, i, v) == []", "transformList() needs a bool predicate"),
            ("[1].exists(i, i, true)", "exists() needs two different variable names"),
            ("[1].transformList(i, v) == []", "wrong number of arguments to 'transformList'"),
            ("cel.bind(n, 1, n + scope) == ''", "'+' applied to (int, string)"),
            ("[[1]].all(a, b, b.all(c, d, c.all(e, f, true)))", "comprehensions nested more"),
        ],
    )
    def test_refused_at_load(self, source: str, message: str) -> None:
        assert message in refused(source)
