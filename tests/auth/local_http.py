"""A real HTTP server on 127.0.0.1 for tests that play an identity provider."""

from __future__ import annotations

import http.server
import threading
from typing import Any


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs nothing and writes its status line and headers at once."""

    def head(self, status: int, headers: dict[str, str]) -> None:
        """Send `status` and `headers` (with a JSON content type) and flush them."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def log_message(self, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a held request never keeps the test process alive
    block_on_close = False


def serve(handler: type[QuietHandler]) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A server for `handler` on an ephemeral port, serving in a thread, and its base URL
    (`http://127.0.0.1:PORT`). Call `shutdown()` and `server_close()` when done."""
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
