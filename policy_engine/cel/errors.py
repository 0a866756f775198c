"""Exception types raised by the CEL compiler and by compiled expressions.

They are deliberately tiny: policy loading reports :class:`CelCompileError` to operators with
a position inside the expression text, and request evaluation only ever sees
:class:`CelEvaluationError`, so callers can treat "the expression could not be evaluated" as a
single, well-defined outcome (usually: deny).
"""

from __future__ import annotations

from policy_engine.errors import PolicyEngineError


class CelCompileError(PolicyEngineError):
    """The expression text is not acceptable: syntax, names, arity, literals or limits.

    ``line`` and ``column`` are 1-based and point inside the expression text (not the policy
    file that contains it); they are ``1, 1`` when no better position is known.
    """

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(f"{message} (line {line}, column {column})")
        self.message = message
        self.line = line
        self.column = column


class CelEvaluationError(PolicyEngineError):
    """Evaluating a compiled expression against an activation failed.

    The message says what failed, e.g. ``no such key: 'groups'`` or
    ``no matching overload for '+' on (string, int)``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
