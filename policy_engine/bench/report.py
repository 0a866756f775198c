"""Results as markdown: the table printed to stdout, and the file with the machine's facts.

Absolute numbers on a shared 2-core box move from run to run; the ratio to the empty
servicer measured in the same run moves far less, so it is the column to compare over time.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from policy_engine.bench.engine_bench import EngineResult
from policy_engine.bench.h2load import Latency
from policy_engine.bench.hit_path import HitPathResult, hit_path_table
from policy_engine.bench.procs import WorkerShare, balance
from policy_engine.bench.workloads import (
    AUDIT_TARGET,
    BATCH_CACHED_TARGET,
    BATCH_LOCAL,
    CHECK_LOCAL,
    CHECK_REDIS_MODERATE,
    CHECK_UNCACHED,
    CHECK_UNCACHED_TWO_WORKERS,
    EMPTY_CHECK,
    IN_PROCESS_UNCACHED,
)

# Issue 11's targets against the previous server's empty-handler ceiling, in the same run.
CACHED_VS_PREVIOUS_CEILING = 1.0
UNCACHED_VS_PREVIOUS_CEILING = 0.8
CPU_DECISION_FACTOR = 1.3  # uncached CPU/request <= the ceiling's + this x in-process cost
WORKER_BALANCE = 0.8  # the least busy worker does at least 80% of the busiest one's work


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
    build: str = "current"  # which code served it (builds.Build.label)
    group: str = ""  # the workload whatever the load shape (Row.group)
    in_flight: int = 0  # requests h2load kept in flight
    in_process: str = ""  # the hit_path case doing this row's decision work (Row.in_process)
    cpu_s: float | None = None  # server CPU (every process) over the measured requests
    processes: int = 1  # worker processes serving
    workers: tuple[tuple[WorkerShare, ...], ...] = ()  # per round, with several workers

    @property
    def decisions_per_s(self) -> float:
        return self.req_per_s * self.decisions_per_request

    @property
    def cpu_us_per_request(self) -> float | None:
        """Server CPU µs per measured request (None when not measured)."""
        if self.cpu_s is None or self.requests <= 0:
            return None
        return self.cpu_s / self.requests * 1e6

    @property
    def cpu_us_per_decision(self) -> float | None:
        per_request = self.cpu_us_per_request
        return None if per_request is None else per_request / self.decisions_per_request

    @property
    def balances(self) -> list[float]:
        """Each round's least over busiest worker share (decisions when counted, else CPU)."""
        out = []
        for shares in self.workers:
            counted = [w.decisions for w in shares]
            values = counted if all(c is not None for c in counted) else [w.cpu_s for w in shares]
            found = balance(v for v in values if v is not None)
            if found is not None:
                out.append(found)
        return out


def _ok(results: Sequence[RowResult]) -> dict[str, RowResult]:
    return {r.name: r for r in results if r.error is None and r.latency is not None}


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


def cross_ratios(
    results: Sequence[RowResult], others: Sequence[RowResult]
) -> dict[str, float | None]:
    """Each row's req/s over the req/s of its baseline row as measured on the other build."""
    rate = {r.name: r.req_per_s for r in others if r.error is None and r.req_per_s > 0}
    out: dict[str, float | None] = {}
    for r in results:
        base = rate.get(r.baseline)
        out[r.name] = r.req_per_s / base if base and r.error is None else None
    return out


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _reason(r: RowResult) -> str:
    return " ".join((r.error or "no latency data").split())[:120].replace("|", "/")


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def results_table(results: Sequence[RowResult], previous: Sequence[RowResult] | None = None) -> str:
    """The headline table: throughput, latency percentiles, share of the empty ceiling, server
    CPU per request; with `previous`, also the share of the previous build's ceiling."""
    ratio = ratios(results)
    cross = cross_ratios(results, previous) if previous else None
    extra = " vs previous's baseline |" if cross is not None else ""
    lines = [
        "| workload | req/s | decisions/s | p50 ms | p99 ms | p99.9 ms | vs baseline |"
        + extra + " server CPU µs/req |",
        "|---|--:|--:|--:|--:|--:|--:|--:|" + ("--:|" if cross is not None else ""),
    ]  # fmt: skip
    for r in results:
        if r.error is not None or r.latency is None:
            blanks = " |" * (6 if cross is not None else 5)
            lines.append(f"| {r.name} | FAILED: {_reason(r)} |{blanks}")
            continue
        across = f" {_ratio(cross[r.name])} |" if cross is not None else ""
        lines.append(
            f"| {r.name} | {_num(r.req_per_s)} | {_num(r.decisions_per_s)} | "
            f"{_ms(r.latency.p50_ms)} | {_ms(r.latency.p99_ms)} | {_ms(r.latency.p999_ms)} | "
            f"{_ratio(ratio[r.name])} |{across} {_us(r.cpu_us_per_request)} |"
        )
    return "\n".join(lines)


def comparison_table(current: Sequence[RowResult], previous: Sequence[RowResult]) -> str:
    """Each row on both builds: req/s, their quotient, p50/p99, and each build's req/s over
    both builds' baseline rows (a row the previous build cannot serve says why)."""
    before = {r.name: r for r in previous}
    own_now, own_before = ratios(current), ratios(previous)
    now_vs_before, before_vs_now = cross_ratios(current, previous), cross_ratios(previous, current)
    lines = [
        "| workload | req/s | previous req/s | ÷ previous | p50 / p99 ms | previous p50 / p99 ms "
        "| vs baseline | vs previous's baseline | previous vs its baseline "
        "| previous vs current baseline |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in current:
        old = before.get(r.name)
        if r.error is not None or r.latency is None:
            now = f"FAILED: {_reason(r)} |"
            now_lat = ""
        else:
            now = f"{_num(r.req_per_s)} |"
            now_lat = f"{_ms(r.latency.p50_ms)} / {_ms(r.latency.p99_ms)}"
        if old is None:
            was, was_lat = "not run |", ""
        elif old.error is not None or old.latency is None:
            was, was_lat = f"cannot serve: {_reason(old)} |", ""
        else:
            was = f"{_num(old.req_per_s)} |"
            was_lat = f"{_ms(old.latency.p50_ms)} / {_ms(old.latency.p99_ms)}"
        quotient = (
            r.req_per_s / old.req_per_s
            if old is not None and old.req_per_s > 0 and old.error is None and r.error is None
            else None
        )
        lines.append(
            f"| {r.name} | {now} {was} {_ratio(quotient)} | {now_lat} | {was_lat} | "
            f"{_ratio(own_now.get(r.name))} | {_ratio(now_vs_before.get(r.name))} | "
            f"{_ratio(own_before.get(r.name))} | {_ratio(before_vs_now.get(r.name))} |"
        )
    return "\n".join(lines)


def cpu_table(
    current: Sequence[RowResult],
    previous: Sequence[RowResult] = (),
    in_process: Mapping[str, float] | None = None,
) -> str:
    """Server CPU (every server process, user + system, from /proc over the measured
    requests) per request and per decision, on each build, beside the in-process µs per
    decision of the servicer case doing the same decision work (`in_process`: case name ->
    µs per decision)."""
    in_process = in_process or {}
    before = {r.name: r for r in previous}
    has_previous = bool(previous)
    head = "| workload | CPU µs/req | CPU µs/decision |"
    rule = "|---|--:|--:|"
    if has_previous:
        head += " previous CPU µs/req | previous CPU µs/decision |"
        rule += "--:|--:|"
    lines = [head + " in-process µs/decision |", rule + "--:|"]
    for r in current:
        cells = [_us(r.cpu_us_per_request), _us(r.cpu_us_per_decision)]
        if has_previous:
            old = before.get(r.name)
            cells += [
                _us(old.cpu_us_per_request if old else None),
                _us(old.cpu_us_per_decision if old else None),
            ]
        cells.append(_us(in_process.get(r.in_process)) if r.in_process else "")
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(current: Sequence[RowResult], previous: Sequence[RowResult] = ()) -> str:
    """p50 / p99 of each workload measured both at one request in flight and at more (the
    rows sharing a `group`), on each build."""
    lines = ["| workload | build | in flight | p50 ms | p99 ms | in flight | p50 ms | p99 ms |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for label, results in (("current", current), ("previous", previous)):
        by_group: dict[str, list[RowResult]] = {}
        for r in _ok(results).values():
            by_group.setdefault(r.group or r.name, []).append(r)
        for group, members in by_group.items():
            single = [m for m in members if m.in_flight == 1]
            loaded = [m for m in members if m.in_flight > 1]
            if not single or not loaded:
                continue
            cells = []
            for m in (single[0], loaded[0]):
                assert m.latency is not None
                cells += [str(m.in_flight), _ms(m.latency.p50_ms), _ms(m.latency.p99_ms)]
            lines.append(f"| {group} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def balance_table(current: Sequence[RowResult], previous: Sequence[RowResult] = ()) -> str:
    """Each worker's share of the measured requests, per round, for rows with several workers:
    decisions counted by each worker (`pdp serve`) or, when a server counts none (the empty
    servicer), each worker's CPU; and the round's least over busiest share."""
    lines = ["| workload | build | round | share per worker | by | connections per worker "
             "| least ÷ busiest |", "|---|---|--:|---|---|---|--:|"]  # fmt: skip
    for label, results in (("current", current), ("previous", previous)):
        for r in results:
            for index, shares in enumerate(r.workers, start=1):
                counted = [w.decisions for w in shares]
                by_decisions = all(c is not None for c in counted)
                values = [float(c or 0.0) for c in counted] if by_decisions else [
                    w.cpu_s for w in shares
                ]  # fmt: skip
                total = sum(values)
                ranked = sorted(zip(values, shares, strict=True), key=lambda p: -p[0])
                parts = ", ".join(f"{(v / total if total else 0):.0%}" for v, _ in ranked)
                held = ", ".join(
                    "?" if w.connections is None else str(w.connections) for _, w in ranked
                )
                lines.append(
                    f"| {r.name} | {label} | {index} | {parts} | "
                    f"{'decisions' if by_decisions else 'CPU'} | {held} | "
                    f"{_ratio(balance(values))} |"
                )
    return "\n".join(lines)


def details_table(results: Sequence[RowResult]) -> str:
    """Per-row facts behind the headline numbers, for judging how far to trust them."""
    lines = [
        "| workload | build | server | load | baseline | req/s per round | requests "
        "| warm-up req/s | log req/s | mean ms | max ms | non-200 |",
        "|---|---|---|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lat = r.latency
        per_round = ", ".join(_num(v) for v in r.rounds)
        head = f"| {r.name} | {r.build} | {r.server} | {r.load} | {r.baseline} | {per_round} |"
        if lat is None:
            lines.append(head + " | | | | | |")
            continue
        lines.append(
            f"{head} {r.requests:,} | {_num(r.warmup_req_per_s)} | {_num(lat.req_per_s)} | "
            f"{_ms(lat.mean_ms)} | {_ms(lat.max_ms)} | {lat.not_ok} |"
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


def targets(
    results: Sequence[RowResult],
    previous: Sequence[RowResult] = (),
    in_process: Mapping[str, float] | None = None,
) -> list[Target]:
    """The cache issue's targets, then issue 11's (against the `previous` build's ceiling,
    the in-process cost `in_process`: hit_path case -> µs per decision, and worker shares)."""
    ok = _ok(results)
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
    return out + server_targets(ok, _ok(previous), in_process or {})


def _against_previous_ceiling(
    row: RowResult | None, ceiling: RowResult | None, name: str, least: float
) -> Target:
    if row is None or ceiling is None:
        return Target(name, "not measured (needs the row, and --baseline for the ceiling)", None)
    share = row.req_per_s / ceiling.req_per_s
    measured = f"{share:.2f} ({_num(row.req_per_s)} vs {_num(ceiling.req_per_s)} req/s)"
    return Target(name, measured, share >= least)


def server_targets(
    ok: Mapping[str, RowResult], previous: Mapping[str, RowResult], in_process: Mapping[str, float]
) -> list[Target]:
    """Issue 11's targets, each from rows of the same run (`ok`, `previous`: measured rows by
    name)."""
    ceiling = previous.get(EMPTY_CHECK)
    out = [
        _against_previous_ceiling(
            ok.get(CHECK_LOCAL), ceiling,
            f"{CHECK_LOCAL} >= {CACHED_VS_PREVIOUS_CEILING:.1f} x the previous {EMPTY_CHECK}",
            CACHED_VS_PREVIOUS_CEILING,
        ),
        _against_previous_ceiling(
            ok.get(CHECK_UNCACHED), ceiling,
            f"{CHECK_UNCACHED} >= {UNCACHED_VS_PREVIOUS_CEILING:.1f} x the previous {EMPTY_CHECK}",
            UNCACHED_VS_PREVIOUS_CEILING,
        ),
    ]  # fmt: skip
    uncached, empty = ok.get(CHECK_UNCACHED), ok.get(EMPTY_CHECK)
    cost = in_process.get(IN_PROCESS_UNCACHED)
    name = (
        f"{CHECK_UNCACHED}: server CPU/request <= {EMPTY_CHECK}'s + {CPU_DECISION_FACTOR} x "
        "the in-process uncached Check"
    )
    used = uncached.cpu_us_per_request if uncached else None
    floor = empty.cpu_us_per_request if empty else None
    if used is None or floor is None or cost is None:
        out.append(Target(name, "not measured", None))
    else:
        limit = floor + CPU_DECISION_FACTOR * cost
        measured = (
            f"{used:.0f} µs vs {limit:.0f} µs ({floor:.0f} + {CPU_DECISION_FACTOR} x {cost:.1f})"
        )
        out.append(Target(name, measured, used <= limit))
    batch = ok.get(BATCH_LOCAL)
    name = f"{BATCH_LOCAL} >= {_num(BATCH_CACHED_TARGET)} decisions/s on one process"
    if batch is None:
        out.append(Target(name, "not measured", None))
    else:
        one = "" if batch.processes == 1 else f" (NOT one process: {batch.processes})"
        out.append(Target(name, f"{_num(batch.decisions_per_s)}{one}",
                          batch.decisions_per_s >= BATCH_CACHED_TARGET and not one))  # fmt: skip
    two = ok.get(CHECK_UNCACHED_TWO_WORKERS)
    name = (
        f"{CHECK_UNCACHED_TWO_WORKERS}: each worker's share within 20% of the other's "
        f"(least ÷ busiest >= {WORKER_BALANCE}, every round)"
    )
    found = two.balances if two else []
    if not found:
        out.append(Target(name, "not measured", None))
    else:
        rounds = ", ".join(f"{b:.2f}" for b in found)
        out.append(Target(name, f"worst {min(found):.2f} (rounds: {rounds})",
                          min(found) >= WORKER_BALANCE))  # fmt: skip
    return out


def targets_table(
    results: Sequence[RowResult],
    previous: Sequence[RowResult] = (),
    in_process: Mapping[str, float] | None = None,
) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets(results, previous, in_process):
        met = "n/a" if t.met is None else ("yes" if t.met else "NO")
        lines.append(f"| {t.name} | {t.measured} | {met} |")
    return "\n".join(lines)


EXPLAINED = (
    "`vs baseline` is req/s divided by the req/s of the row's baseline measured in this run: "
    "the empty servicer answering the same RPC, or for an `audit on` row the same row with "
    "the audit log off, for a `with a quota` row the same row without the quota; "
    "`vs previous's baseline` divides by that row as the previous build "
    "(`--baseline REF`) served it. Latencies are per RPC under closed-loop load (every "
    "connection keeps its streams busy), so they include queueing. Server CPU is user + "
    "system time of every server process (supervisor and workers) from /proc over the "
    "measured requests, in clock ticks (10 ms: a short run's figure is coarse)."
)


def sections(
    results: Sequence[RowResult],
    previous: Sequence[RowResult] = (),
    engine: Sequence[EngineResult] = (),
    hit_path: Sequence[HitPathResult] = (),
) -> list[str]:
    """The tables a run prints, in order (each a markdown block; empty ones left out)."""
    in_process = {h.name: h.per_decision_us for h in hit_path}
    out = [results_table(results, previous or None), EXPLAINED]
    if previous:
        out.append("Against the previous build (`--baseline`), row by row:\n\n"
                   + comparison_table(results, previous))  # fmt: skip
    out.append(latency_table(results, previous))
    out.append(cpu_table(results, previous, in_process))
    if any(r.workers for r in (*results, *previous)):
        out.append(balance_table(results, previous))
    out.append(targets_table(results, previous, in_process))
    if engine:
        out.append(engine_table(engine))
    if hit_path:
        out.append(hit_path_table(hit_path))
    return out


def document(
    results: Sequence[RowResult],
    engine: Sequence[EngineResult],
    facts: dict[str, str],
    hit_path: Sequence[HitPathResult] = (),
    previous: Sequence[RowResult] = (),
) -> str:
    """The whole results file: every table of `sections`, details, machine facts."""
    parts = ["# PDP benchmark", ""]
    for block in sections(results, previous, engine, hit_path):
        parts += [block, ""]
    parts += ["## Details", "", details_table([*results, *previous]), ""]
    parts += ["## Machine and settings", ""]
    parts += [f"- {key}: {value}" for key, value in facts.items()]
    return "\n".join(parts) + "\n"
