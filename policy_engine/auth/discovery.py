"""Finding an issuer's signing keys from its metadata (RFC 8414, OpenID Connect Discovery 1.0).

An organization whose `tokens:` name only an `issuer` (no `jwks_file`, no `jwks_url`) gets its
keys from the `jwks_uri` its authorization server publishes. The metadata is looked for at

- `oauth` (RFC 8414 section 3): `{scheme}://{host}/.well-known/oauth-authorization-server
  {path}`, the well-known segment inserted between the host and the issuer's path (a
  terminating `/` of the path removed first), then
- `openid` (OpenID Connect Discovery 1.0 section 4): `{issuer, a terminating / removed}
  /.well-known/openid-configuration`.

`auto` tries them in that order and takes the first that answers a valid document; `oauth`
and `openid` try only theirs. A document is valid when it is a JSON object (no member named
twice: two `issuer` members would let two parsers read two issuers), its `issuer` is the
configured issuer exactly (RFC 8414 section 3.3, OpenID Connect Discovery section 4.3: no case
folding, no trailing-slash leniency, else one issuer's metadata could name keys for another),
and its `jwks_uri` is an http or https URL with a host, printable and at most 2,048
characters (it reaches logs and status lines).

The `jwks_uri` must also be on the issuer's own origin: the same scheme, host and port
(RFC 6454 section 4; the scheme's default port when none is written), and no user
information, unless the organization lists its host in `tokens.jwks_hosts` (`host` or
`host:port`; the scheme must still be the issuer's). Otherwise a hostile or compromised
issuer's metadata could make the PDP fetch any URL it can reach, e.g. a cloud metadata
service (169.254.169.254) or a database on localhost (server-side request forgery). The URL
is read with httpx's parser, the one that connects, so no two parsers can disagree on the
host. Fetches go through the JWKS fetcher
(`policy_engine.auth.fetch`): no redirect followed, 5 s in all, at most 1 MiB.

`IssuerMetadata` keeps the last valid document's `jwks_uri` and fetches the metadata again when
it is older than `max_age` seconds; a fetch that fails keeps the last good `jwks_uri` (and so
the keys fetched from it) and records why in `last_error`. `RemoteKeySet` runs it at the start
of each of its refreshes, on the event loop: it never blocks a load or another organization.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from policy_engine.auth.fetch import MAX_JWKS_BYTES, JwksFetchError, scheme_problem
from policy_engine.errors import PolicyEngineError
from policy_engine.strict_json import unique_keys

log = logging.getLogger(__name__)

DISCOVERY_MODES = ("auto", "oauth", "openid")
OAUTH_WELL_KNOWN = "/.well-known/oauth-authorization-server"  # RFC 8414 section 3
OPENID_WELL_KNOWN = "/.well-known/openid-configuration"  # OpenID Connect Discovery section 4
# A metadata document's jwks_uri is kept, fetched, logged and shown in status lines: a longer
# one, or one with characters no URL holds unescaped (terminal escapes), is refused.
MAX_JWKS_URI_CHARS = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# 1 to 65535, no leading zero (as schemas/organization.schema.json spells it).
_PORT = r"[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]"
# A `tokens.jwks_hosts` entry: a DNS name or IPv4 address, or an IPv6 address in brackets,
# and an optional port.
JWKS_HOST_PATTERN = re.compile(
    rf"^(?P<host>{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>{_PORT}))?$"
)
MAX_JWKS_HOSTS = 16


class DiscoveryError(PolicyEngineError):
    """No usable metadata; the message says why (never the document itself)."""


def _shown(value: Any, limit: int = 80) -> str:
    """A value from a hostile document, short enough for a status line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def issuer_problem(issuer: str) -> str | None:
    """Why `issuer` cannot be discovered, or None: it must be an http or https URL with a host
    and no query or fragment (RFC 8414 section 2; plain http is accepted as for `jwks_url`),
    with no spaces around it and no control characters (it is compared exactly), no user
    information and a port from 1 to 65535 when one is written (`_origin`)."""
    if issuer != issuer.strip() or not issuer.isprintable():
        return "an issuer has no surrounding spaces and no control characters"
    problem = scheme_problem(issuer)
    if problem is not None:
        return problem
    if _origin(issuer) is None:
        # Else its metadata is fetched with its credentials (and they show in every status
        # line), or from no port at all, and every jwks_uri is refused as if at fault.
        return (
            "an issuer is a URL httpx can connect to, without user information and with a "
            "port from 1 to 65535 if any"
        )
    parts = urlsplit(issuer)
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        return "an issuer has no query or fragment (RFC 8414 section 2)"
    return None


def jwks_host_problem(entry: str) -> str | None:
    """Why `entry` cannot be a `tokens.jwks_hosts` entry (`host` or `host:port`), or None."""
    if JWKS_HOST_PATTERN.fullmatch(entry) is None:
        return (
            f"{_shown(entry)} is not a host name or address with an optional port "
            "(e.g. keys.idp.example or keys.idp.example:8443, a port from 1 to 65535; no "
            "scheme or path)"
        )
    return None


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) as httpx, which connects, reads `url`: the host as it is looked
    up (an internationalized name in its ASCII, IDNA form, RFC 5890 section 2.3.2.1, as
    `tokens.jwks_hosts` entries are written), lowercased and without brackets, the scheme's
    default port when none is written; None when httpx cannot read it, its port is not
    from 1 to 65535 or it carries user information."""
    import httpx  # loaded already by the key sets (and the metadata fetch)

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return None
    if parsed.userinfo:
        return None
    scheme = parsed.scheme.lower()
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS.get(scheme, 0)
    if not 0 < port <= 65535:  # httpx reads 99999 and fails only when connecting
        return None
    # raw_host, not host: httpx decodes an IDNA host to Unicode, which no jwks_hosts entry
    # (ASCII by its pattern) could ever equal.
    try:
        host = parsed.raw_host.decode("ascii").lower()
    except UnicodeDecodeError:  # httpx encodes hosts to ASCII; never trust it blindly
        return None
    return scheme, host, port


def _allowed(host: str, port: int, scheme: str, entries: tuple[str, ...]) -> bool:
    for entry in entries:
        found = JWKS_HOST_PATTERN.fullmatch(entry)
        if found is None:
            continue
        named = found["host"].lower().removeprefix("[").removesuffix("]")
        wanted = int(found["port"]) if found["port"] else _DEFAULT_PORTS.get(scheme, 0)
        if named == host and wanted == port:
            return True
    return False


def origin_problem(jwks_uri: str, issuer: str, jwks_hosts: tuple[str, ...] = ()) -> str | None:
    """Why the PDP must not fetch `jwks_uri`, named by `issuer`'s metadata, or None: it must
    have the issuer's scheme, and its host and port must be the issuer's or one of
    `jwks_hosts` (see the module docstring)."""
    named, own = _origin(jwks_uri), _origin(issuer)
    if named is None or own is None:
        return "it is not a URL with a port from 1 to 65535 and without user information"
    scheme, host, port = named
    if scheme != own[0]:
        return f"its scheme is not the issuer's ({own[0]})"
    if (host, port) == own[1:] or _allowed(host, port, scheme, jwks_hosts):
        return None
    return (
        "its host is not the issuer's: a jwks_uri on another host is fetched only when "
        "tokens.jwks_hosts lists that host (server-side request forgery)"
    )


def metadata_urls(issuer: str, mode: str) -> tuple[str, ...]:
    """The metadata URLs tried for `issuer` (an URL `issuer_problem` accepts), in order:
    `mode` "oauth", "openid" or "auto" (both, RFC 8414's first)."""
    parts = urlsplit(issuer)
    # RFC 8414 section 3: "any terminating '/' MUST be removed before inserting" the segment.
    path = parts.path.removesuffix("/")
    oauth = urlunsplit((parts.scheme, parts.netloc, OAUTH_WELL_KNOWN + path, "", ""))
    openid = issuer.removesuffix("/") + OPENID_WELL_KNOWN  # OIDC Discovery section 4.1
    return {"oauth": (oauth,), "openid": (openid,)}.get(mode, (oauth, openid))


def parse_metadata(data: bytes, issuer: str, jwks_hosts: tuple[str, ...] = ()) -> str:
    """The `jwks_uri` of an authorization server metadata document (RFC 8414 section 3.2)
    whose `issuer` is exactly `issuer`, on the issuer's origin or a host of `jwks_hosts`
    (`origin_problem`). Raises DiscoveryError saying what is wrong, the jwks_uri quoted
    with its non-printable characters escaped and cut to 80 characters."""
    if len(data) > MAX_JWKS_BYTES:
        raise DiscoveryError("the metadata is larger than 1 MiB")
    try:
        document = json.loads(data, object_pairs_hook=unique_keys)
    except RecursionError:
        raise DiscoveryError("the metadata is not JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a member named twice
        raise DiscoveryError(f"the metadata is not JSON ({_shown(str(exc))})") from None
    if not isinstance(document, dict):
        raise DiscoveryError(f"the metadata is a JSON {type(document).__name__}, not an object")
    named = document.get("issuer")
    if not isinstance(named, str):
        raise DiscoveryError("the metadata names no issuer (RFC 8414 section 3.2)")
    if named != issuer:
        raise DiscoveryError(
            f"the metadata's issuer {_shown(named)} is not the configured issuer {issuer!r} "
            "(they must be identical: RFC 8414 section 3.3, OpenID Connect Discovery 4.3)"
        )
    jwks_uri = document.get("jwks_uri")
    if jwks_uri is None:
        raise DiscoveryError("the metadata has no jwks_uri")
    if not isinstance(jwks_uri, str):
        raise DiscoveryError(f"the metadata's jwks_uri is a {type(jwks_uri).__name__}, not a URL")
    if len(jwks_uri) > MAX_JWKS_URI_CHARS or not jwks_uri.isprintable():
        raise DiscoveryError(
            f"the metadata's jwks_uri {_shown(jwks_uri)} is not a printable URL of at most "
            f"{MAX_JWKS_URI_CHARS} characters"
        )
    problem = scheme_problem(jwks_uri)
    if problem is not None:
        raise DiscoveryError(f"the metadata's jwks_uri {_shown(jwks_uri)}: {problem}")
    problem = origin_problem(jwks_uri, issuer, jwks_hosts)
    if problem is not None:
        raise DiscoveryError(f"the metadata's jwks_uri {_shown(jwks_uri)} is refused: {problem}")
    return jwks_uri


Fetch = Callable[[str, float], Awaitable[bytes]]
"""GET a URL within a timeout (seconds), on an event loop: `JwksFetcher.fetch`."""


class IssuerMetadata:
    """An issuer's discovered `jwks_uri`, kept and fetched again when older than `max_age`.

    `jwks_uri` is None until a valid document arrived; `found_at` is the metadata URL that
    gave it; `last_error` says why the last fetch failed (every URL tried, each with its
    error), empty once one succeeds. Used by one `RemoteKeySet`, whose refreshes run one at a
    time, so it needs no lock.
    """

    def __init__(
        self,
        issuer: str,
        mode: str = "auto",
        max_age: float = 300.0,
        jwks_hosts: tuple[str, ...] = (),
    ) -> None:
        """`issuer`: an URL `issuer_problem` accepts; `mode`: one of `DISCOVERY_MODES`;
        `max_age`: seconds a valid document is used before it is fetched again;
        `jwks_hosts`: hosts besides the issuer's a `jwks_uri` may name (`origin_problem`)."""
        self.issuer = issuer
        self.mode = mode
        self.jwks_hosts = jwks_hosts
        self.max_age = max_age
        self.jwks_uri: str | None = None
        self.found_at = ""
        self.last_error = ""
        self._fetched_at = float("-inf")  # time.monotonic() of the last valid document

    async def resolve(self, fetch: Fetch, timeout: float) -> str:
        """The `jwks_uri` to fetch keys from: the kept one while it is younger than `max_age`,
        else the one a fresh document names (each URL fetched within `timeout` seconds). When
        every URL fails, the last good one, the failure kept in `last_error` (logged once per
        change); without one, DiscoveryError. CancelledError when cancelled."""
        if self.jwks_uri is not None and time.monotonic() - self._fetched_at < self.max_age:
            return self.jwks_uri
        problems: list[str] = []
        for url in metadata_urls(self.issuer, self.mode):
            try:
                data = await fetch(url, timeout)
                # Up to 1 MiB of JSON: parsed off the loop that answers every organization.
                jwks_uri = await asyncio.get_running_loop().run_in_executor(
                    None, parse_metadata, data, self.issuer, self.jwks_hosts
                )
            except (JwksFetchError, DiscoveryError) as exc:
                problems.append(f"{url}: {exc}")
                continue
            if self.last_error or (self.jwks_uri is not None and jwks_uri != self.jwks_uri):
                log.warning(
                    "issuer %s: metadata at %s names jwks_uri %s", self.issuer, url, jwks_uri
                )
            self.jwks_uri, self.found_at, self.last_error = jwks_uri, url, ""
            self._fetched_at = time.monotonic()
            return jwks_uri
        error = "no valid metadata: " + "; ".join(problems)
        if self.jwks_uri is None:  # the key set's own last_error records it
            raise DiscoveryError(error)
        if error != self.last_error:  # once per change, not every refresh
            log.warning("issuer %s: %s (keeping jwks_uri %s)", self.issuer, error, self.jwks_uri)
        self.last_error = error
        return self.jwks_uri
