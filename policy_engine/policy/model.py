"""The policy set as operators write it, before compilation: immutable values with positions."""

from __future__ import annotations

from collections.abc import Mapping
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
    # The claim binding a token to its application: client_id (RFC 9068), azp (OIDC) or none.
    application_claim: str = "client_id"
    # A claim whose value must be the organization's name (e.g. org_id); None: not bound.
    organization_claim: str | None = None
    # With discovery: hosts (`host` or `host:port`) a jwks_uri may name besides the issuer's.
    jwks_hosts: tuple[str, ...] = ()
    line: int = 0


@dataclass(frozen=True, slots=True)
class OrganizationConfig:
    name: str
    defaults: dict[Layer, Effect]
    catalog: Catalog
    position: Position
    tokens: TokenSettings | None = None


@dataclass(frozen=True, slots=True)
class QuotaDefinition:
    """A `kind: Quota` document as written (see policy_engine.quota.spec): at most `limit`
    ALLOWs per `window_ms` milliseconds for the requests `target` selects, counted per
    distinct value of the `per` parts (a subset of QUOTA_PER_PARTS, in the order written;
    empty: one counter for the whole organization)."""

    name: str
    description: str
    target: Target
    limit: int
    window_ms: int
    algorithm: str  # "fixed" or "sliding" (policy_engine.quota.model.Algorithm values)
    per: tuple[str, ...]
    when_unavailable: str  # "deny" or "allow" (WhenUnavailable values)
    position: Position


# What a quota may count per (the organization is always part of a quota's key).
QUOTA_PER_PARTS: tuple[str, ...] = ("subject", "application", "integration", "scope")


@dataclass(frozen=True, slots=True)
class OrganizationSource:
    """Everything one organization's folder declares."""

    config: OrganizationConfig
    policies: tuple[Policy, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class IdentityMapping:
    """A `kind: IdentityMapping` document as written (see policy_engine.policy.identities):
    the applications that may act for the external user IDs of `namespace`, and the person
    (IdP user ID) each external ID is. `applications_line` is where the list is written."""

    namespace: str
    description: str
    applications: tuple[str, ...]
    identities: Mapping[str, str]
    position: Position
    applications_line: int
