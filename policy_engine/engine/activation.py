"""The CEL view of a request: declared once for the compiler, built once per request."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from policy_engine.cel import Declarations
from policy_engine.cel.types import BOOL, DYN, STRING, TIMESTAMP, map_of, record
from policy_engine.domain.request import CheckRequest, ConnectionState

# Attributes and claims are whatever the broker and the token send: dynamic values, checked
# when a rule reads them (a wrong type fails closed at evaluation).
_ATTRIBUTES = map_of(STRING, DYN)

# Every variable a condition may read, with its CEL type (what build_activation binds): only
# the fields listed are accepted, and calls on known types are checked at load time.
CEL_DECLARATIONS = Declarations.typed(
    {
        "organization": STRING,
        "subject": record(id=STRING, kind=STRING, attributes=_ATTRIBUTES, claims=_ATTRIBUTES),
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
    request: CheckRequest, now: datetime, claims: Mapping[str, Any]
) -> dict[str, Any]:
    """Converted once per request and shared by every rule that runs for it."""
    context = request.context
    return {
        "organization": request.organization,
        "subject": {
            "id": request.subject.id,
            "kind": request.subject.kind.value,
            "attributes": request.subject.attributes,
            "claims": claims,  # only ever claims whose signature was verified
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
