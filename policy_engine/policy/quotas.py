"""An organization's quotas, compiled: which quotas an ALLOW counts in, and in which bucket.

A `kind: Quota` document (see README "Quotas") becomes a `CompiledQuota`: its `QuotaSpec`
(what the counter store needs), the `per` parts its counters are keyed by, and its target
as matchers. `OrganizationQuotas` finds the quotas a request counts in as the policies'
`RuleIndex` finds rules: by catalog integration first (targets are resolved against the
catalog at load time), then by the most selective of the subject, application and scope
matchers, so a lookup costs O(matching quotas), not O(quotas).

A quota's bucket is the hex SHA-256 of a length-prefixed encoding of its `per` parts, names
and values (`bucket`): no value can forge another's bucket by containing a delimiter, and
changing `per` starts new counters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from policy_engine.policy.index import RuleIndex, applies_to_any
from policy_engine.policy.model import QUOTA_PER_PARTS, Catalog, QuotaDefinition
from policy_engine.policy.patterns import WILDCARD, Matcher, is_glob
from policy_engine.quota.model import Algorithm, Charge, QuotaSpec, WhenUnavailable

__all__ = ["NO_QUOTAS", "CompiledQuota", "OrganizationQuotas", "bucket", "compile_quotas"]

# Index of each `per` part in the (subject, application, integration, scope) tuple.
_PART_INDEX = {part: index for index, part in enumerate(QUOTA_PER_PARTS)}


def bucket(parts: Sequence[tuple[str, str]]) -> str:
    """The hex SHA-256 of (name, value) pairs, each string as a 4-byte big-endian length of
    its UTF-8 bytes followed by them: unambiguous whatever the values hold."""
    digest = hashlib.sha256()
    for name, value in parts:
        for text in (name, value):
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(4, "big"))
            digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True, eq=False)
class CompiledQuota:
    """One quota of an organization: its spec, `per` parts and target matchers (only those
    that can reject; the integration matcher is resolved into the index)."""

    spec: QuotaSpec
    per: tuple[str, ...]
    description: str
    subject_matchers: tuple[Matcher, ...]
    application_matchers: tuple[Matcher, ...]
    scope_matchers: tuple[Matcher, ...]
    # Where the `per` values sit in the (subject, application, integration, scope) tuple.
    _per_index: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_per_index", tuple(_PART_INDEX[p] for p in self.per))

    # RuleIndex reads `policy` and `name` to order its entries.
    @property
    def policy(self) -> str:
        return ""

    @property
    def name(self) -> str:
        return self.spec.name

    def applies_to(self, subject_id: str, application_id: str, scope: str) -> bool:
        for matchers, value in (
            (self.subject_matchers, subject_id),
            (self.application_matchers, application_id),
            (self.scope_matchers, scope),
        ):
            for matcher in matchers:
                if not matcher(value):
                    return False
        return True

    def charge(self, values: tuple[str, str, str, str]) -> Charge:
        """The charge for one ALLOW of (subject, application, integration, scope)."""
        return Charge(self.spec, bucket([(QUOTA_PER_PARTS[i], values[i]) for i in self._per_index]))


@dataclass(frozen=True, slots=True)
class OrganizationQuotas:
    """An organization's quotas: `quotas` in name order, and per catalog integration the
    index of those that can apply to it."""

    quotas: tuple[CompiledQuota, ...] = ()
    by_integration: Mapping[str, RuleIndex[CompiledQuota]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def __bool__(self) -> bool:
        return bool(self.quotas)

    def per_of(self, name: str) -> tuple[str, ...]:
        """The `per` parts of the quota called `name` (() when there is none)."""
        for quota in self.quotas:
            if quota.spec.name == name:
                return quota.per
        return ()

    def matching(
        self, subject: str, application: str, integration: str, scope: str, external_id: str = ""
    ) -> list[CompiledQuota]:
        """The quotas an ALLOW of this request counts in, in name order. For an external user,
        `subject` is the person its ID maps to and `external_id` the ID: a quota whose target
        names either counts it (a limit set on the external account is never skipped)."""
        index = self.by_integration.get(integration)
        if index is None:
            return []
        if not external_id:
            return [
                quota
                for quota in index.candidates(subject, application, scope)
                if quota.applies_to(subject, application, scope)
            ]
        return [
            quota
            for quota in index.candidates_for_any((subject, external_id), application, scope)
            if applies_to_any(quota, (subject, external_id), application, scope)
        ]

    def charges(
        self,
        subject: str,
        application: str,
        integration: str,
        scope: str,
        external_id: str = "",
    ) -> tuple[Charge, ...]:
        """The charges of one ALLOW of this request (empty: no quota counts it); `subject` is
        counted (for an external user, the person), `external_id` only selects quotas."""
        found = self.matching(subject, application, integration, scope, external_id)
        if not found:
            return ()
        values = (subject, application, integration, scope)
        return tuple(quota.charge(values) for quota in found)


NO_QUOTAS = OrganizationQuotas()


def compile_quotas(
    organization: str, catalog: Catalog, definitions: Iterable[QuotaDefinition]
) -> tuple[OrganizationQuotas, list[tuple[QuotaDefinition, str]]]:
    """The organization's quotas, and the problems found: (definition, message) for a name
    used twice (the first one is kept) and for an exact target ID not in the catalog."""
    problems: list[tuple[QuotaDefinition, str]] = []
    seen: dict[str, QuotaDefinition] = {}
    compiled: list[tuple[CompiledQuota, Matcher]] = []
    for definition in definitions:
        first = seen.setdefault(definition.name, definition)
        if first is not definition:
            problems.append((definition, f"duplicate quota name (first at {first.position})"))
            continue
        for dimension, known in (
            ("integrations", catalog.integrations),
            ("applications", catalog.applications),
        ):
            for value in getattr(definition.target, dimension):
                if value != WILDCARD and not is_glob(value) and value not in known:
                    problems.append(
                        (definition, f"{dimension[:-1]} {value!r} is not in the catalog")
                    )
        target = definition.target

        def matchers(patterns: tuple[str, ...]) -> tuple[Matcher, ...]:
            matcher = Matcher.of(patterns)
            return () if matcher.everything else (matcher,)

        spec = QuotaSpec(
            organization=organization,
            name=definition.name,
            limit=definition.limit,
            window_ms=definition.window_ms,
            algorithm=Algorithm(definition.algorithm),
            when_unavailable=WhenUnavailable(definition.when_unavailable),
        )
        quota = CompiledQuota(
            spec=spec,
            per=definition.per,
            description=definition.description,
            subject_matchers=matchers(target.subjects),
            application_matchers=matchers(target.applications),
            scope_matchers=matchers(target.scopes),
        )
        compiled.append((quota, Matcher.of(target.integrations)))
    if not compiled:
        return NO_QUOTAS, problems
    compiled.sort(key=lambda item: item[0].spec.name)
    by_integration: dict[str, RuleIndex[CompiledQuota]] = {}
    shared: dict[tuple[CompiledQuota, ...], RuleIndex[CompiledQuota]] = {}
    for integration in sorted(catalog.integrations):
        applicable = tuple(quota for quota, accepts in compiled if accepts(integration))
        if applicable:
            index = shared.get(applicable)
            if index is None:
                index = shared[applicable] = RuleIndex(applicable)
            by_integration[integration] = index
    quotas = tuple(quota for quota, _ in compiled)
    return OrganizationQuotas(quotas, MappingProxyType(by_integration)), problems
