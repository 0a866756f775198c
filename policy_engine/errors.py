"""The root of the package's exceptions: `except PolicyEngineError` catches any error the
library raises of its own (README, Errors).

Every exception class policy_engine defines derives from `PolicyEngineError` (private
control-flow ones aside, which never leave their module), and keeps the base it had before
(`ValueError`, `RuntimeError`, `TimeoutError`, ...), so a handler written for that base still
catches it. Errors of the libraries underneath are not wrapped: `PdpClient.check` raises
`grpc.RpcError`, a file that cannot be opened may raise `OSError`.

No imports: the client-only install and the server's lean start both load this module.
"""

from __future__ import annotations


class PolicyEngineError(Exception):
    """Base class of every exception policy_engine defines."""
