"""`pdp status`: ask a running server (PolicyStatusService.GetStatus) and print its answer.

What an operator asks after a deploy: which revision serves, did the last reload work, and
is every part of the process (the lifecycle's components) ready. Exit code 0 when every
component is ready, 1 when one is not (the server is NOT_SERVING), 2 when the server cannot
be asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from policy_engine.api import pdp_pb2
from policy_engine.errors import PolicyEngineError

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_UNREACHABLE = 2
DEFAULT_TIMEOUT_SECONDS = 5.0


class StatusUnavailable(PolicyEngineError):
    """The server could not be asked (not listening, TLS refused, no permission)."""


def fetch_status(
    target: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> pdp_pb2.GetStatusResponse:
    """GetStatus of the server at `target` (host:port): TLS when `ca_file` is given (mutual
    with `cert_file` and `key_file`), `token` sent as a bearer token (TLS only). Raises
    StatusUnavailable naming the gRPC status when the call fails, OSError for a file."""
    import grpc

    from policy_engine.api import pdp_pb2_grpc

    if ca_file is None:
        channel = grpc.insecure_channel(target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca_file).read_bytes(),
            private_key=Path(key_file).read_bytes() if key_file else None,
            certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
        )
        channel = grpc.secure_channel(target, credentials)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with channel:
        stub = pdp_pb2_grpc.PolicyStatusServiceStub(channel)
        try:
            return stub.GetStatus(pdp_pb2.GetStatusRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "error"
            raise StatusUnavailable(f"{target}: {name}: {details}") from None


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "never"
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_status(status: pdp_pb2.GetStatusResponse) -> str:
    """The answer for people: the policy set, the last reload, then one line per component
    (`name  state  ready  detail`)."""
    revision = status.revision or "none (no valid policy set: every Check is denied)"
    organizations = ", ".join(status.organizations) or "-"
    if status.last_reload_ok:
        reload = f"ok at {_when(status.last_reload_at)}"
    else:
        first, *rest = status.last_error.splitlines() or ["no detail"]
        more = f" (and {len(rest)} more)" if rest else ""
        reload = f"FAILED at {_when(status.last_reload_at)}: {first}{more}"
    lines = [
        f"instance:      {status.instance}",
        f"source:        {status.source}",
        f"revision:      {revision}"
        + (f" (since {_when(status.loaded_at)})" if status.revision else ""),
        f"organizations: {organizations}",
        f"last reload:   {reload}",
        f"watching:      {'yes' if status.watching else 'no (SIGHUP reloads)'}",
    ]
    if status.components:
        lines.append("components:")
        width = max(len(c.name) for c in status.components)
        for component in status.components:
            ready = "ready" if component.ready else "NOT READY"
            detail = f"  {component.detail}" if component.detail else ""
            lines.append(
                f"  {component.name:<{width}}  {component.state:<9} {ready:<9}{detail}".rstrip()
            )
    return "\n".join(lines)


def status_dict(status: pdp_pb2.GetStatusResponse) -> dict[str, Any]:
    """The answer as JSON-ready data: every field, defaults included, by its proto name."""
    return MessageToDict(
        status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def cmd_status(args: argparse.Namespace) -> int:
    if args.token and not args.ca_file:
        print("pdp: error: --token needs TLS (--ca-file)", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        status = fetch_status(
            args.address,
            ca_file=args.ca_file,
            cert_file=args.cert,
            key_file=args.key,
            token=args.token,
            timeout=args.timeout,
        )
    except (StatusUnavailable, OSError) as exc:
        print(f"pdp: error: cannot ask {args.address} for its status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(status_dict(status), indent=2))
    else:
        print(format_status(status))
    return EXIT_READY if all(c.ready for c in status.components) else EXIT_NOT_READY


def add_status_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], default_address: str
) -> None:
    status = commands.add_parser(
        "status",
        help="ask a running server for its revision, last reload and components",
        description="Exit code 0 when every component is ready, 1 when one is not (the server "
        "is NOT_SERVING), 2 when the server cannot be asked.",
    )
    status.add_argument("--address", default=default_address, help="host:port of the server")
    status.add_argument("--ca-file", help="PEM CA bundle: TLS (otherwise plaintext)")
    status.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    status.add_argument("--key", help="PEM client key (mutual TLS)")
    status.add_argument("--token", help="bearer token, when callers must present one (TLS only)")
    status.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds")
    status.add_argument("--json", action="store_true", help="print the answer as JSON")
    status.set_defaults(handler=cmd_status)
