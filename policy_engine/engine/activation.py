"""The CEL view of a request: declared once for the compiler, built once per request."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from policy_engine.cel import Declarations
from policy_engine.cel.types import BOOL, DYN, STRING, TIMESTAMP, list_of, map_of, record
from policy_engine.domain.request import CheckRequest, ConnectionState

_NO_ACTORS: tuple[Mapping[str, Any], ...] = ()
# subject.external of every subject that is not an external user (read-only: it is shared).
NOT_EXTERNAL: Mapping[str, str] = MappingProxyType({"id": "", "namespace": ""})

# Attributes and claims are whatever the broker and the token send: dynamic values, checked
# when a rule reads them (a wrong type fails closed at evaluation).
_ATTRIBUTES = map_of(STRING, DYN)

# Every variable a condition may read, with its CEL type (what build_activation binds): only
# the fields listed are accepted, and calls on known types are checked at load time.
CEL_DECLARATIONS = Declarations.typed(
    {
        "organization": STRING,
        # For an external user, `id` is the person the external ID maps to and `external`
        # holds the external ID and its namespace (empty strings for other kinds); `actors`
        # is the verified token's delegation chain (RFC 8693 `act`), current actor first.
        "subject": record(
            id=STRING,
            kind=STRING,
            attributes=_ATTRIBUTES,
            claims=_ATTRIBUTES,
            actors=list_of(_ATTRIBUTES),
            external=record(id=STRING, namespace=STRING),
        ),
        "application": record(id=STRING, attributes=_ATTRIBUTES),
        "integration": record(id=STRING, attributes=_ATTRIBUTES),
        "scope": STRING,
        "context": record(
            connection=STRING,
            connected=BOOL,
            client_ip=STRING,
            session_id=STRING,
            attributes=_ATTRIBUTES,
        ),
        "now": TIMESTAMP,
    }
)


def build_activation(
    request: CheckRequest,
    now: datetime,
    claims: Mapping[str, Any],
    actors: tuple[Mapping[str, Any], ...] = _NO_ACTORS,
    external: Mapping[str, str] = NOT_EXTERNAL,
) -> dict[str, Any]:
    """Converted once per request and shared by every rule that runs for it. `request` is
    the one decided (for an external user, with the person's ID as subject ID); `external`
    is {"id", "namespace"} of the external user ID, empty strings for other kinds."""
    context = request.context
    return {
        "organization": request.organization,
        "subject": {
            "id": request.subject.id,
            "kind": request.subject.kind.value,
            "attributes": request.subject.attributes,
            "claims": claims,  # only ever claims whose signature was verified
            "actors": list(actors),  # from verified claims only, as `claims`
            "external": external,
        },
        "application": {"id": request.application.id, "attributes": request.application.attributes},
        "integration": {"id": request.integration.id, "attributes": request.integration.attributes},
        "scope": request.scope,
        "context": {
            "connection": context.connection.value,
            "connected": context.connection is ConnectionState.ACTIVE,
            "client_ip": context.client_ip,
            "session_id": context.session_id,
            "attributes": context.attributes,
        },
        "now": now,
    }
