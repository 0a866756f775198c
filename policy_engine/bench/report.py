"""Results as markdown: the table printed to stdout, and the file with the machine's facts.

Absolute numbers on a shared 2-core box move from run to run; the ratio to the empty
servicer measured in the same run moves far less, so it is the column to compare over time.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from policy_engine.bench.engine_bench import EngineResult
from policy_engine.bench.h2load import Latency
from policy_engine.bench.hit_path import HitPathResult, hit_path_table
from policy_engine.bench.workloads import (
    AUDIT_TARGET,
    BATCH_LOCAL,
    CHECK_LOCAL,
    CHECK_REDIS_MODERATE,
    EMPTY_CHECK,
)


@dataclass(frozen=True, slots=True)
class RowResult:
    """One measured row, or the reason it could not be measured (`error`)."""

    name: str
    baseline: str
    decisions_per_request: int
    server: str = ""
    req_per_s: float = 0.0  # from h2load's summary
    latency: Latency | None = None  # from h2load's per-request log
    requests: int = 0
    warmup_req_per_s: float = 0.0
    error: str | None = None
    load: str = ""  # the h2load shape this row ran with
    rounds: tuple[float, ...] = ()  # req/s of each round (req_per_s is their median)

    @property
    def decisions_per_s(self) -> float:
        return self.req_per_s * self.decisions_per_request


def ratios(results: Sequence[RowResult]) -> dict[str, float | None]:
    """Each row's req/s over its baseline row's req/s in the same run (None if unavailable)."""
    rate = {r.name: r.req_per_s for r in results if r.error is None and r.req_per_s > 0}
    out: dict[str, float | None] = {}
    for r in results:
        base = rate.get(r.baseline)
        out[r.name] = r.req_per_s / base if base and r.error is None else None
    return out


def _num(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def results_table(results: Sequence[RowResult]) -> str:
    """The headline table: throughput, latency percentiles, share of the empty ceiling."""
    ratio = ratios(results)
    lines = [
        "| workload | req/s | decisions/s | p50 ms | p99 ms | p99.9 ms | vs baseline |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        if r.error is not None or r.latency is None:
            reason = " ".join((r.error or "no latency data").split())[:120].replace("|", "/")
            lines.append(f"| {r.name} | FAILED: {reason} | | | | | |")
            continue
        share = ratio[r.name]
        lines.append(
            f"| {r.name} | {_num(r.req_per_s)} | {_num(r.decisions_per_s)} | "
            f"{_ms(r.latency.p50_ms)} | {_ms(r.latency.p99_ms)} | {_ms(r.latency.p999_ms)} | "
            f"{'n/a' if share is None else f'{share:.2f}'} |"
        )
    return "\n".join(lines)


def details_table(results: Sequence[RowResult]) -> str:
    """Per-row facts behind the headline numbers, for judging how far to trust them."""
    lines = [
        "| workload | server | load | baseline | req/s per round | requests | warm-up req/s "
        "| log req/s | mean ms | max ms | non-200 |",
        "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lat = r.latency
        per_round = ", ".join(_num(v) for v in r.rounds)
        if lat is None:
            lines.append(
                f"| {r.name} | {r.server} | {r.load} | {r.baseline} | {per_round} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r.name} | {r.server} | {r.load} | {r.baseline} | {per_round} | {r.requests:,} | "
            f"{_num(r.warmup_req_per_s)} | {_num(lat.req_per_s)} | {_ms(lat.mean_ms)} | "
            f"{_ms(lat.max_ms)} | {lat.not_ok} |"
        )
    return "\n".join(lines)


def engine_table(results: Sequence[EngineResult]) -> str:
    lines = [
        "| in-process engine (no gRPC) | effect | µs per decide() (median) | best | "
        "decisions/s per core |",
        "|---|---|--:|--:|--:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.effect} | {r.median_us:.1f} | {r.best_us:.1f} | "
            f"{_num(1e6 / r.median_us)} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision(cwd: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=False
        ).stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    return revision + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def machine_facts(cwd: Path, extra: dict[str, str]) -> dict[str, str]:
    """What the numbers depend on: hardware, versions, the commit, the run's settings."""
    import google.protobuf
    import grpc

    from policy_engine.bench.h2load import h2load_version

    facts = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": str(os.cpu_count()),
        "usable cpus": str(len(os.sched_getaffinity(0))),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "h2load": h2load_version(),
        "commit": _git_revision(cwd),
    }
    facts.update(extra)
    return facts


@dataclass(frozen=True, slots=True)
class Target:
    """A performance target from the cache issue, measured from rows of the same run."""

    name: str
    measured: str
    met: bool | None  # None: the rows it needs were not run or failed


def targets(results: Sequence[RowResult]) -> list[Target]:
    ok = {r.name: r for r in results if r.error is None and r.latency is not None}
    out: list[Target] = []
    local, empty = ok.get(CHECK_LOCAL), ok.get(EMPTY_CHECK)
    name = f"{CHECK_LOCAL} within 15% of {EMPTY_CHECK} (ratio >= 0.85)"
    if local and empty:
        share = local.req_per_s / empty.req_per_s
        out.append(Target(name, f"{share:.2f} ({_num(local.req_per_s)} vs "
                                f"{_num(empty.req_per_s)} req/s)", share >= 0.85))  # fmt: skip
    else:
        out.append(Target(name, "not measured", None))
    moderate = ok.get(CHECK_REDIS_MODERATE)
    name = f"{CHECK_REDIS_MODERATE}: p99 < 2 ms"
    if moderate and moderate.latency:
        p99 = moderate.latency.p99_ms
        out.append(Target(name, f"p99 {p99:.2f} ms (p50 {moderate.latency.p50_ms:.2f} ms)",
                          p99 < 2.0))  # fmt: skip
    else:
        out.append(Target(name, "not measured", None))
    batch = ok.get(BATCH_LOCAL)
    name = f"{BATCH_LOCAL} decisions/s ÷ {CHECK_LOCAL} decisions/s >= 20"
    if batch and local:
        factor = batch.decisions_per_s / local.decisions_per_s
        out.append(Target(name, f"{factor:.1f}x ({_num(batch.decisions_per_s)} vs "
                                f"{_num(local.decisions_per_s)})", factor >= 20))  # fmt: skip
    else:
        out.append(Target(name, "not measured", None))
    for row in results:
        if not row.name.endswith(", audit on"):
            continue
        audited, plain = ok.get(row.name), ok.get(row.baseline)
        name = f"{row.name}: at most 10% below {row.baseline} (ratio >= {AUDIT_TARGET:.2f})"
        if audited and plain:
            share = audited.decisions_per_s / plain.decisions_per_s
            out.append(Target(name, f"{share:.2f} ({_num(audited.decisions_per_s)} vs "
                                    f"{_num(plain.decisions_per_s)} decisions/s)",
                              share >= AUDIT_TARGET))  # fmt: skip
        else:
            out.append(Target(name, "not measured", None))
    return out


def targets_table(results: Sequence[RowResult]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets(results):
        met = "n/a" if t.met is None else ("yes" if t.met else "NO")
        lines.append(f"| {t.name} | {t.measured} | {met} |")
    return "\n".join(lines)


def document(
    results: Sequence[RowResult],
    engine: Sequence[EngineResult],
    facts: dict[str, str],
    hit_path: Sequence[HitPathResult] = (),
) -> str:
    """The whole results file: headline table, engine table, details, machine facts."""
    parts = [
        "# PDP benchmark",
        "",
        results_table(results),
        "",
        "`vs baseline` is req/s divided by the req/s of the row's baseline measured in this run: "
        "the empty servicer answering the same RPC, or for an `audit on` row the same row with "
        "the audit log off. Latencies are per RPC under closed-loop load (every connection "
        "keeps its streams busy), so they include queueing.",
        "",
        targets_table(results),
        "",
    ]
    if engine:
        parts += [engine_table(engine), ""]
    if hit_path:
        parts += [hit_path_table(hit_path), ""]
    parts += ["## Details", "", details_table(results), "", "## Machine and settings", ""]
    parts += [f"- {key}: {value}" for key, value in facts.items()]
    return "\n".join(parts) + "\n"
