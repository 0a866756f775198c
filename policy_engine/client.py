"""The broker's client for the PDP: deadlines, safe retries, TLS and bearer auth, fail closed.

    from policy_engine.client import PdpClient, check_request

    with PdpClient("pdp.internal:50051", ca_file="ca.pem", bearer_token=token) as pdp:
        answer = pdp.decide(check_request("acme", "alice", "pr-reviewer", "github", "repo"))
        if not answer.allowed:
            return error(answer.reasons[0].code, answer.reasons[0].http_status)

`check`/`check_batch` raise `grpc.RpcError`; `decide`/`decide_batch` never raise: any RPC failure
is a DENY with reason `kontext_server_error`, so no error can ever turn into an allow.
`check_request` carries every value exactly or raises `RequestValueError` naming it: the
server must never decide on a value other than the one the broker holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.domain.codes import ErrorCode
from policy_engine.errors import PolicyEngineError

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

MAX_SAFE_INTEGER = 2**53 - 1
"""The largest integer a `google.protobuf.Value` carries exactly: its numbers are IEEE 754
doubles, so 2^53 + 1 would arrive as 2^53 (RFC 7493 section 2.2, I-JSON's interoperable range)."""

MAX_ATTRIBUTE_NESTING = 30
"""Nesting bound of the builder (maps and lists, the top map being level 1): protobuf parsers
refuse messages nested deeper than 100 levels, which a Struct reaches at about 32 levels. The
server's own, configurable bound (`limits.max_attribute_depth`, 8 by default) is lower still."""


class RequestValueError(PolicyEngineError, ValueError):
    """A value the wire cannot carry exactly, or at all; `path` names it in the request.

    Paths use the request's field names, attributes as `subject.attributes.account`,
    `context.attributes.tags[2]`: the same spelling as the server's validation reasons.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ClientConfigError(PolicyEngineError, ValueError):
    """`PdpClient` arguments that cannot make a safe channel (a bearer token without TLS)."""


def _text(value: object, path: str) -> str:
    """`value` if it is text that UTF-8 can encode (protobuf strings are UTF-8)."""
    if not isinstance(value, str):
        raise RequestValueError(path, f"must be a string, not {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        # A lone surrogate: what Python makes of undecodable bytes in argv or a JSON "\ud800".
        raise RequestValueError(
            path, f"is not valid Unicode text (a lone surrogate at position {exc.start})"
        ) from None
    return value


def _set_value(target: struct_pb2.Value, value: Any, path: str, depth: int) -> None:
    # bool before int: a bool is an int in Python, but a Value has a kind of its own for it.
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise RequestValueError(
                path,
                f"{_integer(value)} is beyond +-(2^53 - 1): a protobuf Struct carries "
                f"numbers as doubles, so it would arrive as {_as_double(value)}; "
                "send it as a string",
            )
        target.number_value = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise RequestValueError(
                path, f"{value} is not a finite number; the server refuses NaN and infinities"
            )
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = _text(value, path)
    elif isinstance(value, Mapping):
        _fill_struct(target.struct_value, value, path, depth + 1)
    elif isinstance(value, list | tuple):
        if depth + 1 > MAX_ATTRIBUTE_NESTING:
            raise RequestValueError(path, f"nested deeper than {MAX_ATTRIBUTE_NESTING} levels")
        items = target.list_value
        items.SetInParent()  # an empty list is still a list, not an unset Value
        for index, item in enumerate(value):
            _set_value(items.values.add(), item, f"{path}[{index}]", depth + 1)
    else:
        # bytes, sets, datetimes...: refused rather than guessed at.
        kind = type(value).__name__
        raise RequestValueError(path, f"a {kind} has no protobuf Struct equivalent")


def _integer(value: int) -> str:
    # Python refuses to print integers of more than 4300 digits; say how long it is instead.
    if value.bit_length() <= 128:
        return f"the integer {value}"
    return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"


def _as_double(value: int) -> str:
    try:
        return repr(float(value))
    except OverflowError:
        return "nothing (it is too large even for a double)"


def _fill_struct(
    target: struct_pb2.Struct, values: Mapping[Any, Any], path: str, depth: int
) -> None:
    if depth > MAX_ATTRIBUTE_NESTING:
        raise RequestValueError(path, f"nested deeper than {MAX_ATTRIBUTE_NESTING} levels")
    target.SetInParent()
    fields = target.fields
    for key, value in values.items():
        if type(key) is not str:
            raise RequestValueError(path, f"keys must be strings, not {type(key).__name__}")
        name = _text(key, f"{path} key {key!r}")
        _set_value(fields[name], value, f"{path}.{name}", depth)


def attributes_struct(values: Mapping[str, Any] | None, path: str) -> struct_pb2.Struct | None:
    """An attribute map as a `google.protobuf.Struct`, every value carried exactly, or None.

    Values: None, bool, str, int within +-`MAX_SAFE_INTEGER`, finite float, Mappings with str
    keys, lists and tuples (nested at most `MAX_ATTRIBUTE_NESTING` levels). An empty or absent
    map is None (unset, which the server reads as empty). `path` prefixes error paths.

    Raises `RequestValueError` naming the first value that does not fit: the server would
    otherwise see a different value (a rounded integer) or none at all.
    """
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise RequestValueError(path, f"must be a mapping, not {type(values).__name__}")
    if not values:
        return None
    struct = struct_pb2.Struct()
    _fill_struct(struct, values, path, 1)
    return struct


def _timestamp(when: datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    if type(when) is not datetime or when.tzinfo is None or when.utcoffset() is None:
        raise RequestValueError("context.time", "must be a timezone-aware datetime")
    stamp = timestamp_pb2.Timestamp()
    try:
        stamp.FromDatetime(when)  # RFC 3339 instant; datetime's microseconds are exact in nanos
    except (OverflowError, ValueError):
        # Years 1-9999 in UTC only: an offset can push the instant outside them.
        raise RequestValueError(
            "context.time", f"{when.isoformat()} is outside years 1-9999 in UTC"
        ) from None
    return stamp


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
    subject_namespace: str = "",
    application_attributes: Mapping[str, Any] | None = None,
    integration_attributes: Mapping[str, Any] | None = None,
    connected: bool | None = None,
    client_ip: str = "",
    session_id: str = "",
    time: datetime | None = None,
    context_attributes: Mapping[str, Any] | None = None,
    request_id: str = "",
    explain: bool = False,
) -> pdp_pb2.CheckRequest:
    """A CheckRequest from plain values, carried exactly or refused.

    `subject_kind`: user | service_account | external_user; `subject_namespace`: for an
    external user, the IdentityMapping namespace of its ID ("": the application's only
    one). `connected`: None = not known to
    the broker. `time`: a timezone-aware datetime, the instant to decide at (None: the
    server's clock). Attribute values: see `attributes_struct`.

    Raises `RequestValueError` (a ValueError) naming the field or attribute path when a value
    cannot be sent as it is: an integer beyond +-(2^53 - 1), NaN or an infinity, a lone
    surrogate in a string, a type with no protobuf equivalent, an unknown subject kind.
    """
    kind = _SUBJECT_KINDS.get(str(subject_kind)) if isinstance(subject_kind, str) else None
    if kind is None:
        choices = " | ".join(_SUBJECT_KINDS)
        raise RequestValueError("subject.kind", f"{subject_kind!r} is not one of {choices}")
    if connected is not None and type(connected) is not bool:
        raise RequestValueError(
            "context.connection", f"connected must be True, False or None, not {connected!r}"
        )
    return pdp_pb2.CheckRequest(
        organization=_text(organization, "organization"),
        subject=pdp_pb2.Subject(
            id=_text(subject, "subject.id"),
            kind=kind,
            attributes=attributes_struct(subject_attributes, "subject.attributes"),
            access_token=_text(access_token, "subject.access_token"),
            namespace=_text(subject_namespace, "subject.namespace"),
        ),
        application=pdp_pb2.Application(
            id=_text(application, "application.id"),
            attributes=attributes_struct(application_attributes, "application.attributes"),
        ),
        integration=pdp_pb2.Integration(
            id=_text(integration, "integration.id"),
            attributes=attributes_struct(integration_attributes, "integration.attributes"),
        ),
        scope=_text(scope, "scope"),
        context=pdp_pb2.RequestContext(
            connection=_CONNECTIONS[connected],
            client_ip=_text(client_ip, "context.client_ip"),
            session_id=_text(session_id, "context.session_id"),
            time=_timestamp(time),
            attributes=attributes_struct(context_attributes, "context.attributes"),
        ),
        request_id=_text(request_id, "request_id"),
        explain=bool(explain),
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
        Raises ClientConfigError (a ValueError) for a bearer token without either, OSError
        when a TLS file cannot be read. `timeout`: the default deadline of a call, seconds.
        """
        self.timeout = timeout
        options = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        if ca_file is None:
            if bearer_token is not None and not insecure_bearer:
                raise ClientConfigError(
                    "a bearer token needs TLS (ca_file), or insecure_bearer=True"
                )
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
