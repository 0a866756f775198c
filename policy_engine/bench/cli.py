"""`python -m policy_engine.bench`: run the rows, print the table, write bench-results/latest.md.

Per row: start its server on a free port, wait for gRPC health SERVING, check one real answer,
warm up (which also measures the rate and fills a cache row's cache), size the measured run from
that rate so every row takes about the same time, run it, check one real answer again, stop.

The rows run round-robin `--rounds` times (3 by default), each round a third of the time: on a
shared box throughput drifts by 10-20% over minutes, and a row measured once, a minute after its
baseline, inherits that drift in its ratio. Each row reports the median of its rounds' req/s,
and latency percentiles over the requests of all its rounds.

With `--baseline REF` every row also runs on REF's server (a temporary git worktree, see
`builds`), right after this checkout's in each round, with the same h2load and pinning.
Around each measured run the harness reads the server's CPU time from /proc (every process:
supervisor and workers) and, with several workers, each worker's share.

Exit code 0 when every row was measured with correct answers on this checkout (a row the
previous build cannot serve is reported, not a failure), 1 otherwise, 2 for bad flags or a
baseline that cannot be prepared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from google.protobuf.message import Message

from policy_engine.audit.keys import generate_keypair
from policy_engine.bench import h2load, procs
from policy_engine.bench.builds import PREVIOUS_SERVER_REF, Build, BuildError, current, previous
from policy_engine.bench.engine_bench import EngineResult
from policy_engine.bench.engine_bench import measure as measure_engine
from policy_engine.bench.hit_path import HitPathResult
from policy_engine.bench.hit_path import measure as measure_hit_path
from policy_engine.bench.redis_server import (
    RedisUnavailable,
    free_port,
    redis_server,
    redis_server_version,
)
from policy_engine.bench.report import (
    RowResult,
    document,
    machine_facts,
    sections,
)
from policy_engine.bench.server import (
    AUDIT_DIR,
    AUDIT_KEY,
    CACHE_KEY_FILE,
    CLOSED_REDIS_URL,
    REDIS_URL,
    RunningServer,
    ServerError,
    ServerOptions,
    default_cpus,
    pinned,
    running,
)
from policy_engine.bench.workloads import (
    METHODS,
    Check,
    Row,
    default_rows,
    method_path,
    select,
)
from policy_engine.errors import PolicyEngineError

REPO = Path(__file__).resolve().parents[2]

# Defaults for a 2-core box: one server process, h2load on the other core.
MEASURE_SECONDS = 10.0  # per row, over all rounds
WARMUP_SECONDS = 2.0  # per row, over all rounds (at least MIN_WARMUP_SECONDS per round)
MIN_WARMUP_SECONDS = 0.6
ROUNDS = 3
ENGINE_SECONDS = 2.0
MIN_REQUESTS = 500  # enough samples for a p99 that means something, even on slow rows
# Every benchmarked server's metrics on a port of its own: a fixed one may be taken, and with
# several workers the supervisor's metrics directory is where each worker's count is read.
SERVER_ENV = {"PDP_METRICS_ADDRESS": "127.0.0.1:0"}


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one run needs, from the flags. `load_cpu` pins h2load beside a pinned
    server (`options.cpu`)."""

    options: ServerOptions
    shape: h2load.LoadShape
    measure_s: float
    warmup_s: float
    workdir: Path
    logs: Path
    substitutions: dict[str, str] = dataclasses.field(default_factory=dict)
    load_cpu: int | None = None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def call_once(target: str, row: Row) -> Message:
    """The row's request sent once with a real gRPC client (h2load cannot see grpc-status)."""
    request_type, response_type = METHODS[row.method]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            method_path(row.method),
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(row.request, timeout=10.0)


class WrongAnswer(PolicyEngineError):
    """The server failed the RPC or answered something other than what the row expects."""


def verify(target: str, row: Row, when: str, check: Check | None = None) -> None:
    """Fail the row unless a real gRPC call gets the answer the row expects (`check`)."""
    try:
        response = call_once(target, row)
    except grpc.RpcError as exc:
        raise WrongAnswer(
            f"{when}: {row.method} failed: {exc.code().name}: {exc.details()}"
        ) from None
    problems = (check or row.check)(response)
    if problems:
        more = f"; ... {len(problems) - 5} more" if problems[5:] else ""
        raise WrongAnswer(f"{when}: wrong answer: {'; '.join(problems[:5])}{more}")


def requests_for(rate: float, seconds: float, shape: h2load.LoadShape) -> int:
    """How many requests take about `seconds` at `rate`, and never too few for percentiles."""
    floor = max(MIN_REQUESTS, shape.in_flight * 4)
    return max(floor, math.ceil(rate * seconds))


@dataclass
class Window:
    """What /proc says about a server around one measured run: CPU per process before and
    after, and each worker's decisions when its supervisor keeps per-worker counters."""

    pid: int
    workers: list[int]
    counters: Path | None
    cpu_before: dict[int, float]
    decisions_before: dict[int, float] | None
    sampler: procs.ConnectionSampler | None = None

    @classmethod
    def open(cls, server: RunningServer) -> Window:
        pid = server.process.pid
        workers = procs.workers(pid)
        counters = procs.multiproc_dir(workers[0]) if workers != [pid] else None
        decisions = procs.decisions_by_pid(counters, workers) if counters else None
        if counters:
            # A request the warm-up's h2load left in flight may still be decided: wait until
            # the counts hold still (at most a second), so it is not counted in the window.
            settle_by = time.monotonic() + 1.0
            while time.monotonic() < settle_by:
                time.sleep(0.05)
                again = procs.decisions_by_pid(counters, workers)
                if again == decisions:
                    break
                decisions = again
        return cls(pid, workers, counters, procs.tree_cpu(pid), decisions)

    def connections(self, port: int) -> contextlib.AbstractContextManager[object]:
        """Samples each worker's connections while the load runs (several workers only)."""
        if len(self.workers) < 2:
            return contextlib.nullcontext()
        self.sampler = procs.ConnectionSampler(port, self.workers)
        return self.sampler

    def close(self) -> tuple[float | None, tuple[procs.WorkerShare, ...]]:
        """Server CPU seconds over the window (None when /proc had nothing), and each
        worker's share when there are several."""
        used = procs.cpu_used(self.cpu_before, procs.tree_cpu(self.pid))
        if not used:
            return None, ()
        if len(self.workers) < 2:
            return sum(used.values()), ()
        after = procs.decisions_by_pid(self.counters, self.workers) if self.counters else None
        held = self.sampler.busiest if self.sampler is not None else None
        return sum(used.values()), procs.shares(
            used, self.decisions_before, after, self.workers, held
        )


def _pinned_load(command: list[str], plan: Plan, server_pinned: bool) -> list[str]:
    """h2load on the load core when the server is on its own core, else where it runs."""
    return pinned(command, plan.load_cpu if server_pinned else None)


def _own_policies(options: ServerOptions, build: Build) -> ServerOptions:
    """A previous build serves its own copy of a policy directory that lies in this checkout
    (its loader may refuse files added since, e.g. test suites): the same path in its tree."""
    try:
        relative = options.policy_dir.resolve().relative_to(REPO)
    except ValueError:
        return options  # outside the checkout: both builds serve the same directory
    return dataclasses.replace(options, policy_dir=build.root / relative)


def run_row(
    row: Row, plan: Plan, round_index: int = 0, build: Build | None = None
) -> tuple[RowResult, list[h2load.LogEntry]]:
    """One round of one row on `build` (default this checkout): its result, and its requests'
    log entries (for pooling)."""
    build = build or current()
    server_desc = " ".join(
        [row.server.kind, *row.server.args, *(f"{k}={v}" for k, v in row.server.env.items())]
    )
    shape = row.shape or plan.shape
    options = row.server.options(plan.options)
    base = RowResult(
        row.name, row.baseline, row.decisions_per_request, server=server_desc, build=build.label,
        group=row.group, in_flight=shape.in_flight, in_process=row.in_process,
        processes=options.workers,
    )  # fmt: skip
    slug = "".join(c if c.isalnum() else "-" for c in row.name.lower())
    body = plan.workdir / f"{slug}.body"
    body.write_bytes(h2load.grpc_frame(row.request.SerializeToString()))
    log_file = plan.workdir / f"{slug}.{build.label}.{round_index}.log"
    server_log = plan.logs / f"{slug}.{build.label}.server.log"
    server_pinned = options.workers == 1 and options.cpu is not None
    try:
        served = row.server.with_policy_files(
            _own_policies(plan.options, build), plan.workdir / f"{slug}.{build.label}"
        )
        with running(
            row.server, served, server_log, cwd=build.root,
            substitutions=plan.substitutions, extra_env={**SERVER_ENV, **build.env},
        ) as srv:  # fmt: skip
            url = srv.url_base + method_path(row.method)
            verify(srv.target, row, "before load")
            # The warm-up also fills a cache row's cache (h2load repeats one body).
            warm = h2load.run(
                _pinned_load(
                    h2load.grpc_command(url, body, shape, duration_s=plan.warmup_s),
                    plan, server_pinned,
                ),
                timeout_s=plan.warmup_s + 60,
            )  # fmt: skip
            srv.check_alive()
            count = requests_for(warm.req_per_s, plan.measure_s, shape)
            expected_s = count / max(warm.req_per_s, 1.0)
            window = Window.open(srv)
            with window.connections(int(srv.target.rpartition(":")[2])):
                summary = h2load.run(
                    _pinned_load(
                        h2load.grpc_command(url, body, shape, requests=count, log_file=log_file),
                        plan, server_pinned,
                    ),
                    timeout_s=expected_s * 5 + 60,
                )  # fmt: skip
            cpu_s, shares = window.close()
            verify(srv.target, row, "after load", row.check_after)
        entries = h2load.parse_log(log_file.read_text())
        latency = h2load.summarize(entries)
    except (WrongAnswer, ServerError, h2load.H2loadError, ValueError, OSError) as exc:
        return dataclasses.replace(base, error=str(exc)), []
    if latency.count != summary.succeeded or latency.not_ok:
        error = (
            f"log has {latency.count} requests ({latency.not_ok} not 200), "
            f"h2load reports {summary.succeeded} succeeded"
        )
        return dataclasses.replace(base, error=error), []
    result = dataclasses.replace(
        base,
        req_per_s=summary.req_per_s,
        latency=latency,
        requests=count,
        warmup_req_per_s=warm.req_per_s,
        load=f"-c {shape.clients} -m {shape.streams}",
        rounds=(summary.req_per_s,),
        cpu_s=cpu_s,
        workers=(shares,) if shares else (),
    )
    return result, entries


def combine(rounds: list[tuple[RowResult, list[h2load.LogEntry]]]) -> RowResult:
    """One row from its rounds: median req/s, percentiles over every round's requests."""
    results = [result for result, _ in rounds]
    failed = [r for r in results if r.error is not None]
    if failed:
        return failed[0]
    pooled = h2load.summarize([entry for _, entries in rounds for entry in entries])
    log_rates = [r.latency.req_per_s for r in results if r.latency is not None]
    cpu = [r.cpu_s for r in results]
    return dataclasses.replace(
        results[0],
        req_per_s=statistics.median(r.req_per_s for r in results),
        latency=dataclasses.replace(pooled, req_per_s=statistics.median(log_rates)),
        requests=sum(r.requests for r in results),
        warmup_req_per_s=statistics.median(r.warmup_req_per_s for r in results),
        rounds=tuple(r.req_per_s for r in results),
        # CPU per request over every round's requests (None if any round lacks a reading).
        cpu_s=None if any(c is None for c in cpu) else sum(c for c in cpu if c is not None),
        workers=tuple(shares for r in results for shares in r.workers),
    )


def split_names(text: str, known: Sequence[str]) -> list[str]:
    """Comma-separated row names, where a name may itself contain commas (the longest known
    name wins); unknown pieces are kept as they are, for `select` to report."""
    parts = text.split(",")
    names: list[str] = []
    start = 0
    while start < len(parts):
        for end in range(len(parts), start, -1):
            candidate = ",".join(parts[start:end]).strip()
            if candidate in known:
                names.append(candidate)
                start = end
                break
        else:
            if parts[start].strip():
                names.append(parts[start].strip())
            start += 1
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m policy_engine.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rows", help="comma-separated row names (their baselines are added)")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument(
        "--duration-scale",
        type=float,
        default=1.0,
        help=f"scale the warm-up ({WARMUP_SECONDS:g}s) and measured "
        f"({MEASURE_SECONDS:g}s) time of every row",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help=f"run the rows round-robin this many times and report medians (default {ROUNDS})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes (default 1: h2load needs the other core; the '2 workers' "
        "rows run 2 whatever this says)",
    )
    parser.add_argument(
        "--threads", type=int, help="--threads for every server (default: the server's own)"
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run every row on the server of git REF (a temporary worktree), round by "
        f"round; {PREVIOUS_SERVER_REF} is the threaded server before grpc.aio",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin a one-process server and h2load to separate cores (taskset)",
    )
    parser.add_argument("--clients", "-c", type=int, default=8, help="h2load connections")
    parser.add_argument(
        "--streams", "-m", type=int, default=8, help="h2load concurrent streams per connection"
    )
    parser.add_argument(
        "--policies",
        type=Path,
        default=REPO / "policies",
        help="policy directory for the real server (default the repo's)",
    )
    parser.add_argument(
        "--no-engine", action="store_true", help="skip the in-process engine timing"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench-results" / "latest.md",
        help="results file (default bench-results/latest.md in the repo)",
    )
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = default_rows()
    if args.list:
        for row in rows:
            print(f"{row.name:<36} {row.server.kind:<7} {row.method:<11} {row.notes}")
        return 0
    if (
        args.duration_scale <= 0
        or args.workers < 1
        or (args.threads is not None and args.threads < 1)
        or args.rounds < 1
    ):
        print(
            "bench: --duration-scale, --rounds, --workers and --threads must be positive",
            file=sys.stderr,
        )
        return 2
    if args.rows:
        try:
            rows = select(rows, split_names(args.rows, [row.name for row in rows]))
        except KeyError as exc:
            print(f"bench: {exc.args[0]}", file=sys.stderr)
            return 2
    try:
        h2load.h2load_path()
    except h2load.H2loadError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    with _signals_exit(), contextlib.ExitStack() as stack:
        builds = [current()]
        if args.baseline:
            _log(f"bench: preparing the previous build {args.baseline} (git worktree) ...")
            try:
                builds.append(stack.enter_context(previous(args.baseline, REPO)))
            except BuildError as exc:
                print(f"bench: {exc}", file=sys.stderr)
                return 2
        return _run(args, rows, builds)


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does: through every `finally` (servers stopped, the
    previous build's worktree removed)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _run(args: argparse.Namespace, rows: list[Row], builds: list[Build]) -> int:
    policy_dir = args.policies.resolve()
    output = args.output.resolve()
    shape = h2load.LoadShape(clients=args.clients, streams=args.streams, threads=1)
    server_cpu, load_cpu = (None, None) if args.no_pin else default_cpus()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pdp-bench-") as tmp, contextlib.ExitStack() as stack:
        substitutions = {
            CLOSED_REDIS_URL: f"redis://127.0.0.1:{free_port()}/0",
            AUDIT_DIR: str(Path(tmp) / "audit"),
            AUDIT_KEY: str(Path(tmp) / "audit.key"),
            CACHE_KEY_FILE: str(Path(tmp) / "cache.key"),
        }
        generate_keypair(Path(tmp) / "audit.key", Path(tmp) / "audit.pub")
        (Path(tmp) / "cache.key").write_text(secrets.token_hex(32) + "\n")
        redis_note = "not used"
        if any(row.server.needs_redis for row in rows):
            try:
                redis = stack.enter_context(redis_server(Path(tmp) / "redis"))
            except RedisUnavailable as exc:
                print(f"bench: the Redis rows need redis-server: {exc}", file=sys.stderr)
                return 2
            substitutions[REDIS_URL] = redis.url
            redis_note = f"{redis_server_version()} on {redis.url} (started by the harness)"
        plan = Plan(
            options=ServerOptions(args.workers, args.threads, policy_dir, server_cpu),
            shape=shape,
            measure_s=MEASURE_SECONDS * args.duration_scale / args.rounds,
            warmup_s=max(MIN_WARMUP_SECONDS, WARMUP_SECONDS * args.duration_scale / args.rounds),
            workdir=Path(tmp),
            logs=REPO / "bench-results" / "logs",
            substitutions=substitutions,
            load_cpu=load_cpu,
        )
        by_row: dict[tuple[str, str], list[tuple[RowResult, list[h2load.LogEntry]]]] = {
            (build.label, row.name): [] for build in builds for row in rows
        }
        for round_index in range(args.rounds):
            for row in rows:
                for build in builds:
                    where = f"bench: round {round_index + 1}/{args.rounds}: {row.name}"
                    if build.label != "current":
                        where += f" [{build.label}]"
                    _log(f"{where} ...")
                    result, entries = run_row(row, plan, round_index, build)
                    _log(f"{where}: " + (
                        f"FAILED: {result.error}" if result.error else
                        f"{result.req_per_s:,.0f} req/s over {result.requests:,} requests"
                    ))  # fmt: skip
                    by_row[build.label, row.name].append((result, entries))
        measured = {
            build.label: [combine(by_row[build.label, row.name]) for row in rows]
            for build in builds
        }
    results = measured["current"]
    earlier = measured.get("previous", [])

    engine: list[EngineResult] = []
    if not args.no_engine:
        _log("bench: in-process engine ...")
        try:
            engine = measure_engine(policy_dir, ENGINE_SECONDS * args.duration_scale)
        except Exception as exc:  # reported, not fatal: the gRPC rows are still worth having
            _log(f"bench: engine timing FAILED: {exc}")
    hit_path: list[HitPathResult] = []
    if not args.no_engine:
        _log("bench: in-process servicer (cache hit path) ...")
        try:
            hit_path = measure_hit_path(policy_dir, ENGINE_SECONDS * args.duration_scale)
        except Exception as exc:
            _log(f"bench: hit path timing FAILED: {exc}")

    pins = (
        "not pinned"
        if server_cpu is None
        else f"a one-process server on cpu {server_cpu}, h2load on cpu {load_cpu} (taskset); "
        "servers of several workers and their h2load not pinned"
    )
    facts = machine_facts(REPO, {
        "server": f"workers={args.workers} threads={args.threads or 'server default'} "
                  f"policies={args.policies}; {pins}",
        "builds": "; ".join(f"{b.label}: {b.revision}" for b in builds),
        "load": f"h2load -c {shape.clients} -m {shape.streams} -t {shape.threads} unless the "
                f"row says otherwise; {args.rounds} round(s) round-robin, each a warm-up of "
                f"{plan.warmup_s:.2g}s then ~{plan.measure_s:.2g}s per row "
                f"(duration scale {args.duration_scale:g})",
        "redis": redis_note,
        "wall time": f"{time.monotonic() - started:.0f}s",
        "server logs": str(plan.logs),
    })  # fmt: skip
    text = document(results, engine, facts, hit_path, earlier)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print("\n\n".join(sections(results, earlier, engine, hit_path)))
    print(f"\n(full results with machine facts: {output})")
    return 1 if any(r.error for r in results) else 0
