"""Validation's fast paths accept and refuse exactly what the checks they skip do: the client
IP's dotted-quad match against `ipaddress.ip_address`, the identifiers' printable-ASCII test
against their pattern, and the attribute walk's inline string sizing against its bounds."""

from __future__ import annotations

import ipaddress
import itertools
import random
from dataclasses import replace

import pytest

from policy_engine.config import RequestLimits
from policy_engine.domain.request import CheckRequest
from policy_engine.engine.validation import (
    IDENTIFIER_PATTERN,
    ORGANIZATION_PATTERN,
    SCOPE_PATTERN,
    _check_identifier,
    validate_request,
)
from tests.policy_builder import request

LIMITS = RequestLimits()
BASE = request("repo", application="pr-reviewer", groups=["engineering"])


def _ip_accepted(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _fields(checked: CheckRequest) -> set[str]:
    return {violation.field for violation in validate_request(checked, LIMITS)}


def _client_ip_valid(text: str) -> bool:
    checked = replace(BASE, context=replace(BASE.context, client_ip=text))
    return "context.client_ip" not in _fields(checked)


def test_every_octet_spelling_is_judged_as_ipaddress_judges_it() -> None:
    for length in range(1, 5):
        for digits in itertools.product("0123456789", repeat=length):
            octet = "".join(digits)
            for text in (f"{octet}.1.2.3", f"1.2.3.{octet}", f"10.{octet}.0.1"):
                assert _client_ip_valid(text) == _ip_accepted(text), text


HOSTILE_IPS = [
    "1.2.3.4", "0.0.0.0", "255.255.255.255", "256.1.1.1", "010.1.1.1", "1.2.3.04", "00.1.1.1",
    "1.2.3", "1.2.3.4.", ".1.2.3.4", "1..2.3", "1.2.3.4.5", "1.2.3.4\n", "\n1.2.3.4",
    " 1.2.3.4", "1.2.3.4 ", "1.2.3.4\x00", "+1.2.3.4", "-1.2.3.4", "0x1.2.3.4", "1e1.1.1.1",
    "\u0661.\u0662.\u0663.\u0664", "\uff11.2.3.4", "1.2.3.\u0664", "1.2.3.4%eth0",
    "fe80::1%eth0", "fe80::1%", "::1",
    "::ffff:1.2.3.4", "::ffff:1.2.3.256", "2001:db8::1", "2001:db8::1/64", "1.2.3.4/32",
    "1.2.3.4:80", "[::1]", "localhost", "1_0.1.1.1", "1.2.3.4\u200b",
]  # fmt: skip


@pytest.mark.parametrize("text", HOSTILE_IPS)
def test_a_hostile_client_ip_is_judged_as_ipaddress_judges_it(text: str) -> None:
    assert _client_ip_valid(text) == _ip_accepted(text)


def test_random_client_ips_are_judged_as_ipaddress_judges_them() -> None:
    rng = random.Random(13)
    alphabet = "0123456789.....:%af \n\u0663"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
        assert _client_ip_valid(text) == _ip_accepted(text), repr(text)


@pytest.mark.parametrize("pattern", [IDENTIFIER_PATTERN, ORGANIZATION_PATTERN, SCOPE_PATTERN])
def test_identifiers_are_judged_by_their_pattern_character_by_character(
    pattern: object,
) -> None:
    characters = [*map(chr, range(0x3000)), "\u3000", "\ufeff", "\U0001f680", "\udc80"]
    for character in characters:
        for text in (character, f"a{character}b", f"{character}{character}"):
            violations: list[object] = []
            _check_identifier(violations, "f", text, 256, pattern)  # type: ignore[arg-type]
            assert (not violations) == bool(pattern.fullmatch(text)), repr(text)  # type: ignore[attr-defined]


def test_attribute_strings_are_bounded_wherever_they_are() -> None:
    longest = LIMITS.max_string_length
    cases = {
        "subject.attributes.name": {"name": "x" * (longest + 1)},
        "subject.attributes.team.name": {"team": {"name": "x" * (longest + 1)}},
        "subject.attributes.groups[1]": {"groups": ["a", "x" * (longest + 1)]},
    }
    for field, attributes in cases.items():
        checked = replace(BASE, subject=replace(BASE.subject, attributes=attributes))
        violations = validate_request(checked, LIMITS)
        assert [(v.field, v.description) for v in violations] == [
            (field, f"longer than {longest} characters")
        ]
    at_bound = {"name": "x" * longest, "groups": ["x" * longest]}
    checked = replace(BASE, subject=replace(BASE.subject, attributes=at_bound))
    assert validate_request(checked, LIMITS) == []
