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


def invalid_argument(
    violations: Iterable[tuple[str, str]], *, docs_url: str, request_id: str = ""
) -> grpc.Status:
    """A gRPC status naming every (field, description) pair, in the message and in the details."""
    pairs = list(violations) or [("", "invalid request")]
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in pairs
        ]
    )
    fields = sorted({field for field, _ in pairs if field})
    metadata = {"fields": ",".join(fields)}
    if request_id:
        metadata["request_id"] = request_id
    info = error_details_pb2.ErrorInfo(
        reason=VALIDATION_REASON, domain=ERROR_DOMAIN, metadata=metadata
    )
    help_ = error_details_pb2.Help(
        links=[error_details_pb2.Help.Link(description=VALIDATION_REASON, url=docs_url)]
    )
    message = "invalid request: " + "; ".join(
        f"{field}: {description}" if field else description for field, description in pairs
    )
    details = []
    for detail in (bad_request, info, help_):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=details)
    return rpc_status.to_status(status)
