"""The immutable, indexed policy set the engine decides with: built once per load."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from policy_engine.auth.keys import KeySource, RemoteKeySet
from policy_engine.auth.tokens import UNVERIFIED, TokenRules
from policy_engine.cel import CompiledExpression
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Effect, Layer
from policy_engine.policy.identities import NO_MAPPINGS, IdentityMappings
from policy_engine.policy.index import RuleIndex
from policy_engine.policy.model import Catalog
from policy_engine.policy.patterns import Matcher
from policy_engine.policy.quotas import NO_QUOTAS, OrganizationQuotas


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    policy: str
    name: str
    effect: Effect
    code: ErrorCode
    message: str
    condition: CompiledExpression | None
    # Only the matchers that can reject: a `*` dimension is dropped at compile time.
    subject_matchers: tuple[Matcher, ...]
    application_matchers: tuple[Matcher, ...]
    scope_matchers: tuple[Matcher, ...]
    reads_clock: bool
    cacheable: bool

    def applies_to(self, subject_id: str, application_id: str, scope: str) -> bool:
        for matcher in self.subject_matchers:
            if not matcher(subject_id):
                return False
        for matcher in self.application_matchers:
            if not matcher(application_id):
                return False
        for matcher in self.scope_matchers:  # noqa: SIM110 (no generator on the hot path)
            if not matcher(scope):
                return False
        return True


@dataclass(frozen=True, slots=True)
class RuleBucket:
    """The rules of one layer that can apply to one integration, denies apart from allows,
    each indexed by target (`RuleIndex.rules` holds them in (policy, rule) order)."""

    denies: RuleIndex[CompiledRule]
    allows: RuleIndex[CompiledRule]


EMPTY_BUCKET = RuleBucket(RuleIndex(()), RuleIndex(()))


@dataclass(frozen=True, slots=True)
class LayerIndex:
    default: Effect
    # Keyed by catalog integration: targets are resolved against the catalog at load time.
    by_integration: Mapping[str, RuleBucket]

    def bucket(self, integration: str) -> RuleBucket:
        return self.by_integration.get(integration, EMPTY_BUCKET)


@dataclass(frozen=True, slots=True)
class CompiledOrganization:
    name: str
    catalog: Catalog
    layers: Mapping[Layer, LayerIndex]
    policy_count: int
    rule_count: int
    tokens: TokenRules = UNVERIFIED
    quotas: OrganizationQuotas = NO_QUOTAS  # its `kind: Quota` documents, compiled
    # Its `kind: IdentityMapping` documents: who external user IDs are, and which
    # applications may act for them (policy_engine.policy.identities).
    identities: IdentityMappings = NO_MAPPINGS


@dataclass(frozen=True, slots=True)
class CompiledPolicySet:
    """The policy set; `key_sets` is derived from `organizations`.

    `key_sets` maps each organization that verifies subject tokens to its key source. A JWKS
    file's bytes count in `revision`, but a JWKS URL's keys change without any file changing:
    the decision cache keys token decisions by the key source's fingerprint too (see
    `policy_engine.cache.key`). A plain dict, read on every cache lookup; never modified.
    """

    revision: str  # content hash of every file in the set
    organizations: Mapping[str, CompiledOrganization]
    file_count: int
    # Every file the loader read or tried to read for this set (policy files, JWKS files, the
    # bundle signature): what the store watches and checks for changes during a load.
    files_read: tuple[FileRead, ...] = ()
    # A signed bundle's signing time (None when signatures are not required): a later load
    # of a bundle signed earlier is refused as a rollback (policy_engine.policy.bundle).
    signed_at: datetime | None = None
    key_sets: dict[str, KeySource] = field(init=False, repr=False, compare=False)
    # The organizations whose keys come from a JWKS URL (they refresh; a call whose token needs
    # a refresh waits for it: policy_engine.auth.pending), with the algorithms they accept.
    refreshing_keys: dict[str, tuple[RemoteKeySet, tuple[str, ...]]] = field(
        init=False, repr=False, compare=False
    )
    # Whether any organization declares a quota: without one, the pipeline never looks.
    has_quotas: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key_sets = {
            name: org.tokens.keys
            for name, org in self.organizations.items()
            if org.tokens.keys is not None
        }
        refreshing = {
            name: (keys, self.organizations[name].tokens.algorithms)
            for name, keys in key_sets.items()
            if isinstance(keys, RemoteKeySet)
        }
        object.__setattr__(self, "key_sets", key_sets)  # frozen: set once, here
        object.__setattr__(self, "refreshing_keys", refreshing)
        has_quotas = any(org.quotas for org in self.organizations.values())
        object.__setattr__(self, "has_quotas", has_quotas)


@dataclass(frozen=True, slots=True)
class FileRead:
    """One file a load read, or tried to read.

    `relative` is its `/`-separated path below the policy directory, as the loader named it
    (hidden or not); `real_path` is where that led, symlinks resolved (for a file that could
    not be read, as far as they resolve); `identity` is (st_dev, st_ino, st_size, st_mtime_ns,
    st_ctime_ns) of the file named, symlinks followed, taken just before it was read, or None
    when there was no file to stat.
    """

    relative: str
    real_path: str
    identity: tuple[int, int, int, int, int] | None
