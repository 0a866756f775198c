"""A server under test as /proc sees it: its process tree, their CPU time, its workers' shares.

`pdp serve --workers N` is a supervisor with N spawned workers (and multiprocessing's resource
tracker); a lone server is one process. The harness reads every process's user + system CPU
time before and after a measured window, so server CPU per request covers all of them, and
each worker's share of the work is its CPU (any server) or its decisions counted in the
Prometheus multiprocess directory the supervisor gives its workers (`pdp serve` only).

Linux only (/proc); on another system the readings are empty and the harness reports no CPU
figures rather than failing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from policy_engine.server.balance import connections_by_pid

PROC = Path("/proc")
# The command line multiprocessing's 'spawn' gives a worker (the resource tracker's differs).
WORKER_MARK = b"--multiprocessing-fork"
MULTIPROC_ENV = b"PROMETHEUS_MULTIPROC_DIR"
DECISIONS_METRIC = "pdp_decisions"


def _stat_fields(pid: int) -> list[str]:
    stat = (PROC / str(pid) / "stat").read_text()
    # The command name may hold spaces and parentheses: the fields follow its last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` (all its threads, live or ended) so far, in
    seconds (the kernel counts in clock ticks: 10 ms on most systems). Raises OSError when the
    process is gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid`'s children, their children, ... (not `pid` itself), from every /proc/N/stat."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        children = sorted(parents.get(pending.pop(), []))
        found += children
        pending += children
    return found


def workers(pid: int) -> list[int]:
    """The worker processes serving for `pid`: its multiprocessing-spawned descendants, or
    `pid` alone when it has none (a lone server serves itself)."""
    spawned = [p for p in descendants(pid) if WORKER_MARK in _cmdline(p)]
    return spawned or [pid]


def _cmdline(pid: int) -> bytes:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each process that still exists (one that is gone is left out)."""
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[pid] = cpu_seconds(pid)
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and of each of its descendants."""
    return cpu_by_pid([pid, *descendants(pid)])


def cpu_used(before: Mapping[int, float], after: Mapping[int, float]) -> dict[int, float]:
    """CPU seconds each process used between two readings (one born in between counts from
    zero; one that ended in between is lost, as its time is not in its parent's counters)."""
    return {pid: after[pid] - before.get(pid, 0.0) for pid in after}


def multiproc_dir(pid: int) -> Path | None:
    """The PROMETHEUS_MULTIPROC_DIR in worker `pid`'s environment (set by its supervisor
    before spawning it), None when it has none or it cannot be read."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name == MULTIPROC_ENV and value:
            return Path(os.fsdecode(value))
    return None


def decisions_by_pid(directory: Path, pids: Iterable[int]) -> dict[int, float]:
    """Decisions (`pdp_decisions_total`, every label) each worker has counted so far, from its
    own counter file in the multiprocess `directory`; a worker without a file counts 0."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict[int, float] = {}
    for pid in pids:
        path = directory / f"counter_{pid}.db"
        total = 0.0
        if path.exists():
            for metric in MultiProcessCollector.merge([str(path)]):
                if metric.name == DECISIONS_METRIC:
                    total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        out[pid] = total
    return out


@dataclass(frozen=True, slots=True)
class WorkerShare:
    """One worker's part of a measured window: CPU seconds, decisions when counted, and the
    client connections it held (the most seen at once during the window, when sampled)."""

    pid: int
    cpu_s: float
    decisions: float | None = None  # None: the server keeps no per-worker count (empty server)
    connections: int | None = None


def shares(
    cpu: Mapping[int, float],
    decisions_before: Mapping[int, float] | None,
    decisions_after: Mapping[int, float] | None,
    worker_pids: Iterable[int],
    connections: Mapping[int, int] | None = None,
) -> tuple[WorkerShare, ...]:
    """Each worker's CPU and (when both readings exist) decisions over the window."""
    out = []
    for pid in worker_pids:
        counted = None
        if decisions_before is not None and decisions_after is not None:
            counted = decisions_after.get(pid, 0.0) - decisions_before.get(pid, 0.0)
        held = None if connections is None else connections.get(pid, 0)
        out.append(WorkerShare(pid, cpu.get(pid, 0.0), counted, held))
    return tuple(out)


class ConnectionSampler:
    """While open, samples how many connections to `port` each of `pids` holds every
    `every_s` seconds on a thread; `busiest` is the sample with the most connections in all
    (the load's connections all open), None when none was taken or none held any."""

    def __init__(self, port: int, pids: list[int], every_s: float = 0.02) -> None:
        self._port, self._pids, self._every_s = port, pids, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-sampler", daemon=True)
        self.busiest: dict[int, int] | None = None

    def _run(self) -> None:
        while True:
            sample = connections_by_pid(self._port, self._pids)
            if sum(sample.values()) > sum((self.busiest or {}).values()):
                self.busiest = sample
            if self._stop.wait(self._every_s):
                return

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def balance(values: Iterable[float]) -> float | None:
    """The smallest over the largest of `values` (1.0: even; 0.8: the least busy worker did
    80% of the busiest one's work); None for fewer than two values or nothing done."""
    seen = list(values)
    if len(seen) < 2 or max(seen) <= 0:
        return None
    return min(seen) / max(seen)
