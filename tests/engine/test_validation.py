"""A table of bad inputs: each is denied with kontext_validation_error naming the right field."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from policy_engine.config import RequestLimits
from policy_engine.domain.decision import Effect
from policy_engine.domain.request import CheckRequest
from policy_engine.engine import decide
from policy_engine.engine.validation import validate_request
from policy_engine.policy import load_policy_set
from tests.policy_builder import request
from tests.scenarios import EXAMPLE_POLICIES

LIMITS = RequestLimits()
BASE = request("repo", application="pr-reviewer", groups=["engineering"])


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


def with_subject(**changes: Any) -> CheckRequest:
    return replace(BASE, subject=replace(BASE.subject, **changes))


def with_context(**changes: Any) -> CheckRequest:
    return replace(BASE, context=replace(BASE.context, **changes))


BAD_INPUTS: list[tuple[str, CheckRequest, str]] = [
    ("empty organization", replace(BASE, organization=""), "organization"),
    ("organization with a slash", replace(BASE, organization="acme/x"), "organization"),
    ("empty subject", with_subject(id=""), "subject.id"),
    ("subject with a newline", with_subject(id="alice\n"), "subject.id"),
    ("subject with a space", with_subject(id="alice smith"), "subject.id"),
    ("oversized subject", with_subject(id="a" * 257), "subject.id"),
    (
        "empty application",
        replace(BASE, application=replace(BASE.application, id="")),
        "application.id",
    ),
    (
        "integration with a NUL",
        replace(BASE, integration=replace(BASE.integration, id="git\0")),
        "integration.id",
    ),
    ("empty scope", replace(BASE, scope=""), "scope"),
    ("scope with a space", replace(BASE, scope="repo admin"), "scope"),
    ("scope with a quote", replace(BASE, scope='repo"'), "scope"),
    ("scope with a backslash", replace(BASE, scope="repo\\x"), "scope"),
    ("scope with non-ASCII", replace(BASE, scope="répo"), "scope"),
    ("oversized scope", replace(BASE, scope="r" * 257), "scope"),
    ("client IP that is not an IP", with_context(client_ip="10.0.0.300"), "context.client_ip"),
    ("session with a tab", with_context(session_id="s\t1"), "context.session_id"),
    ("oversized request id", replace(BASE, request_id="r" * 300), "request_id"),
    ("oversized token", with_subject(access_token="x" * 20_000), "subject.access_token"),
    (
        "attributes nested too deep",
        with_subject(attributes=nested(10)),
        "subject.attributes.n.n.n.n.n.n.n.n",
    ),
    (
        "too many attributes",
        with_subject(attributes={f"k{i}": i for i in range(65)}),
        "subject.attributes",
    ),
    (
        "attribute string too long",
        with_subject(attributes={"bio": "x" * 5000}),
        "subject.attributes.bio",
    ),
    (
        "attribute map too large",
        with_context(attributes={f"k{i}": "x" * 4000 for i in range(5)}),
        "context.attributes",
    ),
    (
        "non-finite number",
        with_subject(attributes={"level": float("nan")}),
        "subject.attributes.level",
    ),
    ("list too long", with_subject(attributes={"groups": ["g"] * 65}), "subject.attributes.groups"),
    (
        "empty attribute key",
        replace(BASE, application=replace(BASE.application, attributes={"": 1})),
        "application.attributes",
    ),
]


@pytest.fixture(scope="module")
def policies():
    return load_policy_set(EXAMPLE_POLICIES)


def test_the_base_request_is_valid() -> None:
    assert validate_request(BASE, LIMITS) == []


@pytest.mark.parametrize(("name", "bad", "field"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_denied_naming_the_field(
    policies, name: str, bad: CheckRequest, field: str
) -> None:
    decision = decide(policies, bad, now=datetime.now(UTC), limits=LIMITS)
    assert decision.effect is Effect.DENY
    assert not decision.cacheable
    fields = [reason.field for reason in decision.reasons]
    assert field in fields, (name, [r.message for r in decision.reasons])
    for reason in decision.reasons:
        assert reason.code.value == "kontext_validation_error"
        assert reason.http_status == 400
        assert reason.field in reason.message


def test_every_bad_field_is_reported_at_once(policies) -> None:
    bad = replace(with_subject(id=""), scope="a b", organization="")
    fields = {r.field for r in decide(policies, bad, now=datetime.now(UTC)).reasons}
    assert fields == {"subject.id", "scope", "organization"}
