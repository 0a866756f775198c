"""Driving h2load at a gRPC method, and reading what it reports.

h2load speaks plain HTTP/2, not gRPC: the body must be a ready-made gRPC frame, and it counts
an HTTP 200 as success even when the RPC failed (grpc-status travels in the trailers). The
harness therefore checks correctness separately, with a real gRPC client, before each run.

The pure parts (framing, log and summary parsing, percentiles) are unit-tested.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from policy_engine.errors import PolicyEngineError

INSTALL_HINT = "apt-get install -y nghttp2-client   (or run `make bench`, which installs it)"


class H2loadError(PolicyEngineError, RuntimeError):
    """h2load is missing, failed, or reported something the harness cannot trust."""


# --- pure parts ------------------------------------------------------------------------------


def grpc_frame(message: bytes, *, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message: flag byte, 4-byte big-endian length, the bytes."""
    return struct.pack(">BI", 1 if compressed else 0, len(message)) + message


def unframe(frame: bytes) -> bytes:
    """The message inside one gRPC frame (the inverse of `grpc_frame`, for tests and checks)."""
    if len(frame) < 5:
        raise ValueError(f"a gRPC frame has a 5-byte prefix; got {len(frame)} bytes")
    _, length = struct.unpack(">BI", frame[:5])
    if len(frame) != 5 + length:
        raise ValueError(f"frame says {length} bytes, carries {len(frame) - 5}")
    return frame[5:]


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of h2load's --log-file: when the request started, its status, how long it took."""

    start_us: int
    status: int
    elapsed_us: int


def parse_log(text: str) -> list[LogEntry]:
    """h2load's per-request log: `start µs<TAB>status<TAB>elapsed µs` per line (nghttp2 1.52).

    A line that is not three integers raises: a silently mis-read log would give wrong numbers.
    """
    entries: list[LogEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"h2load log line {number}: expected 3 tab-separated fields: {line!r}")
        try:
            start, status, elapsed = (int(p) for p in parts)
        except ValueError as exc:
            raise ValueError(f"h2load log line {number}: not integers: {line!r}") from exc
        entries.append(LogEntry(start, status, elapsed))
    return entries


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values: a value that was actually observed.

    The smallest value with at least `pct`% of the samples at or below it. No interpolation,
    so p99.9 of 500 samples is honestly the maximum rather than an invented number.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 < pct <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {pct}")
    # Rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, not 999.
    rank = math.ceil(round(pct / 100 * len(sorted_values), 9))
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class Latency:
    """What a measured run's log says: sample count, non-200 count, percentiles in ms."""

    count: int
    not_ok: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    req_per_s: float  # completed requests over the span from first start to last finish


def summarize(entries: Sequence[LogEntry]) -> Latency:
    """Latency percentiles and log-derived throughput of one run."""
    if not entries:
        raise ValueError("h2load logged no requests")
    elapsed = sorted(e.elapsed_us for e in entries)
    first = min(e.start_us for e in entries)
    last = max(e.start_us + e.elapsed_us for e in entries)
    span_s = max(last - first, 1) / 1e6
    return Latency(
        count=len(entries),
        not_ok=sum(1 for e in entries if e.status != 200),
        p50_ms=percentile(elapsed, 50) / 1000,
        p99_ms=percentile(elapsed, 99) / 1000,
        p999_ms=percentile(elapsed, 99.9) / 1000,
        mean_ms=sum(elapsed) / len(elapsed) / 1000,
        max_ms=elapsed[-1] / 1000,
        req_per_s=len(entries) / span_s,
    )


@dataclass(frozen=True, slots=True)
class Summary:
    """h2load's own summary lines: throughput and request outcome counts."""

    req_per_s: float
    total: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int


_FINISHED = re.compile(r"^finished in [^,]+, ([\d.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.MULTILINE,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx", re.MULTILINE)


def parse_summary(stdout: str) -> Summary:
    """Parse the `finished in`, `requests:` and `status codes:` lines of h2load's output."""
    finished, requests, status = (p.search(stdout) for p in (_FINISHED, _REQUESTS, _STATUS))
    if not (finished and requests and status):
        raise ValueError("h2load output lacks its summary lines:\n" + stdout[-2000:])
    total, succeeded, failed, errored, timeout = (int(g) for g in requests.groups())
    return Summary(
        req_per_s=float(finished.group(1)),
        total=total,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status_2xx=int(status.group(1)),
    )


# --- running h2load --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadShape:
    """How hard to push: connections, concurrent streams per connection, h2load threads."""

    clients: int = 8
    streams: int = 8
    threads: int = 1

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams


def h2load_path() -> str:
    """The h2load binary, or an error that says how to install it."""
    path = shutil.which("h2load")
    if path is None:
        raise H2loadError(f"h2load not found on PATH; install it with: {INSTALL_HINT}")
    return path


def h2load_version() -> str:
    out = subprocess.run(
        [h2load_path(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    return out.strip() or "unknown"


def grpc_command(
    url: str,
    body_file: Path,
    shape: LoadShape,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    log_file: Path | None = None,
) -> list[str]:
    """The h2load command line for unary gRPC calls over h2c: a fixed count or a duration."""
    if (requests is None) == (duration_s is None):
        raise ValueError("give exactly one of requests or duration_s")
    command = [h2load_path()]
    if requests is not None:
        command += ["-n", str(max(requests, shape.clients))]
    elif duration_s is not None:
        command += ["-D", f"{max(1, round(duration_s * 1000))}ms"]  # an integer and a unit
    command += [
        "-c", str(shape.clients),
        "-m", str(shape.streams),
        "-t", str(shape.threads),
        "--header", "content-type: application/grpc",
        "--header", "te: trailers",
        "-d", str(body_file),
    ]  # fmt: skip
    if log_file is not None:
        command += ["--log-file", str(log_file)]
    return [*command, url]


def run(command: list[str], timeout_s: float) -> Summary:
    """Run h2load; its summary, after insisting that every request succeeded at HTTP level."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise H2loadError(f"h2load did not finish within {timeout_s:.0f}s") from exc
    if done.returncode != 0:
        output = (done.stderr.strip() + "\n" + done.stdout[-1500:]).strip()
        raise H2loadError(f"h2load exited {done.returncode}: {output}")
    summary = parse_summary(done.stdout)
    bad = summary.failed + summary.errored + summary.timeout
    if bad or summary.status_2xx != summary.succeeded or summary.succeeded == 0:
        raise H2loadError(
            f"h2load reports {summary.succeeded} succeeded, {summary.failed} failed, "
            f"{summary.errored} errored, {summary.timeout} timed out, "
            f"{summary.status_2xx} 2xx:\n{done.stdout[-1500:]}"
        )
    return summary
