"""One port, one server: who may share a listening port, and how a supervisor claims one.

SO_REUSEPORT lets several sockets of one user listen on one port, the kernel spreading new
connections between them (socket(7)). That is what `--workers N` wants among its own
processes, and exactly what must never happen between two servers: a second `pdp serve` on
a port in use would quietly take half the connections, with its own policies.

- A lone process (`workers: 1`) never sets SO_REUSEPORT: binding a port in use fails, and
  no later server can join its port either.
- A supervisor first `reserve`s each port its workers will share: a check bind without
  SO_REUSEPORT (fails if anything listens there, SO_REUSEPORT or not), then a held socket
  bound with SO_REUSEPORT but not SO_REUSEADDR, never listening (so it receives no
  connections). Its own workers (SO_REUSEPORT, same user) bind next to the held socket; any
  other server's check, or a lone server, conflicts with it, so a second supervisor cannot
  slip in while the first one's workers are still starting.

Both binds use SO_REUSEADDR where gRPC does, so connections of a server that just stopped
(TIME_WAIT) never make a free port look taken.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass, field

from policy_engine.config import ConfigError

log = logging.getLogger(__name__)


def reuse_port(workers: int) -> int:
    """The `grpc.so_reuseport` channel option for a server process: 1 only among workers."""
    return 1 if workers > 1 else 0


@dataclass
class Reservation:
    """Held sockets keeping a supervisor's ports for its own workers; `close()` frees them."""

    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()


def _split(address: str, setting: str) -> tuple[str | None, int]:
    host, sep, port_text = address.rpartition(":")
    try:
        port = int(port_text) if sep else -1
    except ValueError:
        port = -1
    if not 0 < port <= 65535:
        raise ConfigError(f"setting {setting}: expected host:port, got {address!r}")
    host = host.strip("[]")
    return (host or None), port


def _bind_addresses(address: str, setting: str) -> list[tuple[int, tuple[object, ...]]]:
    host, port = _split(address, setting)
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{setting} {address}: cannot resolve ({exc.strerror})") from exc
    seen: list[tuple[int, tuple[object, ...]]] = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    return seen


def _socket(family: int, sockaddr: tuple[object, ...], *, held: bool) -> socket.socket:
    """Bound, not listening: the check (SO_REUSEADDR only) or the held socket (SO_REUSEPORT
    only)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        option = socket.SO_REUSEPORT if held else socket.SO_REUSEADDR
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
        if family == socket.AF_INET6 and sockaddr[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as gRPC binds "[::]"
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def check_free(address: str, setting: str) -> list[tuple[int, tuple[object, ...]]]:
    """Fail unless every address `address` resolves to is free; returns them.

    A name such as `localhost` resolves to several addresses (127.0.0.1 and ::1), and gRPC
    starts when it can bind any one of them: without this check a second server would start
    on the free one and answer every client that reaches the port that way. Port 0 (a free
    port picked at bind time) is never in use. Raises ConfigError naming the setting and the
    address when anything listens on any of them.
    """
    if address.rpartition(":")[2] == "0" or address.startswith(("unix:", "unix-abstract:")):
        return []  # a port picked at bind time, or a Unix socket: gRPC's bind decides
    addresses = _bind_addresses(address, setting)
    for family, sockaddr in addresses:
        try:
            _socket(family, sockaddr, held=False).close()
        except OSError as exc:
            raise ConfigError(
                f"{setting} {address}: cannot bind {_shown(family, sockaddr)} "
                f"({exc.strerror or exc}); another server already listens there"
            ) from exc
    return addresses


def _shown(family: int, sockaddr: tuple[object, ...]) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def reserve(address: str, setting: str, into: Reservation) -> None:
    """Fail unless `address` is free (`check_free`), then hold it for this process's workers
    (see above).

    Raises ConfigError naming the setting and the address when anything listens there.
    """
    for family, sockaddr in check_free(address, setting):
        try:
            into.sockets.append(_socket(family, sockaddr, held=True))
        except OSError as exc:
            # Only a free port with a non-SO_REUSEPORT socket in TIME_WAIT gets here: the
            # check passed, so serve without the hold (only a concurrent start could race).
            log.debug("%s %s: not held (%s)", setting, address, exc.strerror or exc)
