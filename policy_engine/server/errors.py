"""INVALID_ARGUMENT statuses with rich details, so a broker can name the bad field to its caller.

The details follow Google's error model (google.rpc.Status carrying BadRequest, ErrorInfo and
Help), which grpcio-status puts in the `grpc-status-details-bin` trailer; clients decode it with
`grpc_status.rpc_status.from_call`.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from policy_engine.domain.codes import ErrorCode

ERROR_DOMAIN = "pdp.kontext.dev"
VALIDATION_REASON = ErrorCode.VALIDATION_ERROR.value
# Trailers must stay well under gRPC's 8 KiB metadata limit (past it the client sees
# RESOURCE_EXHAUSTED instead of our error): bound every part of the status.
MAX_VIOLATIONS = 8
MAX_FIELD_CHARS = 120
MAX_DESCRIPTION_CHARS = 160
MAX_MESSAGE_CHARS = 1024


class Status(grpc.Status):
    """A status to abort a call with (`context.abort_with_status`): code, details, no
    trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = ()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [
        (_clip(f, MAX_FIELD_CHARS), _clip(d, MAX_DESCRIPTION_CHARS))
        for f, d in pairs[:MAX_VIOLATIONS]
    ]
    if len(pairs) > MAX_VIOLATIONS:
        kept.append(("", f"and {len(pairs) - MAX_VIOLATIONS} more problems"))
    return kept


def invalid_argument(
    violations: Iterable[tuple[str, str]], *, docs_url: str, request_id: str = ""
) -> grpc.Status:
    """A gRPC status naming every (field, description) pair, in the message and in the details."""
    pairs = _bounded(list(violations)) or [("", "invalid request")]
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in pairs
        ]
    )
    fields = sorted({field for field, _ in pairs if field})
    metadata = {"fields": ",".join(fields)}
    if request_id:
        metadata["request_id"] = _clip(request_id, MAX_FIELD_CHARS)
    info = error_details_pb2.ErrorInfo(
        reason=VALIDATION_REASON, domain=ERROR_DOMAIN, metadata=metadata
    )
    help_ = error_details_pb2.Help(
        links=[error_details_pb2.Help.Link(description=VALIDATION_REASON, url=docs_url)]
    )
    message = _clip(
        "invalid request: " + "; ".join(f"{f}: {d}" if f else d for f, d in pairs),
        MAX_MESSAGE_CHARS,
    )
    details = []
    for detail in (bad_request, info, help_):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=details)
    return rpc_status.to_status(status)
