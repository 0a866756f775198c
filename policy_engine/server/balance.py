"""How `--workers N` processes share a port's connections, and what keeps their shares level.

The kernel hands each new connection to one listening socket of the port's SO_REUSEPORT group
by a hash of its 4-tuple (socket(7)): a fair coin per connection, so with a few connections
the split is binomial. Measured on this machine (2 workers, 200 tries each): 8 connections
open at once split 4-4 only 25% of the time (5-3: 44%, 6-2: 21%, 7-1 or 8-0: 10%); 64
connections are within 20% of each other 58% of the time. Requests follow connections: a
client (h2load `-n`, or a broker with a few long-lived HTTP/2 connections) sends each of its
connections' calls to that connection's worker, so 6-2 connections is a 75/25 request share
and one core waiting while the other is saturated.

What was evaluated on this kernel (Linux 6.18), unprivileged:

- A classic BPF program on the group (SO_ATTACH_REUSEPORT_CBPF) chooses the socket index for
  every SYN, and one attached by any listening member applies to the whole group (measured:
  `return 0` sent 40 of 40 connections to the first worker). The supervisor's held socket
  (`ports.reserve`: bound, never listening) is NOT in the group: a program attached to it
  changed nothing (22/18). And a classic program is stateless: it sees only the SYN, whose
  fields are random (the kernel adds small random increments to each connection's source
  port), so it cannot split a burst of connections more evenly than the hash does; the
  group's socket indices follow the order in which the workers called listen(), which the
  workers do not learn. Round robin per SYN needs an eBPF program with a counter map
  (BPF_PROG_TYPE_SK_REUSEPORT), which needs CAP_BPF: not available to a server run as an
  ordinary user.
- Recycling connections (`transport.max_connection_age_ms`; gRPC adds ±10% jitter to each
  connection's age, and clients reconnect on its GOAWAY without failing a call) redraws each
  connection's worker every age, so over many ages every worker's share tends to 1/N. Measured
  with a gRPC client keeping 2 connections busy for 10 s: without recycling all calls went to
  one worker in 2 of 3 runs; with a 1 s age the least busy worker did 0.69-0.85 of the busiest
  one's share. It levels shares over time (and moves a skew off for good), not at every
  moment, and not at all for a client that does not reconnect (h2load).
- More connections per client (a channel pool) narrows the binomial spread (1/sqrt(n)).

So a server with several workers recycles its connections by default (`connection_age_ms`),
and `connections_by_pid` tells how the connections are spread at a given moment (the bench
shows it beside each worker's share).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

# With several workers and no age configured, connections are recycled this often (± gRPC's
# 10% jitter): a broker's few long-lived connections are redrawn twice a minute, at the cost
# of one reconnect (a TCP and, with TLS, a TLS handshake) per connection per age.
WORKER_CONNECTION_AGE_MS = 30_000

_PROC = Path("/proc")
_TCP_TABLES = ("net/tcp", "net/tcp6")
_ESTABLISHED = "01"
_LISTEN = "0A"


def connection_age_ms(workers: int, configured_ms: int | None) -> int:
    """The `grpc.max_connection_age_ms` a server process should use (0: never recycle).

    `configured_ms` (transport.max_connection_age_ms) wins when set, 0 included (never).
    Unset (None): a lone process keeps its connections (there is no other worker to move them
    to); with several workers sharing a port, connections are recycled every
    WORKER_CONNECTION_AGE_MS so the kernel redraws their worker (see the module docstring).
    Raises ValueError for a negative value or fewer than one worker.
    """
    if workers < 1 or (configured_ms is not None and configured_ms < 0):
        raise ValueError(f"workers must be >= 1 and the age >= 0, got {workers}, {configured_ms}")
    if configured_ms is not None:
        return configured_ms
    return WORKER_CONNECTION_AGE_MS if workers > 1 else 0


def _sockets_on(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets (IPv4 and IPv6) in `state` whose local port is `port`, from
    /proc/net/tcp{,6} of this network namespace: the server side of connections to the port
    (ESTABLISHED), or its listeners (LISTEN)."""
    wanted = f"{port:04X}"
    inodes: set[int] = set()
    for table in _TCP_TABLES:
        try:
            lines = (_PROC / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl, local address:port (hex), remote, state, queues, timers, retransmits, uid,
            # timeout, inode
            in_state = len(fields) > 9 and fields[3] == state
            if in_state and fields[1].rpartition(":")[2] == wanted:
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open (empty when it is gone or not ours)."""
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(_PROC / str(pid) / "fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(entry.path)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def connections_by_pid(port: int, pids: Iterable[int]) -> dict[int, int]:
    """How many established connections to local `port` each process in `pids` holds right
    now (the workers' shares of the port's clients). Linux only; 0 for a process that is gone
    or whose file descriptors cannot be read."""
    established = _sockets_on(port, _ESTABLISHED)
    return {pid: len(_socket_inodes(pid) & established) for pid in pids}


def listening(port: int, pids: Iterable[int]) -> dict[int, bool]:
    """Whether each process in `pids` has a socket listening on local `port` (a worker that
    is still starting has none yet: the kernel gives it no connection)."""
    listeners = _sockets_on(port, _LISTEN)
    return {pid: bool(_socket_inodes(pid) & listeners) for pid in pids}
