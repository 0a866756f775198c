"""What a hostile key server says reaches logs, `GetStatus` and `pdp status` only escaped and
bounded: its own reason phrase is replaced by the standard one, an HTTP library error quoting
its bytes is escaped and cut short, a skipped key's `kid` is cut short, and thousands of
skipped keys are logged as ten and a count. Real HTTP servers
on 127.0.0.1 (one speaking broken HTTP on a raw socket), real `RemoteKeySets`."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator

import pytest

from policy_engine.auth.keys import RemoteKeySets, parse_jwks
from policy_engine.lifecycle import deadline_in
from tests.auth.local_http import QuietHandler, serve
from tests.auth.material import jwks, rsa_key
from tests.auth.test_discovery import OAUTH, TENANT, Site, discovered, jwks_detail

KEY = rsa_key()
# C1 CSI and ESC: terminal escapes; the phrase runs to 12 kB (a status line may be 64 kB).
HOSTILE = "\x9b31m\x1b[2J" + "A" * 12_000


UNUSABLE = [{"kty": "x", "kid": f"junk-{n}"} for n in range(500)]


class HostilePhrase(QuietHandler):
    """Answers 500 with a hostile reason phrase, or (at /jwks) a JWKS whose only key is
    unusable and has a 100 kB `kid` with escapes in it."""

    def do_GET(self) -> None:
        if self.path == "/flood":
            body = json.dumps({"keys": [*json.loads(jwks(KEY))["keys"], *UNUSABLE]}).encode()
            self.head(200, {"Content-Length": str(len(body))})
            self.wfile.write(body)
            return
        if self.path == "/jwks":
            body = json.dumps({"keys": [{"kty": "bogus", "kid": HOSTILE * 8}]}).encode()
            self.head(200, {"Content-Length": str(len(body))})
            self.wfile.write(body)
            return
        self.send_response(500, HOSTILE)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def base_url() -> Iterator[str]:
    server, base = serve(HostilePhrase)
    yield base
    server.shutdown()
    server.server_close()


@pytest.fixture
def broken_http() -> Iterator[str]:
    """A raw socket answering every request with an illegal 12 kB status line."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"XTTP/1.1 200 " + HOSTILE.encode("latin-1") + b"\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/keys"
    listener.close()


def _error_of(url: str) -> tuple[str, str]:
    """(last_error, the jwks status detail) after one refresh from `url`."""
    key_sets = RemoteKeySets(timeout=2.0)
    try:
        keys = key_sets.get(url)
        keys.refresh_now()
        return keys.last_error, key_sets.status().detail
    finally:
        assert key_sets.stop(deadline_in(5))


def _assert_tame(text: str, limit: int) -> None:
    assert text.isprintable(), repr(text[:200])
    assert len(text) <= limit, len(text)


def test_a_hostile_reason_phrase_becomes_the_standard_one(base_url: str) -> None:
    error, detail = _error_of(base_url + "/keys")
    assert error == "JwksFetchError: HTTP 500 Internal Server Error"
    _assert_tame(detail, 300)


def test_an_http_error_quoting_the_server_is_escaped_and_short(broken_http: str) -> None:
    error, detail = _error_of(broken_http)
    assert error.startswith("JwksFetchError: RemoteProtocolError: ")
    _assert_tame(error, 300)
    _assert_tame(detail, 400)


def test_a_skipped_keys_kid_is_cut_short(base_url: str) -> None:
    error, detail = _error_of(base_url + "/jwks")
    assert "no usable signature key" in error and "unsupported kty" in error
    _assert_tame(error, 400)
    _assert_tame(detail, 500)


@pytest.mark.parametrize("tail", ["\x1b[2J\x9b31m", "A" * 100_000], ids=["escapes", "100 kB"])
def test_a_metadata_jwks_uri_with_escapes_or_too_long_is_refused(tail: str) -> None:
    """Kept, logged and shown in status, a jwks_uri must be printable and at most 2,048
    characters: this one names keys that are there, and is refused all the same."""
    site = Site()
    site.publish(OAUTH + TENANT, "/keys")
    metadata = json.loads(site.answers[OAUTH + TENANT])
    site.answers[OAUTH + TENANT] = json.dumps(
        {**metadata, "jwks_uri": site.base + "/k" + tail}
    ).encode()
    key_sets = RemoteKeySets(timeout=1.0)
    try:
        keys = discovered(key_sets, site.issuer, "oauth")
        assert not keys.available and keys.url == ""
        assert "is not a printable URL of at most 2048 characters" in keys.last_error
        _assert_tame(keys.last_error, 600)
        _assert_tame(jwks_detail(key_sets)[1], 900)
    finally:
        assert key_sets.stop(deadline_in(5))
        site.close()


def test_thousands_of_skipped_keys_are_logged_as_ten_and_a_count(
    base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """From a URL (logged on the event loop at each change) and from a file alike."""
    caplog.set_level(logging.WARNING, logger="policy_engine.auth.keys")
    error, _ = _error_of(base_url + "/flood")
    assert error == ""  # the one good key serves
    document = json.dumps({"keys": [*json.loads(jwks(KEY))["keys"], *UNUSABLE]})
    assert len(parse_jwks(document, source="jwks.json").skipped) == 500
    for source in (base_url + "/flood", "jwks.json"):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(source)]
        assert len(lines) == 11, (source, len(lines))
        first = "key 1 (kid 'junk-0'): unsupported kty 'x' (RFC 7518 section 6.1); skipped"
        assert lines[0] == f"{source}: {first}"
        assert lines[-1] == f"{source}: 490 more keys skipped"
