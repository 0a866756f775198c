"""Issuer discovery: an organization that names only its `tokens.issuer` gets its keys from the
`jwks_uri` of its metadata (RFC 8414 section 3, then OpenID Connect Discovery 1.0 section 4),
whose `issuer` must be the configured one exactly.

Real parts only: an identity provider on a real socket whose every path answers as the test
sets (`Site`), real policy folders, real gRPC servers on ephemeral ports. Hostile or broken
metadata leaves the organization without keys (its tokens denied, never allowed), says why in
the `jwks` component's status, and holds up no load and no other organization.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.auth.discovery import issuer_problem, metadata_urls
from policy_engine.auth.keys import RemoteKeySet, RemoteKeySets
from policy_engine.config import Settings
from policy_engine.lifecycle import State, deadline_in
from policy_engine.policy import CompiledPolicySet, PolicyLoadError, load_policy_set
from policy_engine.server.app import start_server
from policy_engine.store import DirectoryBackend
from tests.auth.local_http import QuietHandler, serve
from tests.auth.material import AUDIENCE, SigningKey, ec_key, jwks, rsa_key
from tests.cache.support import tuple_request
from tests.cache.test_key_sets import codes, policy_dir
from tests.store.support import wait_for

KEY, ROTATED, STRANGER = rsa_key("current"), ec_key("rotated"), rsa_key("stranger")
HOLD_SECONDS = 60.0  # how long a silent or trickling answer holds: far past every bound here
OAUTH = "/.well-known/oauth-authorization-server"
OPENID = "/.well-known/openid-configuration"
TENANT = "/tenant"  # the issuer's path: RFC 8414 puts the well-known segment before it
AUTHORIZATION_REQUIRED = "kontext_authorization_required"

Answer = bytes | int | str
"""What `Site` answers on a path: a body (200), a status code with no body, or one of
"redirect" (302 elsewhere), "big" (2 MiB, declared), "silent" (never answers) and "trickle"
(the headers, then a byte every 0.2 s)."""


class Site:
    """An identity provider on 127.0.0.1: `answers` maps each path to its `Answer` (a path
    not in it is a 404); `hits` counts the requests per path; `holding` the requests held now
    (silent or trickle)."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.hits: Counter[str] = Counter()
        self.holding = 0
        self.released = threading.Event()
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                owner.hits[self.path] += 1
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # cut off
                    self._answer(owner.answers.get(self.path, 404))

            def _answer(self, answer: Answer) -> None:
                if answer in ("silent", "trickle"):
                    owner.holding += 1
                    try:
                        self._hold(answer == "trickle")
                    finally:
                        owner.holding -= 1
                elif answer == "redirect":
                    self.head(302, {"Location": "/elsewhere", "Content-Length": "0"})
                elif isinstance(answer, int):
                    self.head(answer, {"Content-Length": "0"})
                else:
                    body = b" " * (2 * 1024 * 1024) if answer == "big" else answer
                    assert isinstance(body, bytes)
                    self.head(200, {"Content-Length": str(len(body))})
                    self.wfile.write(body)

            def _hold(self, trickle: bool) -> None:
                if trickle:
                    self.head(200, {"Content-Length": "100000"})
                until = time.monotonic() + HOLD_SECONDS
                while not owner.released.wait(0.2) and time.monotonic() < until:
                    if trickle:
                        self.wfile.write(b" ")
                        self.wfile.flush()

        self.server, self.base = serve(Handler)
        self.issuer = self.base + TENANT

    def publish(
        self, where: str = OAUTH + TENANT, keys: str = "/keys", *signing: SigningKey, **doc: Any
    ) -> None:
        """Metadata for `issuer` at `where`, naming `keys` (on this site) as its jwks_uri, and
        that JWKS (`signing`, default KEY); `doc` replaces or adds members."""
        metadata = {"issuer": self.issuer, "jwks_uri": self.base + keys, **doc}
        self.answers[where] = json.dumps(metadata).encode()
        self.answers[keys] = jwks(*(signing or (KEY,))).encode()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    server = Site()
    yield server
    server.close()


@pytest.fixture
def key_sets() -> Iterator[RemoteKeySets]:
    """The "jwks" component as a server runs it (fetches cut off after 1 s); stopped after."""
    component = RemoteKeySets(timeout=1.0)
    component.start()
    yield component
    assert component.stop(deadline_in(5))


def discovered(key_sets: RemoteKeySets, issuer: str, mode: str = "auto") -> RemoteKeySet:
    """The issuer's key set once its first discovery (and key fetch) has ended."""
    keys = key_sets.discover(issuer, mode)
    key_sets.wait_for_fetches(time.monotonic() + 15)
    assert keys.refresh_count >= 1
    return keys


def verifies(keys: RemoteKeySet, key: SigningKey) -> bool:
    return bool(keys.keys_for(key.kid, key.algorithm))


def jwks_detail(key_sets: RemoteKeySets) -> tuple[State, str]:
    status = key_sets.status()
    assert status.ready  # a failing issuer denies its own tokens; it never stops the server
    return status.state, status.detail


# --- where the metadata is looked for -------------------------------------------------------


def test_the_well_known_urls_follow_rfc_8414_then_openid_connect() -> None:
    assert metadata_urls("https://idp.example", "auto") == (
        "https://idp.example/.well-known/oauth-authorization-server",
        "https://idp.example/.well-known/openid-configuration",
    )
    # RFC 8414 section 3: the segment goes between the host and the path, whose terminating
    # '/' is removed; OpenID Connect appends to the issuer, its terminating '/' removed.
    assert metadata_urls("https://idp.example:8443/t/acme/", "auto") == (
        "https://idp.example:8443/.well-known/oauth-authorization-server/t/acme",
        "https://idp.example:8443/t/acme/.well-known/openid-configuration",
    )
    assert metadata_urls("https://idp.example/", "oauth") == (
        "https://idp.example/.well-known/oauth-authorization-server",
    )
    assert metadata_urls("http://idp.example/a", "openid") == (
        "http://idp.example/a/.well-known/openid-configuration",
    )


@pytest.mark.parametrize(
    ("issuer", "problem"),
    [
        ("acme-idp", "only http and https URLs are fetched"),
        ("file:///etc/issuer", "not 'file'"),
        ("https:///no-host", "names no host"),
        ("https://idp.example/?tenant=acme", "no query or fragment"),
        ("https://idp.example/#acme", "no query or fragment"),
    ],
)
def test_an_issuer_that_cannot_be_discovered_is_named(issuer: str, problem: str) -> None:
    found = issuer_problem(issuer)
    assert found is not None and problem in found
    assert issuer_problem("https://idp.example/tenant") is None


# --- discovery through a real identity provider ----------------------------------------------


def test_rfc_8414_metadata_leads_to_the_keys(site: Site, key_sets: RemoteKeySets) -> None:
    site.publish()
    keys = discovered(key_sets, site.issuer)
    assert keys.available and verifies(keys, KEY) and not verifies(keys, STRANGER)
    assert keys.url == site.base + "/keys"
    assert site.hits[OPENID + TENANT] == 0 and site.hits[TENANT + OPENID] == 0
    state, detail = jwks_detail(key_sets)
    assert state is State.RUNNING
    assert (
        f"issuer {site.issuer} (auto discovery, jwks_uri {site.base}/keys from "
        f"{site.base}{OAUTH}{TENANT}): ok, 1 keys" in detail
    )


def test_a_404_at_the_rfc_8414_url_falls_back_to_openid_configuration(
    site: Site, key_sets: RemoteKeySets
) -> None:
    site.publish(TENANT + OPENID)
    keys = discovered(key_sets, site.issuer)
    assert keys.available and verifies(keys, KEY)
    assert site.hits[OAUTH + TENANT] == 1 and site.hits[TENANT + OPENID] == 1
    assert f"from {site.base}{TENANT}{OPENID}): ok" in jwks_detail(key_sets)[1]


@pytest.mark.parametrize(
    ("mode", "asked"), [("oauth", OAUTH + TENANT), ("openid", TENANT + OPENID)]
)
def test_a_forced_mode_asks_only_its_own_url(
    site: Site, key_sets: RemoteKeySets, mode: str, asked: str
) -> None:
    site.publish(OAUTH + TENANT)
    site.publish(TENANT + OPENID)
    keys = discovered(key_sets, site.issuer, mode)
    assert keys.available
    assert {path for path in site.hits if path.startswith(("/.well-known", TENANT))} == {asked}


def _bad_metadata(site: Site, **doc: Any) -> bytes:
    return json.dumps({"issuer": site.issuer, "jwks_uri": site.base + "/keys", **doc}).encode()


HOSTILE: dict[str, tuple[Any, str]] = {
    # name: (the answer, or a function of the site giving it; what the status must say)
    "not JSON": (b"<html>502 Bad Gateway</html>", "the metadata is not JSON"),
    "not UTF-8": (b"\xff\xfe\xfa", "the metadata is not JSON"),
    "nested too deeply": (b"[" * 100_000, "the metadata is not JSON"),
    "an array": (b'["issuer"]', "the metadata is a JSON list, not an object"),
    "a string": (b'"https://idp"', "the metadata is a JSON str, not an object"),
    "over 1 MiB": ("big", "document larger than 1 MiB"),
    "a redirect": ("redirect", "HTTP 302 redirect to '/elsewhere': redirects are not followed"),
    "a server error": (500, "HTTP 500"),
    "trickling": ("trickle", "no complete answer within 1 s"),
    "never answering": ("silent", "no complete answer within 1 s"),
    "no issuer": (lambda s: _bad_metadata(s, issuer=None), "the metadata names no issuer"),
    "another issuer": (
        lambda s: _bad_metadata(s, issuer="https://evil.example"),
        "issuer 'https://evil.example' is not the configured issuer",
    ),
    "a trailing slash": (
        lambda s: _bad_metadata(s, issuer=s.issuer + "/"),
        "is not the configured issuer",
    ),
    "another case": (
        lambda s: _bad_metadata(s, issuer=s.base + TENANT.upper()),
        "is not the configured issuer",
    ),
    "the issuer twice": (
        lambda s: (
            b'{"issuer": "https://evil.example", "issuer": "%s", "jwks_uri": "%s/keys"}'
            % (s.issuer.encode(), s.base.encode())
        ),
        "the key 'issuer' appears twice in one object",
    ),
    "no jwks_uri": (lambda s: _bad_metadata(s, jwks_uri=None), "the metadata has no jwks_uri"),
    "jwks_uri a number": (
        lambda s: _bad_metadata(s, jwks_uri=443),
        "the metadata's jwks_uri is a int, not a URL",
    ),
    "jwks_uri file:": (
        lambda s: _bad_metadata(s, jwks_uri="file:///etc/passwd"),
        "jwks_uri 'file:///etc/passwd': only http and https URLs are fetched, not 'file'",
    ),
    "jwks_uri javascript:": (
        lambda s: _bad_metadata(s, jwks_uri="javascript:alert(1)"),
        "only http and https URLs are fetched, not 'javascript'",
    ),
    "jwks_uri with no host": (
        lambda s: _bad_metadata(s, jwks_uri="https:///keys"),
        "the URL names no host",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_metadata_leaves_the_issuer_without_keys_and_says_why(
    site: Site, key_sets: RemoteKeySets, case: str
) -> None:
    answer, error = HOSTILE[case]
    answer = answer(site) if callable(answer) else answer
    site.answers.update({OAUTH + TENANT: answer, TENANT + OPENID: answer})
    site.answers["/keys"] = jwks(KEY).encode()  # there, but never named by a valid document
    keys = discovered(key_sets, site.issuer)
    assert not keys.available and not verifies(keys, KEY)
    assert site.hits["/keys"] == 0  # no key is fetched on a refused document's word
    assert keys.url == "" and "DiscoveryError: no valid metadata" in keys.last_error
    for url in metadata_urls(site.issuer, "auto"):  # both tried, each with its error
        assert f"{url}: " in keys.last_error
    state, detail = jwks_detail(key_sets)
    assert state is State.DEGRADED and error in detail
    assert f"issuer {site.issuer} (auto discovery, no jwks_uri yet): failing (no keys yet)" in (
        detail
    )


def test_metadata_that_the_keys_do_not_follow_is_a_keys_error(
    site: Site, key_sets: RemoteKeySets
) -> None:
    site.publish()
    site.answers["/keys"] = b'{"keys": []}'
    keys = discovered(key_sets, site.issuer)
    assert not keys.available and keys.url == site.base + "/keys"
    state, detail = jwks_detail(key_sets)
    assert state is State.DEGRADED and "no usable signature key" in detail
    assert f"jwks_uri {site.base}/keys from {site.base}{OAUTH}{TENANT}): failing" in detail


# --- caching and refreshing -------------------------------------------------------------------


def test_the_metadata_is_kept_while_the_keys_refresh(site: Site, key_sets: RemoteKeySets) -> None:
    site.publish()
    keys = discovered(key_sets, site.issuer)
    for _ in range(3):
        keys.refresh_now()
    # The keys were fetched four times; the metadata once (it is fresh for max_age, 5 min).
    assert (site.hits[OAUTH + TENANT], site.hits["/keys"]) == (1, 4)


def test_a_failed_metadata_refresh_keeps_the_last_good_metadata_and_keys(site: Site) -> None:
    key_sets = RemoteKeySets(timeout=1.0, metadata_max_age=0.0)  # every refresh rereads it
    site.publish()
    keys = discovered(key_sets, site.issuer)
    before = keys.fingerprint
    for broken in (b"{", 404, json.dumps({"issuer": "https://evil.example"}).encode()):
        site.answers[OAUTH + TENANT] = broken
        keys.refresh_now()
        assert keys.available and keys.fingerprint == before and verifies(keys, KEY)
        assert keys.url == site.base + "/keys"  # the last good jwks_uri still serves
        state, detail = jwks_detail(key_sets)
        assert state is State.DEGRADED and "failing (keeping 1 keys" in detail
        assert "no valid metadata" in detail
    assert "is not the configured issuer" in jwks_detail(key_sets)[1]
    site.publish()  # the IdP recovers
    keys.refresh_now()
    assert jwks_detail(key_sets)[0] is State.RUNNING
    assert key_sets.stop(deadline_in(5))


def test_a_new_jwks_uri_in_refreshed_metadata_brings_its_keys(site: Site) -> None:
    key_sets = RemoteKeySets(timeout=1.0, metadata_max_age=0.0)
    site.publish()
    keys = discovered(key_sets, site.issuer)
    before = keys.fingerprint
    site.publish(OAUTH + TENANT, "/rotated-keys", ROTATED)  # the IdP moved its JWKS
    keys.refresh_now()
    assert keys.url == site.base + "/rotated-keys"
    assert verifies(keys, ROTATED) and not verifies(keys, KEY) and keys.fingerprint != before
    assert f"jwks_uri {site.base}/rotated-keys" in jwks_detail(key_sets)[1]
    assert key_sets.stop(deadline_in(5))


def test_an_unknown_kid_refreshes_the_keys_of_the_discovered_uri(
    site: Site,
) -> None:
    key_sets = RemoteKeySets(timeout=1.0, min_refresh_interval=0.0)
    site.publish()
    keys = discovered(key_sets, site.issuer)
    site.answers["/keys"] = jwks(KEY, ROTATED).encode()  # a rotation at the IdP
    refresh = keys.pending_refresh(ROTATED.kid, ROTATED.algorithm)
    assert refresh is not None
    refresh.result(10)
    assert verifies(keys, ROTATED)
    assert site.hits[OAUTH + TENANT] == 1  # the kept metadata named where to look
    assert key_sets.stop(deadline_in(5))


# --- the policies -----------------------------------------------------------------------------


def discovery_dir(root: Path, **tokens: Any) -> Path:
    """`acme` verifying tokens as `tokens` says (only its issuer, say), `globex` without tokens;
    both open to everyone."""
    root = policy_dir(root, "https://unused.example/jwks")
    path = root / "acme" / "organization.yaml"
    config = yaml.safe_load(path.read_text())
    config["tokens"] = {"audience": AUDIENCE, **tokens}
    path.write_text(yaml.safe_dump(config))
    return root


def acme_keys(policies: CompiledPolicySet) -> RemoteKeySet:
    keys = policies.organizations["acme"].tokens.keys
    assert isinstance(keys, RemoteKeySet) and keys.discovery is not None
    return keys


def test_an_issuer_alone_loads_and_its_keys_are_discovered(site: Site, tmp_path: Path) -> None:
    site.publish(TENANT + OPENID)
    root = discovery_dir(tmp_path / "policies", issuer=site.issuer, discovery="openid")
    backend = DirectoryBackend(root)
    policies = backend.load()
    keys = acme_keys(policies)
    assert keys.discovery is not None and keys.discovery.mode == "openid"
    assert policies.refreshing_keys["acme"][0] is keys  # a call's unknown kid may wait for it
    assert policies.organizations["acme"].tokens.issuer == site.issuer
    wait_for(lambda: keys.available, timeout=15, what="the discovered keys")
    assert verifies(keys, KEY) and site.hits[OAUTH + TENANT] == 0
    assert backend.load().organizations["acme"].tokens.keys is keys  # kept across reloads
    # `pdp validate` and `pdp eval` load once, their discovery waited for.
    once = acme_keys(load_policy_set(root))
    assert once.available and verifies(once, KEY)


def test_a_load_never_waits_for_a_hanging_issuer(site: Site, tmp_path: Path) -> None:
    site.answers[OAUTH + TENANT] = "silent"
    key_sets = RemoteKeySets(timeout=HOLD_SECONDS)  # the fetch outlasts the test
    try:
        policies = DirectoryBackend(
            discovery_dir(tmp_path / "policies", issuer=site.issuer), remote_keys=key_sets
        ).load()
        keys = acme_keys(policies)
        # The load is back while the IdP still holds the metadata request it started.
        wait_for(lambda: site.holding == 1, timeout=10, what="the held metadata request")
        assert keys._pending is not None and not keys.available
        assert f"issuer {site.issuer} (auto discovery, no jwks_uri yet): fetching" in (
            key_sets.status().detail
        )
    finally:
        assert key_sets.stop(deadline_in(5))  # cancels the held request


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        ({"issuer": "acme-idp"}, "issuer 'acme-idp': its keys are discovered"),
        (
            {"issuer": "https://idp.example/?tenant=acme"},
            "so it must be an http or https URL: an issuer has no query or fragment",
        ),
        ({"issuer": "file:///etc/idp"}, "only http and https URLs are fetched, not 'file'"),
        ({"issuer": " https://idp.example"}, "an issuer has no surrounding spaces"),
        ({}, "tokens need 'jwks_file', 'jwks_url', or an 'issuer' whose keys are discovered"),
        (
            {"issuer": "https://idp.example", "discovery": "webfinger"},
            "discovery 'webfinger' is not one of auto, oauth, openid",
        ),
        (
            {"issuer": "https://idp.example", "discovery": True},
            "discovery true is not one of auto, oauth, openid",
        ),
        (
            {"jwks_url": "https://idp.example/jwks", "discovery": "openid"},
            "'discovery' applies only to tokens naming no 'jwks_file' or 'jwks_url'",
        ),
        (
            {"jwks_url": "https://idp.example/jwks", "jwks_file": "jwks.json"},
            "tokens name one of 'jwks_file' or 'jwks_url', not both",
        ),
    ],
)
def test_tokens_that_cannot_be_verified_are_a_load_error(
    tmp_path: Path, tokens: dict[str, Any], error: str
) -> None:
    with pytest.raises(PolicyLoadError) as raised:
        load_policy_set(discovery_dir(tmp_path / "policies", **tokens))
    assert "organization.yaml" in str(raised.value) and error in str(raised.value)


# --- through a real server --------------------------------------------------------------------


def _token(key: SigningKey, issuer: str) -> str:
    now = int(time.time())
    return key.sign(
        sub="alice",
        iss=issuer,
        aud=AUDIENCE,
        iat=now,
        exp=now + 600,
        client_id="pr-reviewer",  # the application that presents it
    )


def _check(stub: Any, token: str, organization: str = "acme") -> pdp_pb2.CheckResponse:
    msg = tuple_request()
    msg.organization = organization
    msg.subject.access_token = token
    return stub.Check(msg, timeout=10)  # type: ignore[no-any-return]


@contextlib.contextmanager
def pdp_server(root: Path) -> Iterator[tuple[grpc.Channel, Any]]:
    """A real server (`pdp serve`'s) for the policies at `root`: a channel to it and a stub."""
    running = start_server(
        Settings(address="127.0.0.1:0", policy_dir=root, threads=2, metrics_address="")
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel, pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
    finally:
        running.stop(grace=None)


def _jwks_component(channel: grpc.Channel) -> pdp_pb2.ComponentStatus:
    stub = pdp_pb2_grpc.PolicyStatusServiceStub(channel)
    status = stub.GetStatus(pdp_pb2.GetStatusRequest(), timeout=10)
    return next(c for c in status.components if c.name == "jwks")


@pytest.mark.parametrize("issuer_matches", [True, False], ids=["issuer matches", "mismatch"])
def test_a_server_verifies_tokens_with_discovered_keys_and_only_then(
    site: Site, tmp_path: Path, issuer_matches: bool
) -> None:
    site.publish(TENANT + OPENID)  # an OpenID provider: RFC 8414's URL answers 404
    if not issuer_matches:  # the provider's document claims another issuer
        site.answers[TENANT + OPENID] = _bad_metadata(site, issuer=site.base)
    root = discovery_dir(tmp_path / "policies", issuer=site.issuer)
    with pdp_server(root) as (channel, stub):
        wait_for(
            lambda: "fetching" not in _jwks_component(channel).detail,
            timeout=15,
            what="the first discovery",
        )
        component = _jwks_component(channel)
        assert f"issuer {site.issuer}" in component.detail and component.ready
        good = _check(stub, _token(KEY, site.issuer))
        forged = _check(stub, _token(STRANGER, site.issuer))
        assert forged.effect == pdp_pb2.EFFECT_DENY
        assert codes(forged) == [AUTHORIZATION_REQUIRED]
        # Another organization is answered whatever acme's identity provider says.
        globex = _check(stub, "", "globex")
        assert globex.effect == pdp_pb2.EFFECT_ALLOW
        if issuer_matches:
            assert component.state == "running"
            assert f"jwks_uri {site.base}/keys from {site.issuer}{OPENID}" in component.detail
            assert (good.effect, list(good.reasons)) == (pdp_pb2.EFFECT_ALLOW, [])
            assert "unknown key" in forged.reasons[0].message
        else:
            assert component.state == "degraded"
            assert f"issuer '{site.base}' is not the configured issuer" in component.detail
            assert good.effect == pdp_pb2.EFFECT_DENY
            assert codes(good) == [AUTHORIZATION_REQUIRED]
            assert "signing keys are not available" in good.reasons[0].message
            assert site.hits["/keys"] == 0


def test_a_hanging_issuer_denies_only_its_own_tokens_through_grpc(
    site: Site, tmp_path: Path
) -> None:
    site.answers[OAUTH + TENANT] = "trickle"
    root = discovery_dir(tmp_path / "policies", issuer=site.issuer)
    with pdp_server(root) as (channel, stub):
        wait_for(lambda: site.holding == 1, timeout=15, what="the held metadata request")
        # acme's call waits for the discovery in flight at most its wait (1 s), then is
        # denied.
        answer = _check(stub, _token(KEY, site.issuer))
        assert answer.effect == pdp_pb2.EFFECT_DENY
        assert codes(answer) == [AUTHORIZATION_REQUIRED]
        assert "signing keys are not available" in answer.reasons[0].message
        assert _check(stub, "", "globex").effect == pdp_pb2.EFFECT_ALLOW
        assert f"issuer {site.issuer} (auto discovery, no jwks_uri yet)" in (
            _jwks_component(channel).detail
        )
