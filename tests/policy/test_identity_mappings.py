"""`kind: IdentityMapping` documents through the real loader: what loads, and every broken
document refused with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.policy.identities import Refused, Resolved
from tests.policy_builder import allow_all, write_organization

MAPPING = """\
kind: IdentityMapping
namespace: partner-portal
description: Partner portal accounts.
applications: [support-copilot]
identities:
  partner-user-123: alice
  "auth0|42": bob
"""


def organization(tmp_path: Path, **files: str) -> Path:
    folder = write_organization(
        tmp_path,
        "acme",
        applications=["support-copilot", "release-bot"],
        policies=[allow_all("org"), allow_all("user"), allow_all("application")],
    )
    for name, text in files.items():
        (folder / name).write_text(text)
    return tmp_path


def problems(tmp_path: Path, **files: str) -> str:
    with pytest.raises(PolicyLoadError) as error:
        load_policy_set(organization(tmp_path, **files))
    return str(error.value)


def test_a_mapping_loads_and_resolves(tmp_path: Path) -> None:
    second = MAPPING.replace("partner-portal", "vendors").replace("support-copilot", "release-bot")
    policies = load_policy_set(organization(tmp_path, **{"p.yaml": MAPPING, "v.yaml": second}))
    mappings = policies.organizations["acme"].identities
    assert mappings.resolve("support-copilot", "", "partner-user-123") == Resolved(
        "alice", "partner-portal"
    )
    assert mappings.resolve("support-copilot", "partner-portal", "auth0|42") == Resolved(
        "bob", "partner-portal"
    )
    assert mappings.resolve("release-bot", "vendors", "auth0|42") == Resolved("bob", "vendors")
    # The application is not in that namespace, or the ID is not linked.
    refused = mappings.resolve("support-copilot", "vendors", "auth0|42")
    assert isinstance(refused, Refused) and not refused.mode_allowed
    refused = mappings.resolve("support-copilot", "", "partner-user-999")
    assert isinstance(refused, Refused) and refused.mode_allowed


def test_an_empty_identities_map_loads(tmp_path: Path) -> None:
    text = MAPPING.split("identities:")[0] + "identities: {}\n"
    policies = load_policy_set(organization(tmp_path, **{"p.yaml": text}))
    refused = policies.organizations["acme"].identities.resolve("support-copilot", "", "x")
    assert isinstance(refused, Refused) and refused.mode_allowed


def test_an_application_may_be_in_several_namespaces(tmp_path: Path) -> None:
    second = MAPPING.replace("partner-portal", "second-issuer").replace("alice", "carol")
    policies = load_policy_set(organization(tmp_path, **{"a.yaml": MAPPING, "b.yaml": second}))
    mappings = policies.organizations["acme"].identities
    assert mappings.by_application["support-copilot"] == ("partner-portal", "second-issuer")
    ambiguous = mappings.resolve("support-copilot", "", "partner-user-123")
    assert isinstance(ambiguous, Refused) and not ambiguous.mode_allowed
    assert "must name subject.namespace" in ambiguous.message
    assert mappings.resolve("support-copilot", "second-issuer", "partner-user-123") == Resolved(
        "carol", "second-issuer"
    )


BROKEN = [
    # (what, the file's text, line, what the problem says)
    ("unknown key", MAPPING + "issuer: https://idp\n", 8, "unknown field 'issuer'"),
    ("missing namespace", MAPPING.replace("namespace: partner-portal\n", ""), 1, "'namespace'"),
    ("missing applications", MAPPING.replace("applications: [support-copilot]\n", ""), 1,
     "missing required field 'applications'"),
    ("bad namespace", MAPPING.replace("partner-portal", "partner portal"), 2, "must match"),
    ("application not in catalog", MAPPING.replace("support-copilot", "ghost-bot"), 4,
     "application 'ghost-bot' is not in the organization's catalog"),
    ("application glob", MAPPING.replace("[support-copilot]", '["*"]'), 4, "globs"),
    ("duplicate external ID", MAPPING + "  partner-user-123: carol\n", 8, "duplicate key"),
    ("external ID with a space", MAPPING + '  "a b": carol\n', 8, "external user ID 'a b'"),
    ("external ID a number", MAPPING + "  12345: carol\n", 8, "in quotes"),
    ("person with a tab", MAPPING + '  c-1: "car\\tol"\n', 8, "maps to a user ID that"),
    ("person a number", MAPPING + "  c-1: 7\n", 8, "maps to a user ID that must be"),
    ("person null", MAPPING + "  c-1: null\n", 8, "maps to a user ID that must be"),
    ("person too long", MAPPING + f"  c-1: {'a' * 257}\n", 8, "longer than 256"),
    ("identities a list", MAPPING.split("identities:")[0] + "identities: [alice]\n", 5,
     "'identities' must map external user IDs"),
    ("kind misspelt", MAPPING.replace("IdentityMapping", "IdentityMap"), 1,
     "'kind' must be"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "text", "line", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_mapping_is_refused_with_its_line(
    tmp_path: Path, what: str, text: str, line: int, message: str
) -> None:
    found = problems(tmp_path, **{"partners.yaml": text})
    assert f"partners.yaml:{line}:" in found and message in found, found


def test_a_namespace_declared_twice_names_both_places(tmp_path: Path) -> None:
    found = problems(tmp_path, **{"a.yaml": MAPPING, "b.yaml": MAPPING})
    assert "b.yaml:1:" in found and "duplicate IdentityMapping namespace 'partner-portal'" in found
    assert "a.yaml:1" in found  # where the first one is


@pytest.mark.parametrize(
    ("condition", "loads"),
    [
        ('subject.external.namespace == "partner-portal"', True),
        ('subject.external.id.startsWith("partner-")', True),
        ('size(subject.actors) > 0 && subject.actors[0].sub == "agent-x"', True),
        ('subject.actors.exists(a, a.iss == "https://idp")', True),
        ('subject.external.person == "alice"', False),  # no such field
        ("subject.external.namespace + 1 == 2", False),  # a string plus an int
        ('subject.actors == "agent-x"', False),  # a list is no string
        ("size(subject.external) > 0 && subject.external", False),  # not a bool
    ],
)
def test_the_new_subject_fields_are_type_checked_at_load(
    tmp_path: Path, condition: str, loads: bool
) -> None:
    folder = write_organization(
        tmp_path,
        "acme",
        applications=["support-copilot"],
        policies=[{"name": "p", "layer": "org", "rules": [
            {"name": "r", "effect": "allow", "condition": condition}
        ]}],
    )  # fmt: skip
    assert folder.is_dir()
    if loads:
        load_policy_set(tmp_path)
    else:
        with pytest.raises(PolicyLoadError, match="invalid condition"):
            load_policy_set(tmp_path)
