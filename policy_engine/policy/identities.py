"""External identity mapping ("userId mode"): which applications may act for external user
IDs, and which person each external ID is.

An organization declares it in `kind: IdentityMapping` documents beside its policies, one
namespace each (a partner portal, a second issuer, ...):

    kind: IdentityMapping
    namespace: partner-portal
    applications: [support-copilot]
    identities:
      partner-user-123: alice

A request whose subject kind is `external_user` names an external ID and, optionally, its
namespace (`Subject.namespace`; empty means the application's only namespace). The engine
resolves it before any policy layer runs (`IdentityMappings.resolve`): the application must be
allowed in that namespace, and the ID must be mapped; the request is then decided as the
person the ID maps to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Namespaces listed in a reason before it says "and N more": a reason stays one short line.
_LISTED_NAMESPACES = 5


@dataclass(frozen=True, slots=True)
class IdentityNamespace:
    """One IdentityMapping document, compiled: the applications that may act for its
    external IDs, and each external ID's person (the IdP user ID)."""

    name: str
    applications: frozenset[str]
    identities: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Resolved:
    """An external ID mapped to its `person` in `namespace`."""

    person: str
    namespace: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Why an external ID cannot be decided as a person: `mode_allowed` False when the
    application may not act for external users there (or the namespace is unknown or not
    named while several apply); True when it may, but the ID has no mapping. `namespace` is
    the one looked in, when known."""

    mode_allowed: bool
    message: str
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class IdentityMappings:
    """An organization's namespaces by name, and, per application, the namespaces it may act
    for external IDs in (sorted)."""

    namespaces: Mapping[str, IdentityNamespace]
    by_application: Mapping[str, tuple[str, ...]]

    @classmethod
    def of(cls, namespaces: list[IdentityNamespace]) -> IdentityMappings:
        by_application: dict[str, list[str]] = {}
        for namespace in sorted(namespaces, key=lambda n: n.name):
            for application in namespace.applications:
                by_application.setdefault(application, []).append(namespace.name)
        return cls(
            MappingProxyType({n.name: n for n in namespaces}),
            MappingProxyType({app: tuple(names) for app, names in by_application.items()}),
        )

    def resolve(self, application: str, namespace: str, external_id: str) -> Resolved | Refused:
        """The person `external_id` (in `namespace`, or the application's only namespace
        when empty) is, for requests `application` makes; or why it cannot be resolved.
        Messages quote every request value with repr (validated IDs: printable, bounded)."""
        allowed = self.by_application.get(application, ())
        if not namespace:
            if not allowed:
                return Refused(
                    False,
                    f"application {application!r} may not act for external user IDs "
                    "(it is in no IdentityMapping's applications)",
                )
            if len(allowed) > 1:
                listed = ", ".join(allowed[:_LISTED_NAMESPACES])
                more = len(allowed) - _LISTED_NAMESPACES
                listed += f" and {more} more" if more > 0 else ""
                return Refused(
                    False,
                    f"application {application!r} acts for external user IDs in several "
                    f"namespaces ({listed}): the request must name subject.namespace",
                )
            namespace = allowed[0]
        elif namespace not in allowed:
            known = namespace in self.namespaces
            return Refused(
                False,
                f"application {application!r} may not act for external user IDs in "
                f"namespace {namespace!r}" + ("" if known else " (no IdentityMapping declares it)"),
                namespace,
            )
        person = self.namespaces[namespace].identities.get(external_id)
        if person is None:
            return Refused(
                True,
                f"external user ID {external_id!r} is not linked to an account in namespace "
                f"{namespace!r}: the person must sign in once to link it",
                namespace,
            )
        return Resolved(person, namespace)


NO_MAPPINGS = IdentityMappings(MappingProxyType({}), MappingProxyType({}))
