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
        "| workload | req/s | decisions/s | p50 ms | p99 ms | p99.9 ms | vs empty |",
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
        "| workload | server | baseline | requests | warm-up req/s | log req/s | mean ms "
        "| max ms | non-200 |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lat = r.latency
        if lat is None:
            lines.append(f"| {r.name} | {r.server} | {r.baseline} | | | | | | |")
            continue
        lines.append(
            f"| {r.name} | {r.server} | {r.baseline} | {r.requests:,} | "
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


def document(
    results: Sequence[RowResult],
    engine: Sequence[EngineResult],
    facts: dict[str, str],
) -> str:
    """The whole results file: headline table, engine table, details, machine facts."""
    parts = [
        "# PDP benchmark",
        "",
        results_table(results),
        "",
        "`vs empty` is req/s divided by the req/s of the row's baseline, the empty servicer "
        "answering the same RPC, measured in this run. Latencies are per RPC under closed-loop "
        "load (every connection keeps its streams busy), so they include queueing.",
        "",
    ]
    if engine:
        parts += [engine_table(engine), ""]
    parts += ["## Details", "", details_table(results), "", "## Machine and settings", ""]
    parts += [f"- {key}: {value}" for key, value in facts.items()]
    return "\n".join(parts) + "\n"
