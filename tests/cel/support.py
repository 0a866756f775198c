"""Shared helpers for the CEL tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from policy_engine.cel import (
    CelCompileError,
    CelEvaluationError,
    CompileLimits,
    Declarations,
    compile_expression,
)

NOW = datetime(2024, 7, 1, 20, 30, 15, tzinfo=UTC)

#: A request-shaped activation used by most tests.
ACTIVATION: dict[str, Any] = {
    "subject": {
        "id": "u-1",
        "name": "Ada",
        "attributes": {"groups": ["staff", "engineering"], "level": 3},
    },
    "integration": {"id": "github"},
    "scope": "repo:read",
    "now": NOW,
    "i": 7,
    "j": -3,
    "f": 2.5,
    "s": "hello",
    "b": True,
    "n": None,
    "l": [1, 2, 3],
    "m": {"a": 1, "b": "x"},
    "e": [],
    "ip": "10.1.2.3",
}

DECLARATIONS = Declarations(
    {
        "subject": frozenset({"id", "name", "attributes"}),
        "integration": frozenset({"id"}),
        **{name: None for name in ACTIVATION if name not in ("subject", "integration")},
    }
)


def compile_cel(
    source: str,
    limits: CompileLimits | None = None,
    extra_names: tuple[str, ...] = (),
    checked: bool = True,
) -> Any:
    """Compile against the shared declarations (plus free-form ``extra_names``), type-checked
    unless ``checked`` is False."""
    declarations = DECLARATIONS
    if extra_names:
        declarations = Declarations({**DECLARATIONS.variables, **dict.fromkeys(extra_names, None)})
    if not checked:
        declarations = replace(declarations, checked=False)
    return compile_expression(source, declarations, limits or CompileLimits())


def ev(source: str, activation: Mapping[str, Any] | None = None, **extra: Any) -> Any:
    """Compile ``source`` unchecked and evaluate it against the shared activation (plus
    ``extra``): what the evaluator does with these values, as it must with dyn ones (the
    load-time check is tested in test_checker.py)."""
    act = dict(ACTIVATION if activation is None else activation)
    act.update(extra)
    return compile_cel(source, extra_names=tuple(extra), checked=False).evaluate(act)


def ev_error(source: str, activation: Mapping[str, Any] | None = None, **extra: Any) -> str:
    """Evaluate ``source`` expecting a CelEvaluationError; return its message."""
    with pytest.raises(CelEvaluationError) as info:
        ev(source, activation, **extra)
    return info.value.message


def compile_error(source: str, limits: CompileLimits | None = None) -> CelCompileError:
    """Compile ``source`` expecting a CelCompileError; return it."""
    with pytest.raises(CelCompileError) as info:
        compile_cel(source, limits)
    return info.value
