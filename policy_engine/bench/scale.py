"""`python -m policy_engine.bench.scale` (`make bench-scale`): decision cost, start, reload and
memory against the size of the policy set.

For each generated set (`policy_engine.bench.scale_sets`: 100 to 50,000 user policies in one
organization, and 1,000 organizations of 20, each with distinct and with templated
conditions), smallest first:

1. write the set to disk and start a real `pdp serve` on it (cache off, one process pinned to
   one core with `taskset`; h2load runs pinned to the other core);
2. start to SERVING: from process start until the gRPC health check says SERVING (a row whose
   server is not SERVING within `--start-timeout` reports "timeout" and the run goes on);
3. then busy: how long after SERVING the server keeps a core busy before it goes idle (a
   reload the watcher triggers right after start shows up here), then RSS (VmRSS);
4. uncached Check req/s and p50/p99 at 64 requests in flight. h2load sends one body per run,
   so the load is several h2load processes at once (8 by default, each one connection with
   8 streams), each with its own subject: people spread evenly over the whole set (and over
   the organizations), alternately asking for an allowed and a denied scope. The rate is the
   sum of the processes' rates; latency percentiles pool every request of every process;
5. p50 at 1 request in flight (-c1 -m1): the same subjects in turn, pooled;
6. one-file edit to first new answer, twice: one person's file is rewritten (atomically) so
   that their allowed tuple is denied, and Check is polled every 25 ms until the new answer
   arrives; then the original is written back and timed the same way. RSS after both edits
   once the server is idle again.

Every probe's answer is checked with a real gRPC client before and after the load (h2load
counts an RPC error as a success). Exit code 0 when every row was measured or timed out, 1
when a row failed (a wrong answer, a crash), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from policy_engine.api import pdp_pb2
from policy_engine.bench import h2load
from policy_engine.bench.cli import WrongAnswer, verify
from policy_engine.bench.procs import cpu_seconds
from policy_engine.bench.report import machine_facts
from policy_engine.bench.scale_sets import (
    VARIANTS,
    GeneratedSet,
    Probe,
    SetSpec,
    Variant,
    generate,
    write_file,
)
from policy_engine.bench.server import (
    SERVER_KINDS,
    ServerError,
    ServerOptions,
    ServerSpec,
    default_cpus,
    pinned,
    running,
)
from policy_engine.bench.workloads import (
    CACHE_OFF,
    Expected,
    Row,
    decision_problems,
    expect_decision,
    method_path,
)

REPO = Path(__file__).resolve().parents[2]

SIZES = (100, 1_000, 10_000, 50_000)
ORG_COUNT = 1_000
ORG_USERS = 20
WARMUP_SECONDS = 2.0
MEASURE_SECONDS = 10.0
LATENCY_SECONDS = 5.0  # the -c1 -m1 run, over all subjects in turn
LOAD_PROCESSES = 8  # h2load processes (one subject each), one connection each
STREAMS = 8  # per connection: 8 x 8 = 64 in flight, as in `make bench`
MIN_RUN_S = 1.0  # a timed h2load run shorter than this may end before a loaded box answers
MIN_SINGLE_REQUESTS = 100  # per subject at 1 in flight, enough for a p50
START_TIMEOUT_S = 300.0
POLL_S = 0.025  # how often an edit's new answer is polled for
IDLE_WINDOW_S = 0.5
IDLE_SHARE = 0.05  # a server using less than 5% of a core over a window is idle
MB = 1024 * 1024


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- pinning -----------------------------------------------------------------------------------


def policy_server(cpu: int | None, env: dict[str, str]) -> ServerSpec:
    """The `pdp serve` server kind pinned to `cpu` (registered in SERVER_KINDS on first use)."""
    if cpu is None:
        return ServerSpec("policy", env=env)
    kind = f"policy@cpu{cpu}"
    if kind not in SERVER_KINDS:
        base = SERVER_KINDS["policy"]
        SERVER_KINDS[kind] = lambda address, options: pinned(base(address, options), cpu)
    return ServerSpec(kind, env=env)


# --- the server process, from /proc --------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of process `pid` in MiB (from /proc/PID/status). Raises OSError if it is gone,
    ValueError if the line is missing."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB  # the kernel reports kB
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def wait_idle(pid: int, timeout_s: float) -> float | None:
    """Seconds until process `pid` uses under IDLE_SHARE of a core over an IDLE_WINDOW_S
    window (counted to the start of that window), or None if it is still busy after
    `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        window_start = time.monotonic()
        before = cpu_seconds(pid)
        time.sleep(IDLE_WINDOW_S)
        used = cpu_seconds(pid) - before
        if used < IDLE_SHARE * (time.monotonic() - window_start):
            return window_start - start
    return None


# --- load ----------------------------------------------------------------------------------------


def probe_row(probe: Probe) -> Row:
    """A probe as a bench Row, for the shared gRPC answer check (`cli.verify`)."""
    return Row(probe.label, ServerSpec("policy"), "Check", probe.request,
               expect_decision(probe.expected))  # fmt: skip


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One load run over several bodies: the summed rate and every request's log entry."""

    req_per_s: float
    entries: list[h2load.LogEntry]

    @property
    def latency(self) -> h2load.Latency:
        return h2load.summarize(self.entries)


def _entries(log_file: Path, summary: h2load.Summary) -> list[h2load.LogEntry]:
    """The log's entries, after checking that each was answered with HTTP 200.

    A timed (-D) run logs the requests still completing after its deadline too, which its
    summary does not count: the log may hold more requests than succeeded, never fewer.
    """
    entries = h2load.parse_log(log_file.read_text())
    not_ok = sum(1 for e in entries if e.status != 200)
    if len(entries) < summary.succeeded or not_ok:
        raise ValueError(
            f"{log_file.name}: log has {len(entries)} requests ({not_ok} not 200), "
            f"h2load reports {summary.succeeded} succeeded"
        )
    return entries


def parallel_load(
    url: str,
    bodies: Sequence[Path],
    streams: int,
    duration_s: float,
    logs: Path,
    cpu: int | None,
) -> LoadResult:
    """One h2load process per body, all at once for `duration_s` (at least MIN_RUN_S), each
    one connection with `streams` streams; the rate is the sum of their rates. Raises
    H2loadError or ValueError when a request failed."""
    shape = h2load.LoadShape(clients=1, streams=streams)
    duration_s = max(duration_s, MIN_RUN_S)
    runs = [
        (
            pinned(h2load.grpc_command(url, body, shape, duration_s=duration_s, log_file=log), cpu),
            log,
        )
        for body, log in ((b, logs / f"{b.stem}.load.log") for b in bodies)
    ]
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        summaries = list(pool.map(lambda run: h2load.run(run[0], duration_s + 60), runs))
    entries = [e for (_, log), s in zip(runs, summaries, strict=True) for e in _entries(log, s)]
    return LoadResult(sum(s.req_per_s for s in summaries), entries)


def one_in_flight(
    url: str, bodies: Sequence[Path], requests: int, logs: Path, cpu: int | None
) -> LoadResult:
    """Each body in turn at -c1 -m1 for `requests` requests, pooled; the rate is the mean of
    the runs' rates. A count, not a duration: a short timed run at one in flight can end
    before its first answer on a loaded box."""
    shape = h2load.LoadShape(clients=1, streams=1)
    entries: list[h2load.LogEntry] = []
    rates: list[float] = []
    for body in bodies:
        log = logs / f"{body.stem}.single.log"
        command = pinned(
            h2load.grpc_command(url, body, shape, requests=requests, log_file=log), cpu
        )
        summary = h2load.run(command, 120 + requests * 0.05)
        entries += _entries(log, summary)
        rates.append(summary.req_per_s)
    return LoadResult(sum(rates) / len(rates), entries)


# --- edits ---------------------------------------------------------------------------------------


def time_edit(
    target: str, path: Path, text: str, probe: Probe, expected: Expected, timeout_s: float
) -> float | None:
    """Write `text` to `path` (atomically) and poll `probe` every POLL_S until its answer is
    `expected`: seconds from the write to that answer, or None after `timeout_s`."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            method_path("Check"),
            request_serializer=pdp_pb2.CheckRequest.SerializeToString,
            response_deserializer=pdp_pb2.CheckResponse.FromString,
        )
        call(probe.request, timeout=10.0)  # the channel is connected before the clock starts
        start = time.monotonic()
        write_file(path, text)
        while time.monotonic() - start < timeout_s:
            try:
                response = call(probe.request, timeout=max(1.0, timeout_s))
            except grpc.RpcError:
                response = None
            if response is not None and not decision_problems(response, expected):
                return time.monotonic() - start
            time.sleep(POLL_S)
    return None


# --- one row -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the rows share, from the flags."""

    threads: int
    processes: int
    streams: int
    warmup_s: float
    measure_s: float
    latency_s: float
    start_timeout_s: float
    edit_timeout_s: float
    server_cpu: int | None
    load_cpu: int | None
    workdir: Path
    logs: Path
    keep_sets: bool = False


@dataclass(frozen=True, slots=True)
class ScaleResult:
    """One set's figures; `error` says why the rest are missing ("timeout: ..." for a server
    that was not SERVING, or did not serve an edit, in time)."""

    spec: SetSpec
    files: int = 0
    bytes: int = 0
    rules: int = 0
    generate_s: float = 0.0
    start_s: float | None = None
    busy_s: float | None = None  # after SERVING until idle; None: still busy at the timeout
    req_per_s: float | None = None
    load: h2load.Latency | None = None
    single: h2load.Latency | None = None
    edits_s: tuple[float | None, ...] = ()  # None: the new answer did not arrive in time
    rss_start_mb: float | None = None
    rss_edits_mb: float | None = None
    error: str | None = None

    @property
    def timed_out(self) -> bool:
        return self.error is not None and self.error.startswith("timeout")


def server_env(generated: GeneratedSet) -> dict[str, str]:
    """The server's environment for a set: cache off (every Check decided), room for the
    set's bytes (the 8 MiB default refuses the big sets), no metrics port (it would clash
    with other servers on the box)."""
    room = max(8 * MB, 2 * generated.bytes + MB)
    return {**CACHE_OFF, "PDP_POLICY_LIMITS__MAX_SET_BYTES": str(room),
            "PDP_METRICS_ADDRESS": ""}  # fmt: skip


def measure_set(spec: SetSpec, plan: Plan) -> ScaleResult:
    """Generate `spec`'s set, measure it with a real server, and remove the set again."""
    root = plan.workdir / spec.slug
    started = time.monotonic()
    generated = generate(spec, root, probe_count=plan.processes)
    result = ScaleResult(
        spec, generated.files, generated.bytes, generated.rules,
        generate_s=time.monotonic() - started,
    )  # fmt: skip
    try:
        return _measure(generated, result, plan)
    finally:
        if not plan.keep_sets:
            shutil.rmtree(root, ignore_errors=True)


def _measure(generated: GeneratedSet, result: ScaleResult, plan: Plan) -> ScaleResult:
    spec = generated.spec
    logs = plan.logs / spec.slug
    logs.mkdir(parents=True, exist_ok=True)
    bodies: list[Path] = []
    for index, probe in enumerate(generated.probes):
        body = logs / f"subject-{index}.body"
        body.write_bytes(h2load.grpc_frame(probe.request.SerializeToString()))
        bodies.append(body)
    rows = [probe_row(probe) for probe in generated.probes]
    options = ServerOptions(1, plan.threads, generated.root)
    spec_server = policy_server(plan.server_cpu, server_env(generated))
    launched = time.monotonic()
    try:
        with running(
            spec_server, options, logs / "server.log", cwd=REPO,
            health_timeout_s=plan.start_timeout_s,
        ) as srv:  # fmt: skip
            result = dataclasses.replace(result, start_s=time.monotonic() - launched)
            _log(f"  SERVING after {result.start_s:.2f}s")
            pid = srv.process.pid
            busy = wait_idle(pid, plan.start_timeout_s)
            result = dataclasses.replace(result, busy_s=busy, rss_start_mb=rss_mb(pid))
            for row in rows:
                verify(srv.target, row, "before load")
            url = srv.url_base + method_path("Check")
            parallel_load(url, bodies, plan.streams, plan.warmup_s, logs, plan.load_cpu)
            srv.check_alive()
            measured = parallel_load(url, bodies, plan.streams, plan.measure_s, logs, plan.load_cpu)
            # Sized from the loaded rate: about latency_s in all at one in flight.
            each = math.ceil(measured.req_per_s * plan.latency_s / len(bodies))
            single = one_in_flight(url, bodies, max(MIN_SINGLE_REQUESTS, each), logs, plan.load_cpu)
            for row in rows:
                verify(srv.target, row, "after load")
            result = dataclasses.replace(
                result, req_per_s=measured.req_per_s, load=measured.latency, single=single.latency
            )
            _log(
                f"  {measured.req_per_s:,.0f} req/s; p50 at -c1 -m1 {single.latency.p50_ms:.2f} ms"
            )
            edit = generated.edit
            verify(srv.target, probe_row(edit.probe), "before the edit")
            edits: list[float | None] = []
            for text, expected in (
                (edit.flipped, edit.after),
                (edit.original, edit.probe.expected),
            ):
                seconds = time_edit(
                    srv.target, edit.path, text, edit.probe, expected, plan.edit_timeout_s
                )
                edits.append(seconds)
                _log("  edit: " + ("timeout" if seconds is None else f"{seconds:.3f}s"))
                if seconds is None:
                    break
                wait_idle(pid, plan.start_timeout_s)
            result = dataclasses.replace(result, edits_s=tuple(edits))
            if None in edits:
                return dataclasses.replace(
                    result,
                    error=f"timeout: an edit was not served within {plan.edit_timeout_s:.0f}s",
                )
            return dataclasses.replace(result, rss_edits_mb=rss_mb(pid))
    except ServerError as exc:
        if result.start_s is None and time.monotonic() - launched >= plan.start_timeout_s:
            return dataclasses.replace(
                result, error=f"timeout: not SERVING within {plan.start_timeout_s:.0f}s"
            )
        return dataclasses.replace(result, error=str(exc))
    except (WrongAnswer, h2load.H2loadError, ValueError, OSError) as exc:
        return dataclasses.replace(result, error=str(exc))


# --- report --------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "timeout" if value is None else f"{value:.2f}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def results_table(results: Sequence[ScaleResult], idle_timeout_s: float) -> str:
    """The headline table: one line per set, in the order measured."""
    lines = [
        "| set | user policies | rules | start to SERVING s | then busy s | uncached req/s "
        "| p50 / p99 ms (64 in flight) | p50 ms at 1 in flight | edit to new answer s "
        "| RSS MB after start | RSS MB after 2 edits |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        head = f"| {r.spec.name} | {r.spec.user_policies:,} | {r.rules:,} | {_s(r.start_s)} | "
        busy = (
            ""
            if r.start_s is None
            else (f"> {idle_timeout_s:.0f}" if r.busy_s is None else f"{r.busy_s:.1f}")
        )
        rate = "" if r.req_per_s is None else f"{r.req_per_s:,.0f}"
        load = "" if r.load is None else f"{_ms(r.load.p50_ms)} / {_ms(r.load.p99_ms)}"
        single = "" if r.single is None else _ms(r.single.p50_ms)
        edits = ", ".join(_s(e) for e in r.edits_s)
        tail = f"{busy} | {rate} | {load} | {single} | {edits} | {_mb(r.rss_start_mb)} | "
        tail += f"{_mb(r.rss_edits_mb)} |"
        if r.error is not None and not r.timed_out:
            reason = " ".join(r.error.split())[:120].replace("|", "/")
            tail = f"FAILED: {reason} | | | | | | |"
        lines.append(head + tail)
    return "\n".join(lines)


def details_table(results: Sequence[ScaleResult]) -> str:
    lines = [
        "| set | files | MB on disk | generated in s | 64 in flight p50 / p99.9 / max ms "
        "| 1 in flight p99 ms | requests (load / 1 in flight) | error |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        load = (
            ""
            if r.load is None
            else f"{_ms(r.load.p50_ms)} / {_ms(r.load.p999_ms)} / {_ms(r.load.max_ms)}"
        )
        single = "" if r.single is None else _ms(r.single.p99_ms)
        counts = (
            "" if r.load is None or r.single is None else f"{r.load.count:,} / {r.single.count:,}"
        )
        error = "" if r.error is None else " ".join(r.error.split())[:300].replace("|", "/")
        lines.append(
            f"| {r.spec.name} | {r.files:,} | {r.bytes / MB:.2f} | {r.generate_s:.1f} | {load} "
            f"| {single} | {counts} | {error} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measured: str
    met: bool | None  # None: a row it needs was not measured


def targets(results: Sequence[ScaleResult], at: int = 10_000, base: int = 100) -> list[Target]:
    """Issue 10's targets, for each variant whose `at`-policy row ran (one organization)."""
    rows = {(r.spec.user_policies, r.spec.variant): r for r in results if r.spec.organizations == 1}
    out: list[Target] = []
    for variant in VARIANTS:
        big = rows.get((at, variant))
        if big is None:
            continue
        small = rows.get((base, variant))
        where = f"{at:,} users, {variant}"
        if small and small.req_per_s and big.req_per_s:
            share = big.req_per_s / small.req_per_s
            out.append(Target(f"{where}: uncached req/s within 10% of {base:,}",
                              f"{share:.2f} ({big.req_per_s:,.0f} vs {small.req_per_s:,.0f})",
                              share >= 0.9))  # fmt: skip
        else:
            out.append(Target(f"{where}: uncached req/s within 10% of {base:,}", "not measured",
                              None))  # fmt: skip
        if small and small.single and big.single:
            share = big.single.p50_ms / small.single.p50_ms
            out.append(Target(f"{where}: p50 at 1 in flight within 10% of {base:,}",
                              f"{big.single.p50_ms:.2f} vs {small.single.p50_ms:.2f} ms",
                              share <= 1.1))  # fmt: skip
        else:
            out.append(Target(f"{where}: p50 at 1 in flight within 10% of {base:,}",
                              "not measured", None))  # fmt: skip
        edits = [e for e in big.edits_s if e is not None]
        if big.edits_s:
            worst = None if len(edits) < len(big.edits_s) else max(edits)
            out.append(
                Target(
                    f"{where}: one-file edit to first new answer <= 0.5 s",
                    _s(worst) + " s (slower of 2)",
                    worst is not None and worst <= 0.5,
                )
            )
        else:
            out.append(Target(f"{where}: one-file edit to first new answer <= 0.5 s",
                              "not measured", None))  # fmt: skip
        limit = 10.0 if variant == "distinct" else 3.0
        name = f"{where}: start to SERVING <= {limit:g} s"
        if big.start_s is not None:
            out.append(Target(name, f"{big.start_s:.2f} s", big.start_s <= limit))
        else:
            out.append(Target(name, "timeout" if big.timed_out else "not measured",
                              False if big.timed_out else None))  # fmt: skip
        rss = [m for m in (big.rss_start_mb, big.rss_edits_mb) if m is not None]
        out.append(Target(f"{where}: RSS <= 150 MB",
                          f"{max(rss):.0f} MB" if rss else "not measured",
                          max(rss) <= 150 if rss else None))  # fmt: skip
    return out


def targets_table(results: Sequence[ScaleResult]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets(results):
        met = "n/a" if t.met is None else ("yes" if t.met else "NO")
        lines.append(f"| {t.name} | {t.measured} | {met} |")
    return "\n".join(lines)


def document(results: Sequence[ScaleResult], plan: Plan, facts: dict[str, str]) -> str:
    """The results file: headline table, targets, details, how it was measured, machine."""
    parts = [
        "# PDP benchmark at scale",
        "",
        results_table(results, plan.start_timeout_s),
        "",
        f"Load: {plan.processes} h2load processes at once, each one connection with "
        f"{plan.streams} streams and its own subject (people spread over the set, alternately "
        f"allowed and denied); req/s is their sum over {max(plan.measure_s, MIN_RUN_S):g} s "
        f"after a {max(plan.warmup_s, MIN_RUN_S):g} s warm-up. 1 in flight: the same subjects "
        f"in turn at -c1 -m1, about {plan.latency_s:g} s in all (at least "
        f"{MIN_SINGLE_REQUESTS} requests each). Edits: one person's file rewritten so their "
        "allowed tuple is denied, then written back; seconds from the rename to the first new "
        f"answer (polled every {POLL_S * 1000:.0f} ms). 'then busy': seconds after SERVING "
        "until the server idles (a reload right after start shows here).",
        "",
    ]
    table = targets_table(results)
    if table.count("\n") > 1:
        parts += [table, ""]
    parts += ["## Details", "", details_table(results), "", "## Machine and settings", ""]
    parts += [f"- {key}: {value}" for key, value in facts.items()]
    return "\n".join(parts) + "\n"


# --- command line --------------------------------------------------------------------------------


def specs(sizes: Sequence[int], variants: Sequence[Variant], orgs: bool, org_count: int,
          org_users: int) -> list[SetSpec]:  # fmt: skip
    """The sets to measure, smallest (by user policies) first, so the slow ones come last."""
    out = [SetSpec(size, variant) for size in sizes for variant in variants]
    if orgs:
        out += [SetSpec(org_users, variant, org_count) for variant in variants]
    return sorted(out, key=lambda s: s.user_policies)  # stable: variants keep their order


def _ints(text: str) -> list[int]:
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def _variants(text: str) -> list[Variant]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"variants are {', '.join(VARIANTS)}: {text!r}")
    return [v for v in VARIANTS if v in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m policy_engine.bench.scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--sizes",
        type=_ints,
        default=list(SIZES),
        help="user policies in one organization, comma-separated "
        f"(default {','.join(map(str, SIZES))})",
    )
    parser.add_argument(
        "--variants",
        type=_variants,
        default=list(VARIANTS),
        help="distinct, templated or both (default both)",
    )
    parser.add_argument(
        "--orgs",
        choices=("on", "off"),
        default="on",
        help=f"also {ORG_COUNT:,} organizations of {ORG_USERS} (default on)",
    )
    parser.add_argument("--org-count", type=int, default=ORG_COUNT, help=argparse.SUPPRESS)
    parser.add_argument("--org-users", type=int, default=ORG_USERS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--duration-scale",
        type=float,
        default=1.0,
        help=f"scale the warm-up ({WARMUP_SECONDS:g}s), load "
        f"({MEASURE_SECONDS:g}s) and 1-in-flight ({LATENCY_SECONDS:g}s) times",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=START_TIMEOUT_S,
        help="seconds a server may take to be SERVING (and to idle after) "
        f"before its row reports timeout (default {START_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--edit-timeout",
        type=float,
        help="seconds an edit may take to be served (default: --start-timeout)",
    )
    parser.add_argument("--threads", type=int, default=16, help="handler threads of the server")
    parser.add_argument(
        "--processes",
        type=int,
        default=LOAD_PROCESSES,
        help=f"h2load processes = subjects under load (default {LOAD_PROCESSES})",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=STREAMS,
        help=f"streams of each h2load connection (default {STREAMS})",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the server and h2load to separate cores"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where the sets are generated (default a temporary directory)"
    )
    parser.add_argument("--keep-sets", action="store_true", help="keep the generated sets")
    parser.add_argument(
        "--logs",
        type=Path,
        default=REPO / "bench-results" / "logs" / "scale",
        help="server logs, request bodies and h2load logs, a folder per set",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench-results" / "scale.md",
        help="results file (default bench-results/scale.md in the repo)",
    )
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    positive = (args.duration_scale, args.start_timeout, args.threads, args.processes,
                args.streams, args.org_count, args.org_users)  # fmt: skip
    if any(value <= 0 for value in positive) or (args.edit_timeout or 1) <= 0:
        print("bench-scale: durations, timeouts and counts must be positive", file=sys.stderr)
        return 2
    try:
        h2load.h2load_path()
    except h2load.H2loadError as exc:
        print(f"bench-scale: {exc}", file=sys.stderr)
        return 2
    server_cpu, load_cpu = (None, None) if args.no_pin else default_cpus()
    sets = specs(args.sizes, args.variants, args.orgs == "on", args.org_count, args.org_users)
    output = args.output.resolve()
    if args.workdir is not None:
        try:
            args.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"bench-scale: --workdir {args.workdir}: {exc.strerror}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="pdp-scale-", dir=args.workdir) as tmp:
        plan = Plan(
            threads=args.threads,
            processes=args.processes,
            streams=args.streams,
            warmup_s=WARMUP_SECONDS * args.duration_scale,
            measure_s=MEASURE_SECONDS * args.duration_scale,
            latency_s=LATENCY_SECONDS * args.duration_scale,
            start_timeout_s=args.start_timeout,
            edit_timeout_s=args.edit_timeout or args.start_timeout,
            server_cpu=server_cpu,
            load_cpu=load_cpu,
            workdir=Path(tmp),
            logs=args.logs.resolve(),
            keep_sets=args.keep_sets,
        )
        results: list[ScaleResult] = []
        for number, spec in enumerate(sets, start=1):
            _log(f"bench-scale: {number}/{len(sets)}: {spec.name} ...")
            result = measure_set(spec, plan)
            if result.error:
                _log(f"bench-scale: {spec.name}: {result.error}")
            results.append(result)
    pins = (
        "not pinned"
        if server_cpu is None
        else f"server on cpu {server_cpu}, h2load on cpu {load_cpu} (taskset)"
    )
    facts = machine_facts(REPO, {
        "server": f"pdp serve, 1 process, {args.threads} threads, cache off; {pins}",
        "load": f"{args.processes} h2load processes x -c1 -m{args.streams}; then -c1 -m1",
        "sets": "policy_engine/bench/scale_sets.py (generated per row, removed after)",
    })  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(document(results, plan, facts))
    print(results_table(results, plan.start_timeout_s))
    table = targets_table(results)
    if table.count("\n") > 1:
        print()
        print(table)
    print(f"\n(full results with machine facts: {output})")
    failed = [r for r in results if r.error is not None and not r.timed_out]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
