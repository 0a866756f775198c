"""Every file a policy set was built from is watched: a JWKS edit reloads at once (issue 9).

A real server (start_server: store, watcher, decision cache on) on an ephemeral port, a real
gRPC client, real files. Two organizations verify subject tokens with a JWKS file: `acme`
keeps it hidden (`.keys/jwks.json`), `globex` in `keys/jwks.json`. When an operator removes a
compromised key from that file, by saving in place or renaming a new file over it, the same
request turns from ALLOW to a kontext_authorization_required DENY without any SIGHUP. A JWKS
rewritten in place chunk by chunk is never loaded half-written, a JWKS that is missing when a
load names it is loaded when it appears, and one reached through a symlink is watched where
the link leads.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import BundleSettings, ReloadSettings, Settings
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.policy.bundle import read_tree, sign_bundle
from policy_engine.policy.loader import FileRead
from policy_engine.server.app import RunningServer, start_server
from policy_engine.store import DirectoryBackend, PolicyStore, ReloadResult
from policy_engine.store.watch import PolicyChangeFilter
from tests.auth.material import AUDIENCE, ISSUER, claims, jwks, rsa_key
from tests.policy.test_bundle import key_pair
from tests.policy_builder import allow_all, write_organization
from tests.store.support import wait_for, write_text_atomically

COMPROMISED = rsa_key("compromised")
KEPT = rsa_key("kept")
JWKS_FILES = {"acme": ".keys/jwks.json", "globex": "keys/jwks.json"}
# Each its own: two organizations trusting one issuer for one audience would accept each
# other's tokens, which the loader refuses (unless both bind tokens.organization_claim).
AUDIENCES = {"acme": AUDIENCE, "globex": "globex-broker"}
DENIED = (pdp_pb2.EFFECT_DENY, ("kontext_authorization_required",))
ALLOWED = (pdp_pb2.EFFECT_ALLOW, ())


def _set_jwks_file(folder: Path, jwks_file: str) -> None:
    config = yaml.safe_load((folder / "organization.yaml").read_text())
    tokens = {"issuer": ISSUER, "audience": AUDIENCES[folder.name], "jwks_file": jwks_file}
    write_text_atomically(
        folder / "organization.yaml", yaml.safe_dump({**config, "tokens": tokens})
    )


def write_policies(root: Path) -> Path:
    """Both organizations allow everything to a subject whose token verifies."""
    for org, jwks_file in JWKS_FILES.items():
        folder = write_organization(
            root, org, policies=[allow_all("org"), allow_all("user"), allow_all("application")]
        )
        (folder / jwks_file).parent.mkdir(parents=True, exist_ok=True)
        (folder / jwks_file).write_text(jwks(COMPROMISED, KEPT))
        _set_jwks_file(folder, jwks_file)
    return root


def _check(stub: pdp_pb2_grpc.PolicyDecisionServiceStub, org: str, token: str) -> tuple:
    response = stub.Check(
        pdp_pb2.CheckRequest(
            organization=org,
            subject=pdp_pb2.Subject(id="alice", kind=pdp_pb2.SUBJECT_KIND_USER, access_token=token),
            application=pdp_pb2.Application(id="app"),
            integration=pdp_pb2.Integration(id="github"),
            scope="repo",
        ),
        timeout=10,
    )
    return response.effect, tuple(reason.code for reason in response.reasons)


def _revision_of(tmp_path: Path, root: Path) -> str:
    """The revision the directory's current content loads as (what `pdp validate` says)."""
    scratch = tmp_path / f"expected-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(root, scratch, symlinks=True)
    return load_policy_set(scratch).revision


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_policies(tmp_path / "policies")


@pytest.fixture
def server(root: Path) -> Iterator[tuple[RunningServer, list[str]]]:
    """The server (decision cache on, as by default) and every revision it swapped in."""
    settings = Settings(
        address="127.0.0.1:0",
        policy_dir=root,
        threads=4,
        metrics_address="",
        reload=ReloadSettings(watch=True, debounce_ms=50),
    )
    assert settings.cache.enabled
    running = start_server(settings)
    assert running.store is not None and running.store.status().serving
    swapped = [running.store.status().revision]
    running.store.subscribe(lambda policies: swapped.append(policies.revision))
    try:
        yield running, swapped
    finally:
        running.stop(grace=None)


@pytest.fixture
def stub(
    server: tuple[RunningServer, list[str]],
) -> Iterator[pdp_pb2_grpc.PolicyDecisionServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server[0].port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pdp_pb2_grpc.PolicyDecisionServiceStub(channel)


def _status(running: RunningServer) -> pdp_pb2.GetStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        return pdp_pb2_grpc.PolicyStatusServiceStub(channel).GetStatus(
            pdp_pb2.GetStatusRequest(), timeout=10
        )


@pytest.mark.parametrize("org", sorted(JWKS_FILES))
@pytest.mark.parametrize("save", ["in place", "atomic rename"])
def test_removing_a_key_from_the_jwks_file_denies_its_tokens_without_a_signal(
    tmp_path: Path,
    root: Path,
    server: tuple[RunningServer, list[str]],
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
    org: str,
    save: str,
) -> None:
    running, swapped = server
    stolen = COMPROMISED.sign(**claims(aud=AUDIENCES[org]))
    kept = KEPT.sign(**claims(aud=AUDIENCES[org]))
    assert _check(stub, org, stolen) == ALLOWED
    assert _check(stub, org, stolen) == ALLOWED  # and now from the decision cache
    path = root / org / JWKS_FILES[org]
    if save == "in place":
        path.write_text(jwks(KEPT))
    else:
        write_text_atomically(path, jwks(KEPT))
    expected = _revision_of(tmp_path, root)
    assert expected != swapped[0]  # the JWKS file's bytes are part of the revision
    wait_for(lambda: _check(stub, org, stolen) == DENIED, what="the removed key's token denied")
    assert _check(stub, org, kept) == ALLOWED
    assert swapped == [swapped[0], expected]
    status = _status(running)
    assert status.revision == expected and status.last_reload_ok
    assert running.store is not None
    assert "jwks.json" in running.store.status().last_reason  # the watcher's, no signal


def test_a_symlinked_jwks_is_watched_where_the_link_leads(
    root: Path,
    server: tuple[RunningServer, list[str]],
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
) -> None:
    running, _ = server
    keys = root / "acme" / ".secrets"
    keys.mkdir()
    (keys / "current.json").write_text(jwks(COMPROMISED, KEPT))
    link = root / "acme" / ".keys" / "jwks.json"
    staged = link.with_name("jwks.json.new")
    staged.symlink_to("../.secrets/current.json")
    os.replace(staged, link)  # the link replaces the file: a reload, same keys
    stolen = COMPROMISED.sign(**claims())
    before = running.store.status().attempts if running.store else 0
    wait_for(
        lambda: running.store is not None and running.store.status().attempts > before,
        what="the reload for the link",
    )
    wait_for(lambda: _check(stub, "acme", stolen) == ALLOWED, what="the linked JWKS serving")
    (keys / "current.json").write_text(jwks(KEPT))  # the link's target, edited in place
    wait_for(lambda: _check(stub, "acme", stolen) == DENIED, what="the removed key's token denied")


def test_a_jwks_file_missing_when_loaded_is_loaded_once_it_appears(
    root: Path,
    server: tuple[RunningServer, list[str]],
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
) -> None:
    running, swapped = server
    stolen = COMPROMISED.sign(**claims())
    _set_jwks_file(root / "acme", ".rotated/jwks.json")  # a folder that does not exist yet
    wait_for(lambda: "jwks_file" in _status(running).last_error, what="the failed reload")
    assert _check(stub, "acme", stolen) == ALLOWED  # the last good set keeps serving
    write_text_atomically(root / "acme" / ".rotated" / "jwks.json", jwks(KEPT))
    wait_for(lambda: _check(stub, "acme", stolen) == DENIED, what="the new JWKS loaded")
    assert _check(stub, "acme", KEPT.sign(**claims())) == ALLOWED
    assert _status(running).last_reload_ok and len(swapped) == 2


@pytest.mark.parametrize(
    "split",
    [
        "mid-document",  # the first chunk is no JSON: a load would fail
        "before the final newline",  # the first chunk is a valid JWKS: a wrong revision
    ],
)
def test_a_jwks_rewritten_in_place_in_chunks_is_never_loaded_half_written(
    tmp_path: Path,
    root: Path,
    server: tuple[RunningServer, list[str]],
    stub: pdp_pb2_grpc.PolicyDecisionServiceStub,
    split: str,
) -> None:
    running, swapped = server
    old = swapped[0]
    stolen = COMPROMISED.sign(**claims())
    text = jwks(KEPT) + "\n"
    cut = len(text) // 2 if split == "mid-document" else len(text) - 1
    path = root / "acme" / ".keys" / "jwks.json"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text[:cut].encode())
        attempts = running.store.status().attempts if running.store else 0
        running.reload("SIGHUP")  # a reload asked for while the file is half-written
        wait_for(
            lambda: running.store is not None and running.store.status().attempts > attempts,
            what="the reload attempt",
        )
        status = _status(running)
        assert status.revision == old
        assert "acme/.keys/jwks.json" in status.last_error
        assert "being written" in status.last_error
        assert _check(stub, "acme", stolen) == ALLOWED  # the old set, never the half file
        os.write(fd, text[cut:].encode())
    finally:
        os.close(fd)
    expected = _revision_of(tmp_path, root)
    wait_for(lambda: _check(stub, "acme", stolen) == DENIED, what="the complete JWKS")
    assert swapped == [old, expected]
    assert _status(running).last_reload_ok


class _JwksRewrittenAfterItsRead(DirectoryBackend):
    """A deploy rewrites the JWKS file after the loader read it, before the load ends."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.checks = 0

    def changed_since_read(self, files_read: tuple) -> list[str]:
        self.checks += 1
        if self.checks == 1:
            (self.directory / "acme" / ".keys" / "jwks.json").write_text(jwks(KEPT))
        return super().changed_since_read(files_read)


def test_a_jwks_rewritten_during_a_load_is_never_half_applied(tmp_path: Path, root: Path) -> None:
    backend = _JwksRewrittenAfterItsRead(root)
    store = PolicyStore(backend)
    assert store.reload("startup") is ReloadResult.LOADED
    assert backend.checks >= 2  # the first, torn load was refused and retried
    policies: CompiledPolicySet = store.current()
    assert policies.revision == _revision_of(tmp_path, root)
    read = {file.relative for file in policies.files_read}
    assert {"acme/.keys/jwks.json", "globex/keys/jwks.json"} <= read


def test_signed_policies_reload_when_the_jwks_lands_after_its_signature(
    tmp_path: Path, root: Path
) -> None:
    """A deploy that writes the new signature first and the hidden JWKS second: the first
    reload fails (the JWKS differs from the signed one) and the JWKS's arrival loads the set."""
    private_file, public_file = key_pair(tmp_path)
    sign_bundle(root, private_file.read_bytes())
    running = start_server(
        Settings(
            address="127.0.0.1:0",
            policy_dir=root,
            threads=4,
            metrics_address="",
            reload=ReloadSettings(watch=True, debounce_ms=50),
            bundle=BundleSettings(public_key_file=str(public_file)),
        )
    )
    try:
        stolen = COMPROMISED.sign(**claims())
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            assert _check(stub, "acme", stolen) == ALLOWED
            staged = tmp_path / "staged"
            shutil.copytree(root, staged)
            (staged / "acme" / ".keys" / "jwks.json").write_text(jwks(KEPT))
            snapshot, problems = read_tree(staged)
            assert problems == []
            sign_bundle(root, private_file.read_bytes(), snapshot)  # the signature first
            wait_for(
                lambda: "content differs" in _status(running).last_error,
                what="the reload refused until the JWKS lands",
            )
            assert _check(stub, "acme", stolen) == ALLOWED  # the last good set
            write_text_atomically(root / "acme" / ".keys" / "jwks.json", jwks(KEPT))
            wait_for(lambda: _check(stub, "acme", stolen) == DENIED, what="the signed new JWKS")
            assert _status(running).last_reload_ok
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize(
    ("relative", "passes"),
    [
        ("acme/.keys/jwks.json", True),  # read by the last load, hidden or not
        ("acme/.keys", True),  # the folder leading to it (created, renamed in)
        ("acme/.rotated/jwks.json", True),  # read and missing: its appearance counts
        ("acme/.rotated", True),
        ("acme/.keys/.jwks.json.tmp", False),  # an editor's temporary beside it
        ("acme/.keys/jwks.json~", False),
        ("acme/.keys/other.json", False),  # not read
        ("acme/.git/index", False),
        ("acme/keys/jwks.json", False),  # not read by that load
    ],
)
def test_the_filter_passes_the_files_the_last_load_read(
    tmp_path: Path, relative: str, passes: bool
) -> None:
    (tmp_path / "acme" / ".keys").mkdir(parents=True)
    files_read = [
        FileRead(name, str(tmp_path / name), None)
        for name in ("acme/.keys/jwks.json", "acme/.rotated/jwks.json", "acme/organization.yaml")
    ]
    changes = PolicyChangeFilter(tmp_path, files_read)
    assert changes(str(tmp_path / relative)) is passes
