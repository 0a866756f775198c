"""Fetching a JWKS document (or an issuer's metadata) over HTTP(S), on the event loop, bounded
in time and size.

One `JwksFetcher` holds one `httpx.AsyncClient` for every JWKS URL of a process (connections
to an identity provider are reused between refreshes). A fetch

- accepts `http` and `https` URLs only (a `file:` or `ftp:` URL is refused unread);
- follows no redirect: a 3xx answer is an error naming where it pointed, since a key set must
  come from the URL the policies name;
- takes at most `timeout` seconds in all (connect, TLS, headers and every byte of the body):
  httpx's own timeouts bound each operation, so a server trickling a byte a second would
  otherwise hold a fetch for as long as it likes;
- reads at most `MAX_JWKS_BYTES` (1 MiB) of body, asks for no content encoding and refuses
  one (a compressed body could inflate far past the cap), and
- answers 200 only: any other status is an error.

Every failure is a `JwksFetchError` whose message says why; it never contains the body, nor
text the server chose verbatim: a status is named with its standard reason phrase (RFC 9110
section 15), not the server's, and an HTTP library error's text is escaped and cut short, since
these messages reach logs, `GetStatus` and `pdp status` (a hostile server's reason phrase may
hold terminal escapes and run to kilobytes).
Certificates are checked against the system's trust store (as `urllib` did); proxies come from
the usual environment variables (`HTTPS_PROXY`, `NO_PROXY`, ...).
"""

from __future__ import annotations

import asyncio
import http
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from policy_engine.errors import PolicyEngineError

if TYPE_CHECKING:
    import httpx

MAX_JWKS_BYTES = 1024 * 1024
MAX_ERROR_CHARS = 200  # of an HTTP library's error text quoted in a JwksFetchError
ALLOWED_SCHEMES = ("http", "https")
_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}


class JwksFetchError(PolicyEngineError):
    """A JWKS document could not be fetched; the message says why (never the body)."""


def scheme_problem(url: str) -> str | None:
    """Why `url` is not fetched (not http or https, no host), or None when it may be."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"only http and https URLs are fetched, not {parts.scheme or 'a relative URL'!r}"
    if not parts.hostname:
        return "the URL names no host"
    return None


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def _printable(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` (which may quote what a server sent) with every non-printable character
    escaped as repr escapes it, cut to `limit` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status_line(status: int) -> str:
    """`HTTP 404 Not Found`: the status with its standard reason phrase (RFC 9110 section 15;
    none for a code it does not define), never the phrase the server sent."""
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


class JwksFetcher:
    """Fetches JWKS documents with one shared `httpx.AsyncClient` (see the module docstring).

    `open()` imports httpx and builds the client (~50 ms and a TLS context: call it off the
    event loop; `fetch` opens it itself when nobody did). `fetch` runs on an event loop;
    `aclose()` closes the client there, ending open connections.
    """

    def __init__(self, max_bytes: int = MAX_JWKS_BYTES) -> None:
        self.max_bytes = max_bytes
        self._client: httpx.AsyncClient | None = None

    def open(self) -> None:
        """Build the client now (idempotent); no connection is made."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                follow_redirects=False,
                verify=ssl.create_default_context(),  # the system trust store, as urllib used
                headers=_HEADERS,
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def fetch(self, url: str, timeout: float) -> bytes:
        """The body of a 200 answer to GET `url`, within `timeout` seconds in all.

        Raises JwksFetchError (see the module docstring); CancelledError when cancelled.
        """
        problem = scheme_problem(url)
        if problem is not None:
            raise JwksFetchError(problem)
        self.open()
        assert self._client is not None
        import httpx

        try:
            async with asyncio.timeout(timeout):
                return await self._get(self._client, url, timeout)
        except TimeoutError:
            raise JwksFetchError(f"no complete answer within {timeout:g} s") from None
        except httpx.HTTPError as exc:  # connection refused or reset, TLS, protocol errors
            detail = _printable(str(exc)) or "no detail"
            raise JwksFetchError(f"{type(exc).__name__}: {detail}") from None

    async def _get(self, client: httpx.AsyncClient, url: str, timeout: float) -> bytes:
        async with client.stream("GET", url, timeout=timeout) as response:
            status = response.status_code
            if response.is_redirect:
                target = response.headers.get("location", "")
                raise JwksFetchError(
                    f"HTTP {status} redirect to {_shown(target)}: redirects are not followed"
                )
            if status != 200:
                raise JwksFetchError(_status_line(status))
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise JwksFetchError(f"content encoding {_shown(encoding)} is not accepted")
            limit = self.max_bytes
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise JwksFetchError(f"document larger than {_size(limit)}")
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > limit:
                    raise JwksFetchError(f"document larger than {_size(limit)}")
            return bytes(body)


def _size(limit: int) -> str:
    return "1 MiB" if limit == MAX_JWKS_BYTES else f"{limit} bytes"
