"""Every function an expression may call: the standard functions and the project's helpers
(:mod:`policy_engine.cel.functions`) and cel-go's extension libraries
(:mod:`policy_engine.cel.ext`), by name and call style.

A name may be a global function in one library and a method in another (``ip("::1")`` and
``cidr("::/0").ip()``): :data:`GLOBALS` and :data:`METHODS` hold each style's function. An
extension function of a standard function's name and style (``string`` of a ``net.IP``)
handles its own types and hands the others to the standard one; their overloads are merged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from policy_engine.cel.ext import encoders, math, network, optionals, sets, strings
from policy_engine.cel.functions import FUNCTIONS as STANDARD_FUNCTIONS
from policy_engine.cel.functions import MACRO_ARITIES, Function

_EXTENSIONS: tuple[Function, ...] = (
    *optionals.FUNCTIONS,
    *strings.FUNCTIONS,
    *sets.FUNCTIONS,
    *math.FUNCTIONS,
    *encoders.FUNCTIONS,
    *network.FUNCTIONS,
)
EXTENSION_FUNCTIONS: Mapping[str, Function] = {f.name: f for f in _EXTENSIONS}


def _by_style(functions: Iterable[Function], method: bool) -> dict[str, Function]:
    out: dict[str, Function] = {}
    for function in functions:
        if not (function.as_method if method else function.as_global):
            continue
        known = out.get(function.name)
        if known is not None:  # the later (extension) implementation delegates to the known
            function = dataclasses.replace(
                function,
                arities=known.arities | function.arities,
                signatures=known.signatures + function.signatures,
                as_method=known.as_method or function.as_method,
                as_global=known.as_global or function.as_global,
            )
        out[function.name] = function
    return out


_ALL = (*STANDARD_FUNCTIONS.values(), *_EXTENSIONS)
#: Functions called as ``f(x)``, by name.
GLOBALS: Mapping[str, Function] = _by_style(_ALL, method=False)
#: Functions called as ``x.f()``, by name.
METHODS: Mapping[str, Function] = _by_style(_ALL, method=True)
#: Every function name, whatever its style.
FUNCTIONS: Mapping[str, Function] = {**GLOBALS, **METHODS}

#: Macros of the extension libraries (methods, receiver not counted): expanded by the compiler.
EXTENSION_MACRO_ARITIES: Mapping[str, tuple[int, ...]] = {
    "optMap": (2,),
    "optFlatMap": (2,),
    "existsOne": (2, 3),
    "transformList": (3, 4),
    "transformMap": (3, 4),
    "cel.bind": (3,),
}

FUNCTION_NAMES: frozenset[str] = (
    frozenset(FUNCTIONS) | frozenset(MACRO_ARITIES) | frozenset(EXTENSION_MACRO_ARITIES)
)
