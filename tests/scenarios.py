"""DOMAIN.md's scenario table as data, shared by the engine, CLI and gRPC tests."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_POLICIES = REPO / "policies"

ENGINEERING = {"groups": ["engineering"]}
SALES = {"groups": ["sales"]}


def pdp(*args: str) -> subprocess.CompletedProcess[str]:
    """The `pdp` command run as operators run it: a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def expired_token(subject: str = "alice") -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": subject, "iat": now - 7200, "exp": now - 3600},
        "a-test-secret-that-is-long-enough-for-hs256",
        algorithm="HS256",
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    subject: str = "alice"
    subject_kind: str = "user"
    subject_attributes: dict[str, Any] = field(default_factory=lambda: dict(ENGINEERING))
    application: str = "pr-reviewer"
    integration: str = "github"
    scope: str = "repo"
    organization: str = "acme"
    connection: str = "unknown"
    token: str = ""
    # Expected:
    decision: str = "ALLOW"
    code: str | None = None
    layer: str | None = None
    field: str | None = None  # for validation errors


SCENARIOS: list[Scenario] = [
    Scenario("allowed"),
    Scenario(
        "org denies delete_repo",
        scope="delete_repo",
        decision="DENY",
        code="kontext_policy_denied",
        layer="org",
    ),
    Scenario(
        "user denies admin:org",
        scope="admin:org",
        decision="DENY",
        code="kontext_policy_denied",
        layer="user",
    ),
    Scenario(
        "application allows only github",
        integration="linear",
        scope="read",
        decision="DENY",
        code="kontext_policy_denied",
        layer="application",
    ),
    Scenario(
        "sales falls to the org default",
        subject="bob",
        subject_attributes=SALES,
        decision="DENY",
        code="kontext_policy_denied",
        layer="org",
    ),
    Scenario(
        "no connection",
        connection="absent",
        decision="DENY",
        code="kontext_integration_connection_required",
        layer="system",
    ),
    Scenario(
        "integration not in catalog",
        integration="gitlab",
        decision="DENY",
        code="kontext_not_found",
        layer="system",
    ),
    Scenario(
        "expired token",
        token="EXPIRED",
        decision="DENY",
        code="kontext_authorization_required",
        layer="system",
    ),
    Scenario(
        "service account",
        subject="deploy-bot",
        subject_kind="service_account",
        decision="DENY",
        code="kontext_policy_denied",
        layer="system",
    ),
    Scenario(
        "empty subject",
        subject="",
        decision="DENY",
        code="kontext_validation_error",
        layer="system",
        field="subject.id",
    ),
    Scenario(
        "scope with a space",
        scope="repo admin",
        decision="DENY",
        code="kontext_validation_error",
        layer="system",
        field="scope",
    ),
    Scenario(
        "scope with a quote",
        scope='repo"',
        decision="DENY",
        code="kontext_validation_error",
        layer="system",
        field="scope",
    ),
    # globex's catalog has no pr-reviewer: its own policies decide, acme's never leak in.
    Scenario(
        "same tuple in globex",
        organization="globex",
        decision="DENY",
        code="kontext_not_found",
        layer="system",
    ),
]


def token_for(scenario: Scenario) -> str:
    return expired_token(scenario.subject) if scenario.token == "EXPIRED" else scenario.token
