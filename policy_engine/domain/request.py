"""The question the PDP answers, as plain immutable values shared by server, CLI and engine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class SubjectKind(StrEnum):
    USER = "user"
    SERVICE_ACCOUNT = "service_account"
    EXTERNAL_USER = "external_user"


class ConnectionState(StrEnum):
    UNKNOWN = "unknown"  # the broker did not say
    ACTIVE = "active"
    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class Subject:
    id: str
    kind: SubjectKind = SubjectKind.USER
    attributes: Mapping[str, Any] = field(default_factory=dict)
    # Never logged or echoed; verified claims (a later issue) are exposed instead.
    access_token: str = field(default="", repr=False)
    # For EXTERNAL_USER: the IdentityMapping namespace of the external ID ("" = the
    # application's only one); empty for other kinds (validation refuses it otherwise).
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class Resource:
    """An application or an integration: an ID from the organization's catalog plus attributes."""

    id: str
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestContext:
    connection: ConnectionState = ConnectionState.UNKNOWN
    client_ip: str = ""
    time: datetime | None = None  # the broker's clock; the PDP's own when None
    session_id: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckRequest:
    organization: str
    subject: Subject
    application: Resource
    integration: Resource
    scope: str
    context: RequestContext = field(default_factory=RequestContext)
    request_id: str = ""
    explain: bool = False
