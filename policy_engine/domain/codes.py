"""The platform's documented error codes, so the broker can pass reasons on unchanged."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    POLICY_DENIED = "kontext_policy_denied"
    INTEGRATION_CONNECTION_REQUIRED = "kontext_integration_connection_required"
    AUTHORIZATION_REQUIRED = "kontext_authorization_required"
    NOT_FOUND = "kontext_not_found"
    VALIDATION_ERROR = "kontext_validation_error"
    RATE_LIMITED = "kontext_rate_limited"
    SERVER_ERROR = "kontext_server_error"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.POLICY_DENIED: 403,
    ErrorCode.INTEGRATION_CONNECTION_REQUIRED: 403,
    ErrorCode.AUTHORIZATION_REQUIRED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.VALIDATION_ERROR: 400,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.SERVER_ERROR: 500,
}


def docs_url(base_url: str, code: ErrorCode) -> str:
    return f"{base_url.rstrip('/')}/errors/{code.value}"
