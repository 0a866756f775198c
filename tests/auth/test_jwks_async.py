"""JWKS URLs fetched on the event loop: an identity provider that hangs, trickles, redirects or
serves garbage costs its own organization's tokens a deny, never another organization's
answers, a policy reload or a shutdown.

Real parts only: a JWKS endpoint on a real socket whose behaviour each test sets (`Idp`), real
gRPC servers on ephemeral ports, a real `pdp serve` process for SIGTERM.
"""

from __future__ import annotations

import asyncio
import gzip
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.auth.keys import RemoteKeySet, RemoteKeySets
from policy_engine.auth.pending import await_pending_keys, unverified_key
from policy_engine.auth.tokens import TokenRules, check_token
from policy_engine.cache import KeyBuilder
from policy_engine.config import ReloadSettings, Settings
from policy_engine.lifecycle import State, deadline_in
from policy_engine.policy import CompiledPolicySet, PolicyLoadError, load_policy_set
from policy_engine.server.app import start_server
from policy_engine.store import DirectoryBackend
from tests.auth.local_http import QuietHandler, serve
from tests.auth.material import AUDIENCE, ISSUER, claims, ec_key, jwks, rsa_key
from tests.cache.support import servicer_for, serving, settings, tuple_request
from tests.cache.test_key_sets import codes, policy_dir, with_token
from tests.policy_builder import allow_all, dump_yaml
from tests.server.harness import serve_process
from tests.store.support import wait_for

KEY, ROTATED = rsa_key("current"), ec_key("rotated")
HOLD_SECONDS = 60.0  # how long the tarpit holds a connection: far past every bound below
AUTHORIZATION_REQUIRED = "kontext_authorization_required"


class Idp:
    """A JWKS endpoint on 127.0.0.1 whose answer is `mode`:

    ok (the JWKS `document`), html (a 200 that is not JSON), big (2 MiB, declared), endless
    (over 1 MiB, no length declared), redirect (302 to another path), gzip (a compressed
    body), missing (404), silent (reads the request, never answers) or trickle (the headers,
    then one byte every 0.2 s). silent and trickle hold the connection for `HOLD_SECONDS` or
    until `close()`; `requests` counts requests, `dropped` connections the client closed while
    held.
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.document = jwks(KEY)
        self.requests = 0
        self.dropped = 0
        self.released = threading.Event()
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                try:
                    self._answer(owner.mode)
                except (BrokenPipeError, ConnectionResetError):
                    owner.dropped += 1

            def _answer(self, mode: str) -> None:
                if mode == "silent":
                    owner.released.wait(HOLD_SECONDS)
                    return
                if mode == "trickle":
                    self.head(200, {"Content-Length": "100000"})
                    until = time.monotonic() + HOLD_SECONDS
                    while not owner.released.is_set() and time.monotonic() < until:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.2)
                    return
                if mode == "redirect":
                    self.head(302, {"Location": "/elsewhere.json", "Content-Length": "0"})
                    return
                if mode == "missing":
                    self.head(404, {"Content-Length": "0"})
                    return
                if mode == "endless":
                    self.head(200, {})  # HTTP/1.0, no length: the body ends at close
                    for _ in range(48):
                        self.wfile.write(b" " * 32768)  # 1.5 MiB in all
                    return
                body = {
                    "ok": owner.document.encode(),
                    "html": b"<html>502 Bad Gateway</html>",
                    "big": b" " * (2 * 1024 * 1024),
                    "gzip": gzip.compress(owner.document.encode()),
                }[mode]
                extra = {"Content-Encoding": "gzip"} if mode == "gzip" else {}
                self.head(200, {"Content-Length": str(len(body)), **extra})
                self.wfile.write(body)

        self.server, base = serve(Handler)
        self.url = base + "/jwks.json"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp() -> Iterator[Idp]:
    server = Idp()
    yield server
    server.close()


@pytest.fixture
def key_sets() -> Iterator[RemoteKeySets]:
    """The "jwks" component as a server runs it; stopped (and checked) after the test."""
    component = RemoteKeySets()
    component.start()
    yield component
    assert component.stop(deadline_in(5))


def now() -> datetime:
    return datetime.now(UTC)


def acme_keys(policies: CompiledPolicySet) -> RemoteKeySet:
    keys = policies.organizations["acme"].tokens.keys
    assert isinstance(keys, RemoteKeySet)
    return keys


def load(root: Path, key_sets: RemoteKeySets, *, fetched: bool = True) -> CompiledPolicySet:
    """The policy set at `root`, loaded through `key_sets`; with `fetched`, once acme's key
    set has its keys."""
    policies = DirectoryBackend(root, remote_keys=key_sets).load()
    if fetched:
        keys = acme_keys(policies)
        wait_for(lambda: keys.available, timeout=10, what="the first JWKS fetch")
    return policies


def percentile(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return max(samples, default=0.0)
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


# --- fetch faults keep the old keys and show in status() -------------------------------------

FAULTS = [
    ("html", "not JSON"),
    ("big", "larger than 1 MiB"),
    ("endless", "larger than 1 MiB"),
    ("redirect", "redirects are not followed"),
    ("gzip", "content encoding 'gzip' is not accepted"),
    ("missing", "HTTP 404"),
    ("trickle", "no complete answer within 1 s"),
    ("silent", "no complete answer within 1 s"),
]


@pytest.mark.parametrize(("mode", "error"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_failing_refresh_keeps_the_keys_and_shows_in_status(
    idp: Idp, mode: str, error: str
) -> None:
    component = RemoteKeySets(timeout=1.0)
    remote = component.get(idp.url)  # the first fetch starts at once, in the background
    wait_for(lambda: remote.available, timeout=10, what="the first fetch")
    before = remote.fingerprint
    status = component.status()
    assert (status.name, status.state, status.ready) == ("jwks", State.RUNNING, True)
    assert f"{idp.url}: ok, 1 keys" in status.detail

    idp.mode = mode
    started = time.monotonic()
    remote.refresh_now()
    assert time.monotonic() - started < 5  # within the 1 s total timeout, whatever the IdP does
    assert error in remote.last_error
    assert remote.fingerprint == before  # the keys are kept: tokens still verify
    rules = TokenRules(keys=remote, issuer=ISSUER, audience=AUDIENCE)
    assert (
        check_token(KEY.sign(**claims()), now(), rules, "alice", application_id="app").problem
        is None
    )
    status = component.status()
    assert (status.state, status.ready) == (State.DEGRADED, True)
    assert f"{idp.url}: failing (keeping 1 keys" in status.detail and error in status.detail

    idp.mode = "ok"  # the IdP recovers: the next refresh clears the failure
    remote.refresh_now()
    assert not remote.last_error and component.status().state is State.RUNNING
    assert component.stop(deadline_in(5))


def test_a_url_that_is_not_http_is_refused_unread() -> None:
    component = RemoteKeySets()
    remote = component.get("file:///etc/passwd")
    wait_for(lambda: bool(remote.last_error), timeout=10, what="the refusal")
    assert "only http and https URLs are fetched, not 'file'" in remote.last_error
    assert not remote.available
    status = component.status()
    assert status.state is State.DEGRADED and "file:///etc/passwd: failing (no keys yet)" in (
        status.detail
    )
    assert component.stop(deadline_in(5))


def test_a_jwks_url_that_is_not_http_is_a_load_error(tmp_path: Path) -> None:
    root = policy_dir(tmp_path / "policies", "ftp://idp.example/jwks.json")
    with pytest.raises(PolicyLoadError) as error:
        load_policy_set(root)
    assert "jwks_url 'ftp://idp.example/jwks.json': only http and https" in str(error.value)


# --- a load never waits; keys that arrive later ------------------------------------------------


def test_a_load_takes_a_hanging_jwks_url_at_once_and_denies_its_tokens(
    tmp_path: Path, idp: Idp, key_sets: RemoteKeySets
) -> None:
    idp.mode = "silent"
    root = policy_dir(tmp_path / "policies", idp.url)
    started = time.monotonic()
    policies = load(root, key_sets, fetched=False)
    assert time.monotonic() - started < 5  # the IdP holds the fetch for a minute
    keys = acme_keys(policies)
    assert not keys.available and f"{idp.url}: fetching" in key_sets.status().detail

    # A token for an organization whose keys have not arrived is denied, never allowed, and
    # the verdict is not cacheable (changes_at is now).
    token = KEY.sign(**claims())
    verdict = check_token(
        token, now(), policies.organizations["acme"].tokens, "alice", application_id="app"
    )
    assert verdict.problem is not None and "keys are not available yet" in verdict.problem
    assert verdict.changes_at is not None and verdict.changes_at <= now()

    # The pre-step waits for the first fetch in flight, at most unknown_kid_wait (1 s).
    began = time.monotonic()
    waiting = asyncio.run(await_pending_keys([with_token(KEY)], policies, time.monotonic() + 30))
    assert waiting == 1 and 0.9 <= time.monotonic() - began < 5

    # The keys arrive: the cache key of a token request changes with the key set, so nothing
    # decided under the empty set can be served under the fetched one.
    builder = KeyBuilder("pdp:v1", b"settings-salt-16")
    before = builder.key(with_token(KEY), policies.revision, policies.key_sets)
    idp.mode = "ok"
    idp.released.set()  # ends the held request; the next refresh is a forced one
    keys.refresh_now()
    assert keys.available
    assert builder.key(with_token(KEY), policies.revision, policies.key_sets) != before
    assert (
        check_token(
            token, now(), policies.organizations["acme"].tokens, "alice", application_id="app"
        ).problem
        is None
    )


def test_only_calls_whose_token_needs_a_refresh_wait(
    tmp_path: Path, idp: Idp, key_sets: RemoteKeySets
) -> None:
    policies = load(policy_dir(tmp_path / "policies", idp.url), key_sets)
    idp.mode = "silent"
    known, unknown = with_token(KEY), with_token(ROTATED)
    other_org = with_token(ROTATED, "globex")  # globex verifies no tokens
    no_token = tuple_request()

    def waited(items: list[pdp_pb2.CheckRequest]) -> tuple[int, float]:
        began = time.monotonic()
        count = asyncio.run(await_pending_keys(items, policies, time.monotonic() + 30))
        return count, time.monotonic() - began

    # Rate limit: the first fetch just happened, so no refresh may start: nothing to wait for.
    assert waited([unknown])[0] == 0
    acme_keys(policies).refresh(force=True)  # a refresh in flight (the IdP holds it)
    for items in ([known], [other_org], [no_token], [known, other_org, no_token]):
        count, seconds = waited(items)
        assert count == 0 and seconds < 0.5, items
    count, seconds = waited([known, unknown, unknown, other_org])
    assert count == 2 and 0.9 <= seconds < 5  # one wait for both items, bounded by 1 s


def test_the_unverified_header_is_read_bounded() -> None:
    assert unverified_key(KEY.sign(**claims())) == ("current", "RS256")
    assert unverified_key("e30.e30.") is None  # {} has no alg
    assert unverified_key("not a token") is None
    assert unverified_key("!!!." + "a" * 10) is None
    huge = "eyJ" + "A" * 5000 + ".x.y"  # a header longer than MAX_HEADER_CHARS: not read
    assert unverified_key(huge) is None


# --- through real servers ---------------------------------------------------------------------


def test_a_tarpit_jwks_for_one_organization_never_slows_another(tmp_path: Path, idp: Idp) -> None:
    # acme's IdP is fine at first, then turns into a tarpit while acme's callers present
    # tokens signed with a key it never fetched: every such token asks for a refresh that
    # the IdP holds (the fetch timeout is set past the whole test). globex's calls must keep
    # their latency.
    key_sets = RemoteKeySets(timeout=HOLD_SECONDS, min_refresh_interval=0.0)
    key_sets.start()
    policies = load(policy_dir(tmp_path / "policies", idp.url), key_sets)
    config = settings()
    acme_calls: list[tuple[float, Any]] = []
    stop = threading.Event()

    def acme_traffic(stub: Any, msg: pdp_pb2.CheckRequest) -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                answer: Any = stub.Check(msg, timeout=10)
            except grpc.RpcError as exc:
                answer = exc.code()
            acme_calls.append((time.monotonic() - began, answer))

    def globex_latencies(stub: Any, count: int) -> list[float]:
        msg = tuple_request()
        msg.organization = "globex"
        seconds: list[float] = []
        for _ in range(count):
            began = time.monotonic()
            answer = stub.Check(msg, timeout=10)
            seconds.append(time.monotonic() - began)
            assert answer.effect == pdp_pb2.EFFECT_ALLOW
            if seconds[-1] > 2.0:
                break  # already failed: do not spend minutes proving it
        return seconds

    def with_acme_traffic(stub: Any, msg: pdp_pb2.CheckRequest, count: int) -> list[float]:
        stop.clear()
        threads = [threading.Thread(target=acme_traffic, args=(stub, msg)) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(acme_calls) >= 4, timeout=20, what="acme's calls")
            return globex_latencies(stub, count)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)

    try:
        with serving(servicer_for(policies, config), config) as stub:
            calm = with_acme_traffic(stub, with_token(KEY), 200)
            idp.mode = "trickle"
            acme_calls.clear()
            tarpit = with_acme_traffic(stub, with_token(ROTATED), 200)
            assert idp.requests >= 2  # the refresh the rotated kid asked for is held
            print(
                f"\nglobex Check p99 with acme's IdP answering: {percentile(calm, 99) * 1e3:.1f} "
                f"ms, with it a tarpit: {percentile(tarpit, 99) * 1e3:.1f} ms "
                f"(max {max(tarpit) * 1e3:.1f} ms, {len(tarpit)} calls)"
            )
            assert len(tarpit) == 200 and max(tarpit) < 2.0  # the tarpit holds for 60 s
            # acme's own callers are answered too: denied (unknown key), within their wait.
            assert acme_calls and all(seconds < 5 for seconds, _ in acme_calls)
            assert all(
                getattr(answer, "effect", None) == pdp_pb2.EFFECT_DENY
                and codes(answer) == [AUTHORIZATION_REQUIRED]
                for _, answer in acme_calls
            )
    finally:
        began = time.monotonic()
        assert key_sets.stop(deadline_in(5))  # while the tarpit still holds the fetch
        assert time.monotonic() - began < 5
    wait_for(lambda: idp.dropped >= 1, timeout=10, what="the held fetch to be closed")


def _set_tokens(root: Path, org: str, url: str) -> None:
    path = root / org / "organization.yaml"
    config = yaml.safe_load(path.read_text())
    config["tokens"] = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": url}
    path.write_text(yaml.safe_dump(config))


def test_a_policy_edit_is_served_while_another_organizations_jwks_url_hangs(
    tmp_path: Path, idp: Idp
) -> None:
    root = policy_dir(tmp_path / "policies", idp.url)  # acme's tokens: taken out below
    config = yaml.safe_load((root / "acme" / "organization.yaml").read_text())
    config.pop("tokens")
    (root / "acme" / "organization.yaml").write_text(yaml.safe_dump(config))
    running = start_server(
        Settings(
            address="127.0.0.1:0",
            policy_dir=root,
            threads=4,
            metrics_address="",
            reload=ReloadSettings(watch=True, debounce_ms=50),
        )
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            msg = tuple_request()
            msg.organization = "globex"
            assert stub.Check(msg, timeout=10).effect == pdp_pb2.EFFECT_ALLOW
            # acme now names a JWKS URL that trickles for a minute; globex closes its org
            # layer. The reload must not wait for acme's IdP.
            idp.mode = "trickle"
            _set_tokens(root, "acme", idp.url)
            edited = {
                "kind": "Policy",
                **allow_all("org", "closed-org"),
                "rules": [{"name": "closed", "effect": "deny"}],
            }
            (root / "globex" / "closed.yaml").write_text(dump_yaml(edited))
            began = time.monotonic()
            wait_for(
                lambda: stub.Check(msg, timeout=10).effect == pdp_pb2.EFFECT_DENY,
                timeout=15,
                what="globex's edit to be served",
            )
            print(f"\nglobex's edit served {time.monotonic() - began:.2f} s after it was written")
            wait_for(lambda: idp.requests >= 1, timeout=10, what="acme's first fetch")
    finally:
        began = time.monotonic()
        running.stop(grace=None)
        assert time.monotonic() - began < 15  # the IdP still holds acme's fetch


def test_sigterm_while_a_jwks_fetch_hangs_exits_promptly(tmp_path: Path, idp: Idp) -> None:
    idp.mode = "trickle"
    root = policy_dir(tmp_path / "policies", idp.url)
    with serve_process(tmp_path, root, workers=1, env={}) as (proc, _port, log_file):
        wait_for(lambda: idp.requests >= 1, timeout=20, what="the fetch the server started")
        began = time.monotonic()
    assert time.monotonic() - began < 15, log_file.read_text()  # the IdP holds it for 60 s
    assert proc.returncode == 0


def test_the_first_call_after_a_rotation_is_allowed_through_grpc(tmp_path: Path, idp: Idp) -> None:
    key_sets = RemoteKeySets(min_refresh_interval=0.2)
    policies = load(policy_dir(tmp_path / "policies", idp.url), key_sets)
    config = settings()
    try:
        with serving(servicer_for(policies, config), config) as stub:
            assert stub.Check(with_token(KEY), timeout=10).effect == pdp_pb2.EFFECT_ALLOW
            idp.document = jwks(KEY, ROTATED)  # the IdP rotates in a new key
            time.sleep(0.3)  # past the rate limit that follows the first fetch
            first = stub.Check(with_token(ROTATED), timeout=10)
            assert (first.effect, list(first.reasons)) == (pdp_pb2.EFFECT_ALLOW, [])
    finally:
        assert key_sets.stop(deadline_in(5))


def test_an_organization_with_tokens_warms_the_token_imports_at_load(
    tmp_path: Path, idp: Idp
) -> None:
    root = policy_dir(tmp_path / "policies", idp.url)
    child = (
        "import sys\n"
        "from policy_engine.store import DirectoryBackend\n"
        f"DirectoryBackend({str(root)!r}).load()\n"
        "print(sorted({'jwt', 'cryptography', 'httpx'} & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "['cryptography', 'httpx', 'jwt']", out.stderr


def test_a_failure_is_logged_once_per_change_and_the_recovery_once(
    idp: Idp, key_sets: RemoteKeySets, caplog: pytest.LogCaptureFixture
) -> None:
    remote = key_sets.get(idp.url)
    wait_for(lambda: remote.available, timeout=10, what="the first fetch")
    idp.mode = "missing"
    for _ in range(3):
        remote.refresh_now()
    idp.mode = "html"
    remote.refresh_now()
    idp.mode = "ok"
    remote.refresh_now()
    remote.refresh_now()
    lines = [r.getMessage() for r in caplog.records if r.name == "policy_engine.auth.keys"]
    assert len(lines) == 3, lines  # three changes: 404, not JSON, working again
    assert "failed: JwksFetchError: HTTP 404 Not Found (keeping its 1 keys)" in lines[0]
    assert "failed: KeySetError: invalid JWKS: not JSON" in lines[1]
    assert lines[2] == f"JWKS refresh from {idp.url} works again (1 keys)"


def test_the_component_stops_safely_before_start_and_twice() -> None:
    never_started = RemoteKeySets()
    assert never_started.status().state is State.NEW and never_started.status().ready
    assert never_started.stop(deadline_in(1)) and never_started.stop(deadline_in(1))
    assert never_started.status().state is State.STOPPED
    idle = RemoteKeySets()
    idle.start()
    assert idle.status().detail == "no jwks_url in use"
    assert idle.stop(deadline_in(1)) and idle.stop(deadline_in(1))


def test_a_fault_in_the_pre_step_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        """A policy set the pre-step cannot read (a bug's stand-in)."""

    waiting = asyncio.run(await_pending_keys([with_token(KEY)], Broken(), None))  # type: ignore[arg-type]
    assert waiting == 0
    assert "JWKS refreshes a call needs failed; not waiting" in caplog.text
