"""The test-suite editor schema (schemas/suite.schema.json) agrees with the suite parser.

Every shipped suite names the schema on its first line and validates; a suite the schema
refuses is refused by the parser (a table of violations); and suites the parser accepts
(Hypothesis-altered valid ones) validate. The schema may be looser than the parser (it cannot
see key files, case-name uniqueness or the calendar), never stricter.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from datetime import UTC
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Layer
from policy_engine.domain.request import SubjectKind
from policy_engine.policy.parse import LoadIssue
from policy_engine.policy.source import SUITE_SUFFIXES
from policy_engine.policy.yamlpos import load_documents
from policy_engine.testing import suite as suite_parser
from tests.policy.test_schemas import (
    MODELINE,
    SCHEMAS,
    Document,
    _mutated,
    _optional,
    _QuotingDumper,
    _schema_errors,
    _set,
    _slots,
    _subtrees,
    _with,
)

REPOSITORY = Path(__file__).resolve().parents[2]
TEST_KEY = REPOSITORY / "policies" / "acme" / "tests" / "test-idp.pem"  # an Ed25519 key
SUITE_FILE = "acme/tests/schema.test.yaml"
SHIPPED = sorted(
    path
    for suffix in SUITE_SUFFIXES
    for path in (REPOSITORY / "policies").rglob(f"*{suffix}")
    if not any(part.startswith(".") for part in path.relative_to(REPOSITORY).parts)
)


@cache
def _policy_directory() -> Path:
    """A policy directory holding acme/tests/test-idp.pem, for suites' fixture keys; the
    suite itself is handed to the parser as bytes."""
    directory = Path(tempfile.mkdtemp(prefix="suite-schema-"))
    (directory / "acme" / "tests").mkdir(parents=True)
    (directory / "acme" / "tests" / "test-idp.pem").write_bytes(TEST_KEY.read_bytes())
    return directory


def _parses(document: Any) -> bool:
    """True when the suite parser accepts `document` as acme/tests/schema.test.yaml."""
    issues: list[LoadIssue] = []
    data = yaml.dump(document, Dumper=_QuotingDumper).encode()
    parsed = suite_parser.parse_suite(_policy_directory(), SUITE_FILE, data, issues)
    return parsed is not None and not issues


def _errors(document: Any) -> list[str]:
    """The schema's complaints, through suite.schema.json and through document.schema.json
    (which dispatches by kind); both must agree on whether there are any."""
    own, dispatched = _schema_errors(document, "suite.schema.json"), _schema_errors(document)
    assert bool(own) == bool(dispatched), (own, dispatched)
    return own


# -- the shipped suites and the parser's vocabulary ------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPOSITORY)) for p in SHIPPED])
def test_every_shipped_suite_names_the_suite_schema_and_validates(path: Path) -> None:
    text = path.read_text()
    modeline = MODELINE.match(text)
    assert modeline, f"{path} does not start with '# yaml-language-server: $schema=...'"
    assert (path.parent / modeline.group(1)).resolve() == SCHEMAS / "suite.schema.json"
    (document,) = [d.value for d in load_documents(text, what="test suites").documents]
    assert _errors(document) == []


def test_shipped_suites_exist() -> None:
    assert {p.parent.parent.name for p in SHIPPED} >= {"acme", "globex"}


def test_the_schema_spells_the_parsers_keys_and_values() -> None:
    schema = json.loads((SCHEMAS / "suite.schema.json").read_text())
    defs = schema["$defs"]
    case = defs["case"]["properties"]
    expect = case["expect"]["properties"]
    assert set(schema["properties"]) == suite_parser._SUITE_KEYS
    assert set(schema["properties"]["fixtures"]["properties"]) == suite_parser._FIXTURE_KEYS
    assert set(defs["principal"]["properties"]) == suite_parser._PRINCIPAL_KEYS
    assert set(defs["resource"]["properties"]) == suite_parser._RESOURCE_KEYS
    assert set(defs["key"]["properties"]) == suite_parser._KEY_KEYS
    assert set(case) == suite_parser._CASE_KEYS
    assert set(case["context"]["properties"]) == suite_parser._CONTEXT_KEYS
    assert set(case["token"]["anyOf"][1]["properties"]) == suite_parser._TOKEN_KEYS
    assert set(expect) == suite_parser._EXPECT_KEYS
    assert schema["properties"]["kind"]["const"] == suite_parser.KIND_SUITE
    assert defs["time"]["pattern"] == f"^{suite_parser.RFC3339.pattern}$"
    assert expect["code"]["enum"] == [code.value for code in ErrorCode]
    assert expect["layer"]["enum"] == [layer.value for layer in Layer]
    assert defs["principal"]["properties"]["kind"]["enum"] == [k.value for k in SubjectKind]
    assert case["context"]["properties"]["connection"]["enum"] == list(suite_parser._CONNECTIONS)
    algorithms = {a for choices in suite_parser._ALGORITHMS_OF_KEY.values() for a in choices}
    assert set(defs["key"]["properties"]["algorithm"]["enum"]) == algorithms


# -- what the parser makes of a suite --------------------------------------------------------

SUITE: Document = {
    "kind": "TestSuite",
    "name": "acme-schema",
    "organization": "acme",
    "description": "Every field once.",
    "time": "2026-03-02T15:00:00Z",
    "fixtures": {
        "principals": {"alice": {"id": "alice", "attributes": {"groups": ["engineering"]}}},
        "applications": {"reviewer": {"id": "pr-reviewer", "attributes": {"tier": "gold"}}},
        "integrations": {"gh": {"id": "github"}},
        "keys": {"idp": {"private_key_file": "test-idp.pem", "kid": "k1", "algorithm": "EdDSA"}},
    },
    "cases": [
        {
            "name": "alice-reviews",
            "description": "The README's first case.",
            "subject": "alice",
            "application": "reviewer",
            "integration": "gh",
            "scope": "repo",
            "context": {
                "connection": "active",
                "client_ip": "10.0.0.1",
                "session_id": "s-1",
                "attributes": {"ticket": "T-1"},
            },
            "time": "2026-03-02T10:00:00.5-05:00",
            "token": {"key": "idp", "claims": {"groups": ["engineering"]}},
            "expect": {"decision": "allow", "layer": "application", "policy": "p", "rule": "r"},
        },
        {
            "name": "ci-is-no-employee",
            "subject": {"id": "ci", "kind": "service_account", "attributes": {}},
            "application": {"id": "bot"},
            "integration": "slack",
            "scope": "chat:write",
            "token": "eyJhbGciOiJub25lIn0.e30.",
            "expect": {"decision": "deny", "code": "kontext_policy_denied", "layer": "system"},
        },
    ],
}


def test_the_base_suite_parses_and_validates() -> None:
    assert _parses(SUITE)
    assert _errors(SUITE) == []


# Each a suite the schema refuses, for one reason; the parser must refuse it too.
VIOLATIONS: dict[str, Any] = {
    "unknown top-level key": _with(SUITE, _set("owner", "me")),
    "misspelt cases": _with(SUITE, lambda d: d.update(case=d.pop("cases"))),
    "unknown fixture group": _with(SUITE, _set("fixtures.users", {})),
    "unknown principal key": _with(SUITE, _set("fixtures.principals.alice.groups", ["x"])),
    "unknown resource key": _with(SUITE, _set("fixtures.integrations.gh.kind", "user")),
    "unknown fixture key field": _with(SUITE, _set("fixtures.keys.idp.file", "test-idp.pem")),
    "unknown case key": _with(SUITE, _set("cases.0.expected", {"decision": "allow"})),
    "unknown context key": _with(SUITE, _set("cases.0.context.ip", "10.0.0.1")),
    "unknown token key": _with(SUITE, _set("cases.0.token.kid", "k1")),
    "unknown expect key": _with(SUITE, _set("cases.0.expect.effect", "allow")),
    "missing kind": _with(SUITE, _set("kind", ...)),
    "kind lower case": _with(SUITE, _set("kind", "testsuite")),
    "kind of a policy": _with(SUITE, _set("kind", "Policy")),
    "missing name": _with(SUITE, _set("name", ...)),
    "name with a space": _with(SUITE, _set("name", "acme schema")),
    "name a number": _with(SUITE, _set("name", 7)),
    "organization with a space": _with(SUITE, _set("organization", "acme corp")),
    "organization a number": _with(SUITE, _set("organization", 1)),
    "description empty": _with(SUITE, _set("description", "")),
    "description null": _with(SUITE, _set("description", None)),
    "time a number": _with(SUITE, _set("time", 1772463600)),
    "time not a timestamp": _with(SUITE, _set("time", "yesterday")),
    "time a date only": _with(SUITE, _set("time", "2026-03-02")),
    "time without an offset": _with(SUITE, _set("cases.0.time", "2026-03-02T15:00:00")),
    "time without seconds": _with(SUITE, _set("time", "2026-03-02T15:00Z")),
    "time in basic format": _with(SUITE, _set("time", "20260302T150000Z")),
    "fixtures a list": _with(SUITE, _set("fixtures", [])),
    "fixtures null": _with(SUITE, _set("fixtures", None)),
    "principals a list": _with(SUITE, _set("fixtures.principals", ["alice"])),
    "principal a string": _with(SUITE, _set("fixtures.principals.alice", "alice")),
    "principal without id": _with(SUITE, _set("fixtures.principals.alice.id", ...)),
    "principal id empty": _with(SUITE, _set("fixtures.principals.alice.id", " ")),
    "principal kind unknown": _with(SUITE, _set("fixtures.principals.alice.kind", "admin")),
    "attributes a list": _with(SUITE, _set("fixtures.principals.alice.attributes", [])),
    "application id a number": _with(SUITE, _set("fixtures.applications.reviewer.id", 3)),
    "key file absolute": _with(SUITE, _set("fixtures.keys.idp.private_key_file", "/k.pem")),
    "key file with a backslash": _with(
        SUITE, _set("fixtures.keys.idp.private_key_file", "..\\k.pem")
    ),
    "key without file": _with(SUITE, _set("fixtures.keys.idp.private_key_file", ...)),
    "key algorithm HS256": _with(SUITE, _set("fixtures.keys.idp.algorithm", "HS256")),
    "key algorithm lower case": _with(SUITE, _set("fixtures.keys.idp.algorithm", "eddsa")),
    "key kid empty": _with(SUITE, _set("fixtures.keys.idp.kid", "")),
    "missing cases": _with(SUITE, _set("cases", ...)),
    "no cases": _with(SUITE, _set("cases", [])),
    "cases a mapping": _with(SUITE, lambda d: d.update(cases=d["cases"][0])),
    "case a string": _with(SUITE, _set("cases.1", "alice-reviews")),
    "case without name": _with(SUITE, _set("cases.0.name", ...)),
    "case name with a slash": _with(SUITE, _set("cases.0.name", "a/b")),
    "case name ending in a newline": _with(SUITE, _set("cases.0.name", "alice\n")),
    "case without subject": _with(SUITE, _set("cases.0.subject", ...)),
    "case without application": _with(SUITE, _set("cases.1.application", ...)),
    "case without integration": _with(SUITE, _set("cases.0.integration", ...)),
    "case without scope": _with(SUITE, _set("cases.0.scope", ...)),
    "case without expect": _with(SUITE, _set("cases.0.expect", ...)),
    "subject empty": _with(SUITE, _set("cases.0.subject", "")),
    "subject a number": _with(SUITE, _set("cases.0.subject", 1)),
    "subject a list": _with(SUITE, _set("cases.0.subject", ["alice"])),
    "inline subject without id": _with(SUITE, _set("cases.1.subject.id", ...)),
    "inline subject kind capitalised": _with(SUITE, _set("cases.1.subject.kind", "User")),
    "inline application unknown key": _with(SUITE, _set("cases.1.application.name", "bot")),
    "scope null": _with(SUITE, _set("cases.0.scope", None)),
    "scope blank": _with(SUITE, _set("cases.0.scope", "  ")),
    "context a string": _with(SUITE, _set("cases.0.context", "active")),
    "connection yes": _with(SUITE, _set("cases.0.context.connection", "connected")),
    "connection a boolean": _with(SUITE, _set("cases.0.context.connection", True)),
    "client_ip empty": _with(SUITE, _set("cases.0.context.client_ip", "")),
    "context attributes null": _with(SUITE, _set("cases.0.context.attributes", None)),
    "token a number": _with(SUITE, _set("cases.0.token", 1)),
    "token a list": _with(SUITE, _set("cases.0.token", ["idp"])),
    "token without key": _with(SUITE, _set("cases.0.token.key", ...)),
    "token claims a list": _with(SUITE, _set("cases.0.token.claims", ["sub"])),
    "expect a string": _with(SUITE, _set("cases.0.expect", "allow")),
    "expect without decision": _with(SUITE, _set("cases.0.expect.decision", ...)),
    "decision capitalised": _with(SUITE, _set("cases.0.expect.decision", "Allow")),
    "decision a boolean": _with(SUITE, _set("cases.0.expect.decision", True)),
    "decision not_applicable": _with(SUITE, _set("cases.0.expect.decision", "not_applicable")),
    "code on an allow": _with(SUITE, _set("cases.0.expect.code", "kontext_policy_denied")),
    "code without prefix": _with(SUITE, _set("cases.1.expect.code", "policy_denied")),
    "code upper case": _with(SUITE, _set("cases.1.expect.code", "KONTEXT_POLICY_DENIED")),
    "layer capitalised": _with(SUITE, _set("cases.1.expect.layer", "System")),
    "layer unknown": _with(SUITE, _set("cases.1.expect.layer", "team")),
    "policy empty": _with(SUITE, _set("cases.0.expect.policy", "")),
    "rule a number": _with(SUITE, _set("cases.0.expect.rule", 1)),
    "document a list": [SUITE],
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_the_parser_refuses_suites_the_schema_refuses(name: str) -> None:
    suite = VIOLATIONS[name]
    assert _errors(suite), f"the schema accepts: {name}"
    assert not _parses(suite), f"the parser accepts: {name}"


# -- generated suites --------------------------------------------------------------------------


def _keys(value: Any) -> Iterator[str]:
    for container, key in _slots(value):
        if isinstance(container, dict):
            yield key


FIELD_NAMES = sorted(set(_keys(SUITE)) | {"kind", "Name", "unknown", "users"})
TEXTS = [
    "",
    " ",
    "allow",
    "deny",
    "Allow",
    "system",
    "org",
    "team",
    "TestSuite",
    "alice",
    "bob",
    "gh",
    "reviewer",
    "idp",
    "a b",
    "a/b",
    "active",
    "absent",
    "kontext_not_found",
    "kontext_policy_denied",
    "EdDSA",
    "ES256",
    "HS256",
    "service_account",
    "test-idp.pem",
    "../test-idp.pem",
    "2026-03-02T15:00:00Z",
    "2026-03-02T15:00:00+01:00",
    "2026-03-02 15:00:00z",
    "2026-03-02",
    "2026-13-02T15:00:00Z",
    "x" * 129,
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=400),
    st.sampled_from(TEXTS),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=3),
    ),
    max_leaves=6,
)
# Parts valid somewhere in a suite: moved around, many mutants still parse, so the
# parser-accepts direction is exercised as much as the other.
REPLACEMENTS = st.one_of(st.sampled_from(list(_subtrees(SUITE))).map(copy.deepcopy), VALUES)


NAMES = st.sampled_from(["c", "case-2", "a.b:c_d", "C" * 128])
TIMES = st.sampled_from(
    ["2026-03-02T15:00:00Z", "2026-03-02t15:00:00.123456789z", "2026-03-02 10:00:00-05:00"]
)
ATTRIBUTES = st.dictionaries(st.sampled_from(["groups", "tier"]), SCALARS, max_size=2)
PRINCIPALS = st.fixed_dictionaries(
    {"id": st.sampled_from(["alice", "c-1029", "x"])},
    optional={
        "kind": st.sampled_from([kind.value for kind in SubjectKind]),
        "attributes": ATTRIBUTES,
    },
)
RESOURCES = st.fixed_dictionaries(
    {"id": st.sampled_from(["github", "pr-reviewer", "é"])}, optional={"attributes": ATTRIBUTES}
)
KEYS = st.fixed_dictionaries(
    {"private_key_file": st.sampled_from(["test-idp.pem", "./test-idp.pem", "x/../test-idp.pem"])},
    optional={"kid": st.sampled_from(["k", "acme-test"]), "algorithm": st.just("EdDSA")},
)
FIXTURE_NAMES = st.sampled_from(["alice", "gh", "idp"])
EXPECTS = st.fixed_dictionaries(
    {"decision": st.sampled_from(["allow", "deny"])},
    optional={
        "code": st.sampled_from([code.value for code in ErrorCode]),
        "layer": st.sampled_from([layer.value for layer in Layer]),
        "policy": st.sampled_from(["p", "any text"]),
        "rule": st.sampled_from(["default", "r"]),
    },
)
CONTEXTS = st.fixed_dictionaries(
    {},
    optional={
        "connection": st.sampled_from(list(suite_parser._CONNECTIONS)),
        "client_ip": st.sampled_from(["10.0.0.1", "::1"]),
        "session_id": st.just("s"),
        "attributes": ATTRIBUTES,
    },
)
TOKENS = st.one_of(
    st.sampled_from(["", "eyJ.e30.", "not a jwt"]),
    st.fixed_dictionaries({"key": st.just("idp")}, optional={"claims": ATTRIBUTES}),
)


@st.composite
def _case(draw: st.DrawFn) -> Document:
    case: Document = {
        "name": draw(NAMES),
        "subject": draw(st.one_of(FIXTURE_NAMES, st.just("bob"), PRINCIPALS)),
        "application": draw(st.one_of(FIXTURE_NAMES, RESOURCES)),
        "integration": draw(st.one_of(FIXTURE_NAMES, RESOURCES)),
        "scope": draw(st.sampled_from(["repo", "chat:write", "a b"])),
        "expect": draw(EXPECTS),
    }
    _optional(draw, case, "description", st.just("why"))
    _optional(draw, case, "context", CONTEXTS)
    _optional(draw, case, "time", TIMES)
    _optional(draw, case, "token", TOKENS)
    return case


@st.composite
def _plausible_suite(draw: st.DrawFn) -> Document:
    """A suite built from values each valid for its field (together they may not be)."""
    suite: Document = {
        "kind": "TestSuite",
        "name": draw(NAMES),
        "cases": draw(st.lists(_case(), min_size=1, max_size=3, unique_by=lambda c: c["name"])),
    }
    _optional(draw, suite, "organization", st.just("acme"))
    _optional(draw, suite, "description", st.just("Cases."))
    _optional(draw, suite, "time", TIMES)
    fixtures = {
        "principals": st.dictionaries(FIXTURE_NAMES, PRINCIPALS, max_size=2),
        "applications": st.dictionaries(FIXTURE_NAMES, RESOURCES, max_size=2),
        "integrations": st.dictionaries(FIXTURE_NAMES, RESOURCES, max_size=2),
        "keys": st.dictionaries(FIXTURE_NAMES, KEYS, max_size=2),
    }
    _optional(draw, suite, "fixtures", st.fixed_dictionaries({}, optional=fixtures))
    return suite


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_mutated((SUITE,), REPLACEMENTS, FIELD_NAMES), _plausible_suite()))
def test_a_generated_suite_the_parser_accepts_validates(suite: Document) -> None:
    if _parses(suite):
        assert _errors(suite) == []


@pytest.mark.parametrize(
    "time", ["2026-03-02T10:00:00", "2026-03-02", "2026-03-02T10:00Z", "20260302T100000Z"]
)
def test_a_case_time_without_an_offset_is_refused_at_its_line(time: str) -> None:
    """Python's fromisoformat takes these too; read as UTC, 10:00 meant in New York would
    silently be decided at 05:00 there."""
    issues: list[LoadIssue] = []
    text = yaml.dump(_with(SUITE, _set("cases.1.time", time)), Dumper=_QuotingDumper)
    parsed = suite_parser.parse_suite(_policy_directory(), SUITE_FILE, text.encode(), issues)
    assert parsed is None
    line = 1 + next(n for n, row in enumerate(text.splitlines()) if row.endswith(f'"{time}"'))
    assert [(i.line, i.message) for i in issues] == [
        (line, f"time {time!r} is not an RFC 3339 timestamp")
    ]


@pytest.mark.parametrize(
    ("time", "utc"),
    [
        ("2026-03-02T10:00:00-05:00", "2026-03-02T15:00:00+00:00"),
        ("2026-03-02t15:00:00.250z", "2026-03-02T15:00:00.250000+00:00"),
        ("2026-03-02 15:00:00+00:00", "2026-03-02T15:00:00+00:00"),
    ],
)
def test_rfc_3339_case_times_are_read_with_their_offset(time: str, utc: str) -> None:
    issues: list[LoadIssue] = []
    text = yaml.dump(_with(SUITE, _set("cases.1.time", time)), Dumper=_QuotingDumper)
    parsed = suite_parser.parse_suite(_policy_directory(), SUITE_FILE, text.encode(), issues)
    assert issues == [] and parsed is not None
    assert parsed.cases[1].time is not None
    assert parsed.cases[1].time.astimezone(UTC).isoformat() == utc
