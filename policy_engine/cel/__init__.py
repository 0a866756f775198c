"""CEL for policies: cel-python's parser, compiled once into fast, thread-safe closures.

See :mod:`policy_engine.cel.compiler` for the design and measured speed, and
:mod:`policy_engine.cel.functions` for the functions and policy helpers available.
"""

from policy_engine.cel.compiler import (
    CompiledExpression,
    CompileLimits,
    Declarations,
    compile_expression,
    require_bool,
)
from policy_engine.cel.errors import CelCompileError, CelEvaluationError
from policy_engine.cel.functions import HELPERS_DOC
from policy_engine.cel.library import FUNCTION_NAMES

__all__ = [
    "FUNCTION_NAMES",
    "HELPERS_DOC",
    "CelCompileError",
    "CelEvaluationError",
    "CompileLimits",
    "CompiledExpression",
    "Declarations",
    "compile_expression",
    "require_bool",
]
