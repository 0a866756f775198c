"""Every function an expression may call: the standard functions and the project's helpers
(:mod:`policy_engine.cel.functions`) and cel-go's extension libraries
(:mod:`policy_engine.cel.ext`), by name."""

from __future__ import annotations

from collections.abc import Mapping

from policy_engine.cel.ext import encoders, math, optionals, sets, strings
from policy_engine.cel.functions import FUNCTIONS as STANDARD_FUNCTIONS
from policy_engine.cel.functions import MACRO_ARITIES, Function

EXTENSION_FUNCTIONS: Mapping[str, Function] = {
    f.name: f
    for f in (
        *optionals.FUNCTIONS,
        *strings.FUNCTIONS,
        *sets.FUNCTIONS,
        *math.FUNCTIONS,
        *encoders.FUNCTIONS,
    )
}

FUNCTIONS: Mapping[str, Function] = {**STANDARD_FUNCTIONS, **EXTENSION_FUNCTIONS}

#: Macros of the extension libraries (methods, receiver not counted): expanded by the compiler.
EXTENSION_MACRO_ARITIES: Mapping[str, tuple[int, ...]] = {
    "optMap": (2,),
    "optFlatMap": (2,),
}

FUNCTION_NAMES: frozenset[str] = (
    frozenset(FUNCTIONS) | frozenset(MACRO_ARITIES) | frozenset(EXTENSION_MACRO_ARITIES)
)
