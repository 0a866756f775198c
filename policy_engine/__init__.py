"""A policy decision point for an agent credential broker.

The broker's public API, importable with the base (client-only) install:

    from policy_engine import PdpClient, check_request, PolicyEngineError

`__all__` lists it: the client, the request builders, the answer and decision types, the
error codes and the exception root (README, Client for the broker; Errors). The server and
its tools live in subpackages that need the `server` extra.

The names resolve on first use (PEP 562 `__getattr__`): `import policy_engine`, which every
import of a server module runs first, loads nothing beyond this file and the exception root,
so neither the server nor the pdp commands pay for the gRPC client (~0.1 s and grpc's
memory) unless they use it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from policy_engine.errors import PolicyEngineError

__version__ = "0.1.0"

_CLIENT = "policy_engine.client"
_MESSAGES = "policy_engine.api.kontext.pdp.v1.pdp_pb2"
# Name -> the module that defines it, imported when the name is first read.
_LAZY: dict[str, str] = {
    "PdpClient": _CLIENT,
    "Answer": _CLIENT,
    "check_request": _CLIENT,
    "attributes_struct": _CLIENT,
    "server_error_answer": _CLIENT,
    "ClientConfigError": _CLIENT,
    "RequestValueError": _CLIENT,
    "DEFAULT_TIMEOUT_SECONDS": _CLIENT,
    "MAX_SAFE_INTEGER": _CLIENT,
    "MAX_ATTRIBUTE_NESTING": _CLIENT,
    "ErrorCode": "policy_engine.domain.codes",
    "CheckRequest": _MESSAGES,
    "CheckResponse": _MESSAGES,
    "CheckBatchRequest": _MESSAGES,
    "CheckBatchResponse": _MESSAGES,
    "Reason": _MESSAGES,
}

# Written out (not derived from _LAZY) so linters and type checkers see it; a test checks the
# two agree and that every name imports with the client's dependencies alone.
__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_ATTRIBUTE_NESTING",
    "MAX_SAFE_INTEGER",
    "Answer",
    "CheckBatchRequest",
    "CheckBatchResponse",
    "CheckRequest",
    "CheckResponse",
    "ClientConfigError",
    "ErrorCode",
    "PdpClient",
    "PolicyEngineError",
    "Reason",
    "RequestValueError",
    "__version__",
    "attributes_struct",
    "check_request",
    "server_error_answer",
]

if TYPE_CHECKING:
    from policy_engine.api.kontext.pdp.v1.pdp_pb2 import (
        CheckBatchRequest,
        CheckBatchResponse,
        CheckRequest,
        CheckResponse,
        Reason,
    )
    from policy_engine.client import (
        DEFAULT_TIMEOUT_SECONDS,
        MAX_ATTRIBUTE_NESTING,
        MAX_SAFE_INTEGER,
        Answer,
        ClientConfigError,
        PdpClient,
        RequestValueError,
        attributes_struct,
        check_request,
        server_error_answer,
    )
    from policy_engine.domain.codes import ErrorCode


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use and kept here after that.
    AttributeError for anything else (so `from policy_engine import metrics` still finds the
    submodule)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
