"""The policy set as operators write it, before compilation: immutable values with positions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Effect, Layer

# Codes a deny rule may answer with; the others belong to the engine's own checks.
RULE_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.POLICY_DENIED,
        ErrorCode.INTEGRATION_CONNECTION_REQUIRED,
        ErrorCode.AUTHORIZATION_REQUIRED,
        ErrorCode.RATE_LIMITED,
    }
)

TARGET_DIMENSIONS: tuple[str, ...] = ("subjects", "applications", "integrations", "scopes")


@dataclass(frozen=True, slots=True)
class Position:
    file: Path
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Target:
    """Which requests a policy or rule applies to: per dimension, exact IDs or globs."""

    subjects: tuple[str, ...] = ("*",)
    applications: tuple[str, ...] = ("*",)
    integrations: tuple[str, ...] = ("*",)
    scopes: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    effect: Effect
    condition: str | None  # CEL; None means the rule applies whenever its target matches
    target: Target
    message: str
    code: ErrorCode
    position: Position
    condition_position: Position


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    layer: Layer
    description: str
    target: Target
    rules: tuple[Rule, ...]
    position: Position
    cache: bool = True  # a policy may opt its decisions out of the decision cache


@dataclass(frozen=True, slots=True)
class Catalog:
    integrations: frozenset[str]
    applications: frozenset[str]


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """The `tokens:` section of an Organization document, before its keys are loaded."""

    required: bool = False
    issuer: str | None = None
    audience: str | None = None
    jwks_file: str | None = None  # relative to the organization's folder
    jwks_url: str | None = None
    # With neither: where the issuer's metadata is looked for (auto, oauth or openid).
    discovery: str = "auto"
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_seconds: int = 30
    external_subject_claim: str | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class OrganizationConfig:
    name: str
    defaults: dict[Layer, Effect]
    catalog: Catalog
    position: Position
    tokens: TokenSettings | None = None


@dataclass(frozen=True, slots=True)
class OrganizationSource:
    """Everything one organization's folder declares."""

    config: OrganizationConfig
    policies: tuple[Policy, ...] = field(default=())
