"""The broker's client for the PDP: deadlines, safe retries, TLS and bearer auth, fail closed.

    from policy_engine.client import PdpClient, check_request

    with PdpClient("pdp.internal:50051", ca_file="ca.pem", bearer_token=token) as pdp:
        answer = pdp.decide(check_request("acme", "alice", "pr-reviewer", "github", "repo"))
        if not answer.allowed:
            return error(answer.reasons[0].code, answer.reasons[0].http_status)

`check`/`check_batch` raise `grpc.RpcError`; `decide`/`decide_batch` never raise: any RPC failure
is a DENY with reason `kontext_server_error`, so no error can ever turn into an allow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.domain.codes import ErrorCode

SERVICE = "kontext.pdp.v1.PolicyDecisionService"
DEFAULT_TIMEOUT_SECONDS = 0.5

# Decisions are reads: retrying one is always safe. Only UNAVAILABLE (the call never reached a
# server, or the connection broke) is retried; a deadline or a refusal is not.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.02s",
                    "maxBackoff": "0.2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

_SUBJECT_KINDS = {
    "user": pdp_pb2.SUBJECT_KIND_USER,
    "service_account": pdp_pb2.SUBJECT_KIND_SERVICE_ACCOUNT,
    "external_user": pdp_pb2.SUBJECT_KIND_EXTERNAL_USER,
}
_CONNECTIONS = {
    None: pdp_pb2.CONNECTION_STATE_UNSPECIFIED,
    True: pdp_pb2.CONNECTION_STATE_ACTIVE,
    False: pdp_pb2.CONNECTION_STATE_ABSENT,
}


def _struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if not values:
        return None
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct


def check_request(
    organization: str,
    subject: str,
    application: str,
    integration: str,
    scope: str,
    *,
    subject_kind: str = "user",
    subject_attributes: Mapping[str, Any] | None = None,
    access_token: str = "",
    application_attributes: Mapping[str, Any] | None = None,
    integration_attributes: Mapping[str, Any] | None = None,
    connected: bool | None = None,
    client_ip: str = "",
    session_id: str = "",
    context_attributes: Mapping[str, Any] | None = None,
    request_id: str = "",
    explain: bool = False,
) -> pdp_pb2.CheckRequest:
    """A CheckRequest from plain values (`connected`: None = not known to the broker)."""
    return pdp_pb2.CheckRequest(
        organization=organization,
        subject=pdp_pb2.Subject(
            id=subject,
            kind=_SUBJECT_KINDS[subject_kind],
            attributes=_struct(subject_attributes),
            access_token=access_token,
        ),
        application=pdp_pb2.Application(id=application, attributes=_struct(application_attributes)),
        integration=pdp_pb2.Integration(id=integration, attributes=_struct(integration_attributes)),
        scope=scope,
        context=pdp_pb2.RequestContext(
            connection=_CONNECTIONS[connected],
            client_ip=client_ip,
            session_id=session_id,
            attributes=_struct(context_attributes),
        ),
        request_id=request_id,
        explain=explain,
    )


@dataclass(frozen=True)
class Answer:
    """A decision as the broker uses it; `allowed` is True only for an explicit ALLOW."""

    response: pdp_pb2.CheckResponse

    @property
    def allowed(self) -> bool:
        return self.response.effect == pdp_pb2.EFFECT_ALLOW

    @property
    def reasons(self) -> Sequence[pdp_pb2.Reason]:
        return self.response.reasons


def server_error_answer(error: grpc.RpcError | Exception, request_id: str = "") -> Answer:
    """What an RPC failure means for the broker: a deny it can pass on unchanged."""
    code = error.code().name if isinstance(error, grpc.RpcError) else type(error).__name__
    reason = pdp_pb2.Reason(
        code=ErrorCode.SERVER_ERROR.value,
        http_status=ErrorCode.SERVER_ERROR.http_status,
        layer=pdp_pb2.LAYER_SYSTEM,
        policy="client",
        rule="rpc-failed",
        message=f"the policy decision point could not be asked ({code}); denying",
    )
    return Answer(
        pdp_pb2.CheckResponse(effect=pdp_pb2.EFFECT_DENY, reasons=[reason], request_id=request_id)
    )


class _BearerAuth(grpc.AuthMetadataPlugin):
    def __init__(self, token: str | Callable[[], str]) -> None:
        self._token = token

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        token = self._token() if callable(self._token) else self._token
        callback((("authorization", f"Bearer {token}"),), None)


class PdpClient:
    """One channel, reused for every call (channels are expensive; calls are cheap)."""

    def __init__(
        self,
        target: str,
        *,
        ca_file: str | None = None,
        client_cert_file: str | None = None,
        client_key_file: str | None = None,
        bearer_token: str | Callable[[], str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        insecure_bearer: bool = False,
    ) -> None:
        """TLS when `ca_file` is given (mutual TLS with the client cert and key as well).

        A bearer token is only ever sent over TLS, unless `insecure_bearer` (tests, loopback).
        """
        self.timeout = timeout
        options = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        if ca_file is None:
            if bearer_token is not None and not insecure_bearer:
                raise ValueError("a bearer token needs TLS (ca_file), or insecure_bearer=True")
            if bearer_token is not None:
                interceptor = _MetadataInterceptor(bearer_token)
                self._channel = grpc.intercept_channel(
                    grpc.insecure_channel(target, options=options), interceptor
                )
            else:
                self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_file).read_bytes(),
                private_key=Path(client_key_file).read_bytes() if client_key_file else None,
                certificate_chain=Path(client_cert_file).read_bytes() if client_cert_file else None,
            )
            if bearer_token is not None:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.metadata_call_credentials(_BearerAuth(bearer_token))
                )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pdp_pb2_grpc.PolicyDecisionServiceStub(self._channel)

    def check(
        self, request: pdp_pb2.CheckRequest, *, timeout: float | None = None
    ) -> pdp_pb2.CheckResponse:
        return self._stub.Check(request, timeout=timeout or self.timeout)

    def check_batch(
        self, requests: Sequence[pdp_pb2.CheckRequest], *, timeout: float | None = None
    ) -> list[pdp_pb2.CheckResponse]:
        batch = pdp_pb2.CheckBatchRequest(items=list(requests))
        return list(self._stub.CheckBatch(batch, timeout=timeout or self.timeout).results)

    def decide(self, request: pdp_pb2.CheckRequest, *, timeout: float | None = None) -> Answer:
        try:
            return Answer(self.check(request, timeout=timeout))
        except grpc.RpcError as error:
            return server_error_answer(error, request.request_id)

    def decide_batch(
        self, requests: Sequence[pdp_pb2.CheckRequest], *, timeout: float | None = None
    ) -> list[Answer]:
        try:
            return [Answer(r) for r in self.check_batch(requests, timeout=timeout)]
        except grpc.RpcError as error:
            return [server_error_answer(error, r.request_id) for r in requests]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PdpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Adds the bearer token on a plaintext channel (where call credentials are refused)."""

    def __init__(self, token: str | Callable[[], str]) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        token = self._token() if callable(self._token) else self._token
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
        return continuation(details._replace(metadata=metadata), request)
