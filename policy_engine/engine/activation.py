"""The CEL view of a request: declared once for the compiler, built once per request."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from policy_engine.cel import Declarations
from policy_engine.domain.request import CheckRequest, ConnectionState

# Every variable a condition may read; fields listed are checked at load time.
CEL_DECLARATIONS = Declarations(
    variables={
        "organization": None,
        "subject": frozenset({"id", "kind", "attributes", "claims"}),
        "application": frozenset({"id", "attributes"}),
        "integration": frozenset({"id", "attributes"}),
        "scope": None,
        "context": frozenset({"connection", "connected", "client_ip", "session_id", "attributes"}),
        "now": None,
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
