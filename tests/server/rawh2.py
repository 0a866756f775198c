"""Hand-written HTTP/2 on a real socket, for callers no gRPC client would be: one that opens
streams and never sends their message, one that connects and says nothing.

Only what those callers need: the client preface, SETTINGS (and the ACK of the server's),
and HEADERS frames encoded with HPACK literals (no Huffman, no table), per RFC 9113 / 7541.
"""

from __future__ import annotations

import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x4, 0x6, 0x7
END_HEADERS = 0x4
ACK = 0x1


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def _integer(value: int, prefix_bits: int) -> bytes:
    """An HPACK integer with an N-bit prefix (the prefix's flag bits are 0)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return _integer(len(data), 7) + data  # H bit 0: not Huffman-coded


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """Each header as a literal without indexing, new name (RFC 7541 6.2.2)."""
    return b"".join(b"\x00" + _string(name) + _string(value) for name, value in headers)


def grpc_headers(port: int, method: str) -> bytes:
    """The header block of a gRPC call to `method` ("/package.Service/Method")."""
    return header_block(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )


class RawConnection:
    """An HTTP/2 connection to 127.0.0.1:`port` that only ever sends what it is told to."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._buffer = b""
        self.next_stream = 1

    def handshake(self) -> None:
        """Preface and empty SETTINGS; then the server's SETTINGS, acknowledged."""
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        while True:
            kind, flags, _, _ = self.read_frame()
            if kind == SETTINGS and not flags & ACK:
                self.sock.sendall(frame(SETTINGS, ACK, 0))
                return

    def open_streams(self, count: int, method: str) -> None:
        """`count` streams with their HEADERS sent and no DATA, no END_STREAM: each call waits
        for a request message that never comes."""
        block = grpc_headers(self.port, method)
        frames = []
        for _ in range(count):
            frames.append(frame(HEADERS, END_HEADERS, self.next_stream, block))
            self.next_stream += 2
        self.sock.sendall(b"".join(frames))

    def read_frame(self) -> tuple[int, int, int, bytes]:
        """The next frame (type, flags, stream, payload); raises EOFError when the server
        closed the connection."""
        header = self._read(9)
        length = int.from_bytes(header[:3], "big")
        stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        return header[3], header[4], stream, self._read(length)

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def drain(self) -> None:
        """Answer pings and read whatever the server sent, without blocking."""
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                self._buffer += chunk
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(10)
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                return
            kind, flags = self._buffer[3], self._buffer[4]
            payload = self._buffer[9 : 9 + length]
            self._buffer = self._buffer[9 + length :]
            if kind == PING and not flags & ACK:
                self.sock.sendall(frame(PING, ACK, 0, payload))

    def close(self) -> None:
        self.sock.close()


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Read until the server closes `sock` (EOF or reset): True; False if `timeout` seconds
    pass with the connection still open."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True
