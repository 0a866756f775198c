"""Micro-benchmark: this compiler against cel-python's runners on the same expression.

Run ``python -m policy_engine.cel.bench``. celpy is given its activation already converted to
``celtypes`` (the conversion is not timed), which flatters it. Each figure is the best of
several repeats, in microseconds per evaluation.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

EXAMPLE = (
    '"engineering" in subject.attributes.groups && integration.id in ["github","linear"] '
    '&& scope.startsWith("re")'
)
ACTIVATION: dict[str, Any] = {
    "subject": {"id": "u-1", "attributes": {"groups": ["staff", "engineering"]}},
    "integration": {"id": "linear"},
    "scope": "repo:read",
}


def _best_microseconds(call: Callable[[], Any], number: int, repeat: int = 5) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def _ours(number: int) -> float:
    from policy_engine.cel import Declarations, compile_expression

    declarations = Declarations(
        {
            "subject": frozenset({"id", "attributes"}),
            "integration": frozenset({"id"}),
            "scope": None,
        }
    )
    expression = compile_expression(EXAMPLE, declarations)
    assert expression.evaluate(ACTIVATION) is True
    return _best_microseconds(lambda: expression.evaluate(ACTIVATION), number)


def _celpy(runner_name: str, number: int) -> float:
    import celpy
    import celpy.celparser
    from celpy.adapter import json_to_cel

    runner = getattr(celpy, runner_name)
    # celpy keeps one parser per process whose tree class depends on the runner; reset it.
    celpy.celparser.CELParser.CEL_PARSER = None
    environment = celpy.Environment(runner_class=runner)
    program = environment.program(environment.compile(EXAMPLE))
    activation = {name: json_to_cel(value) for name, value in ACTIVATION.items()}
    assert bool(program.evaluate(activation)) is True
    celpy.celparser.CELParser.CEL_PARSER = None
    return _best_microseconds(lambda: program.evaluate(activation), number)


def main() -> None:
    print(f"expression: {EXAMPLE}")
    print(f"policy_engine.cel          {_ours(100_000):10.2f} µs/evaluation")
    print(f"celpy CompiledRunner       {_celpy('CompiledRunner', 2_000):10.2f} µs/evaluation")
    print(f"celpy InterpretedRunner    {_celpy('InterpretedRunner', 500):10.2f} µs/evaluation")


if __name__ == "__main__":
    main()
