"""The engine alone, in process: µs per decide(), for reference against the gRPC rows.

The gap between 1e6 / (this) and a gRPC row's req/s per worker is what gRPC, protobuf and
request/response conversion cost; a slow engine shows up here without any server noise.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from policy_engine.config import Settings
from policy_engine.domain.decision import Effect
from policy_engine.domain.request import (
    CheckRequest,
    ConnectionState,
    RequestContext,
    Resource,
    Subject,
)
from policy_engine.engine import decide
from policy_engine.policy import load_policy_set


@dataclass(frozen=True, slots=True)
class EngineCase:
    name: str
    request: CheckRequest
    effect: Effect


@dataclass(frozen=True, slots=True)
class EngineResult:
    name: str
    effect: str
    median_us: float  # median over repeats of the mean per call
    best_us: float
    calls: int


def _tuple(subject: str, groups: list[str], scope: str) -> CheckRequest:
    return CheckRequest(
        organization="acme",
        subject=Subject(id=subject, attributes={"groups": groups}),
        application=Resource("pr-reviewer"),
        integration=Resource("github"),
        scope=scope,
        context=RequestContext(connection=ConnectionState.ACTIVE),
    )


CASES = (
    EngineCase(
        "decide allow (alice, github, repo)", _tuple("alice", ["engineering"], "repo"), Effect.ALLOW
    ),
    EngineCase("decide deny (bob, org default)", _tuple("bob", ["sales"], "repo"), Effect.DENY),
)


def measure(policy_dir: Path, seconds: float, repeats: int = 5) -> list[EngineResult]:
    """Time each case for about `seconds` in total, split into `repeats` timed loops.

    Each case's answer is checked first: timing a wrong decision would be meaningless.
    """
    policies = load_policy_set(policy_dir)
    limits = Settings().limits
    now = datetime.now(UTC)
    results: list[EngineResult] = []
    for case in CASES:
        decision = decide(policies, case.request, now=now, limits=limits)
        if decision.effect is not case.effect:
            raise AssertionError(
                f"{case.name}: engine answered {decision.effect.value}, "
                f"expected {case.effect.value}: {decision.reasons}"
            )
        # Calibrate a loop size that takes about seconds / repeats.
        loops, elapsed = 1, 0.0
        while elapsed < 0.05:
            loops *= 2
            start = time.perf_counter()
            for _ in range(loops):
                decide(policies, case.request, now=now, limits=limits)
            elapsed = time.perf_counter() - start
        loops = max(1, int(loops * (seconds / len(CASES) / repeats) / elapsed))
        per_call: list[float] = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(loops):
                decide(policies, case.request, now=now, limits=limits)
            per_call.append((time.perf_counter() - start) / loops * 1e6)
        results.append(
            EngineResult(
                case.name,
                case.effect.value,
                statistics.median(per_call),
                min(per_call),
                loops * repeats,
            )
        )
    return results
