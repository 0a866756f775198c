"""Only the broker may ask: TLS, mutual TLS and bearer JWTs, with real certificates and keys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.client import PdpClient, check_request
from policy_engine.config import (
    CallerAuthSettings,
    ConfigError,
    ReloadSettings,
    Settings,
    TlsSettings,
)
from policy_engine.policy import load_policy_set
from policy_engine.server.app import build_server, start_server
from policy_engine.server.service import PolicyDecisionServicer
from tests.auth.certs import CertificateAuthority, Issued
from tests.auth.material import jwks, rsa_key
from tests.server.harness import DOCS, EXAMPLE_POLICIES

POLICIES = load_policy_set(EXAMPLE_POLICIES)
ALICE = check_request(
    "acme", "alice", "pr-reviewer", "github", "repo", subject_attributes={"groups": ["engineering"]}
)
BROKER_KEY = rsa_key("broker-1")
AUDIENCE = "pdp"
ISSUER = "https://broker-idp.test"


@contextmanager
def server(settings: Settings) -> Iterator[int]:
    settings = settings.replace(address="127.0.0.1:0", threads=4, docs_base_url=DOCS)
    servicer = PolicyDecisionServicer(lambda: POLICIES, settings)
    grpc_server, port = build_server(servicer, settings, policy_ready=True)
    grpc_server.start()
    try:
        yield port
    finally:
        grpc_server.stop(grace=None)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


def broker_token(lifetime: int = 300, audience: str = AUDIENCE, issuer: str = ISSUER) -> str:
    now = int(time.time())
    return BROKER_KEY.sign(sub="broker", aud=audience, iss=issuer, iat=now, exp=now + lifetime)


def _mutual_tls(ca: CertificateAuthority, issued: Issued) -> TlsSettings:
    return TlsSettings(
        cert_file=str(issued.cert_file),
        key_file=str(issued.key_file),
        client_ca_file=str(ca.cert_file),
    )


def _with_certificate(target: str, ca: CertificateAuthority, cert: Issued) -> PdpClient:
    return PdpClient(
        target,
        ca_file=str(ca.cert_file),
        client_cert_file=str(cert.cert_file),
        client_key_file=str(cert.key_file),
    )


@pytest.fixture
def bearer_settings(tmp_path: Path) -> Settings:
    keys = tmp_path / "callers.jwks"
    keys.write_text(jwks(BROKER_KEY))
    return Settings(
        caller_auth=CallerAuthSettings(jwks_file=str(keys), audience=AUDIENCE, issuer=ISSUER)
    )


def test_tls(ca: CertificateAuthority) -> None:
    issued = ca.issue("pdp-server", server=True)
    with server(
        Settings(tls=TlsSettings(cert_file=str(issued.cert_file), key_file=str(issued.key_file)))
    ) as port:
        with PdpClient(f"localhost:{port}", ca_file=str(ca.cert_file)) as client:
            assert client.decide(ALICE).allowed
        with PdpClient(f"localhost:{port}", timeout=2) as plaintext:  # no TLS: refused
            assert plaintext.decide(ALICE).reasons[0].code == "kontext_server_error"


def test_mutual_tls_refuses_clients_without_a_certificate(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    issued = ca.issue("pdp-server-m", server=True)
    broker = ca.issue("broker", server=False)
    rogue_ca = CertificateAuthority(tmp_path, "rogue-ca")
    rogue = rogue_ca.issue("rogue", server=False)
    with server(Settings(tls=_mutual_tls(ca, issued))) as port:
        target = f"localhost:{port}"
        with _with_certificate(target, ca, broker) as client:
            assert client.decide(ALICE).allowed
        with PdpClient(target, ca_file=str(ca.cert_file), timeout=2) as anonymous:
            with pytest.raises(grpc.RpcError) as refused:
                anonymous.check(ALICE)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert anonymous.decide(ALICE).response.effect == pdp_pb2.EFFECT_DENY
        with PdpClient(
            target,
            ca_file=str(ca.cert_file),
            client_cert_file=str(rogue.cert_file),
            client_key_file=str(rogue.key_file),
            timeout=2,
        ) as impostor:
            assert not impostor.decide(ALICE).allowed


def test_bearer_token_is_required_for_decisions_but_not_for_health(
    bearer_settings: Settings,
) -> None:
    with server(bearer_settings) as port:
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with PdpClient(target) as anonymous:
            with pytest.raises(grpc.RpcError) as refused:
                anonymous.check(ALICE)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "missing bearer token" in refused.value.details()
        for bad, why in [
            (broker_token(lifetime=-60), "ExpiredSignature"),
            (broker_token(audience="someone-else"), "InvalidAudience"),
            (
                rsa_key("rogue").sign(sub="x", aud=AUDIENCE, exp=int(time.time()) + 60),
                "unknown key",
            ),
        ]:
            with PdpClient(target, bearer_token=bad, insecure_bearer=True) as client:
                with pytest.raises(grpc.RpcError) as refused:
                    client.check(ALICE)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert why in refused.value.details()
        with PdpClient(target, bearer_token=broker_token(), insecure_bearer=True) as client:
            assert client.decide(ALICE).allowed
            assert len(client.check_batch([ALICE, ALICE])) == 2


def test_bearer_and_mutual_tls_together(
    ca: CertificateAuthority, bearer_settings: Settings
) -> None:
    issued = ca.issue("pdp-server-both", server=True)
    broker = ca.issue("broker-both", server=False)
    settings = bearer_settings.replace(
        tls=TlsSettings(
            cert_file=str(issued.cert_file),
            key_file=str(issued.key_file),
            client_ca_file=str(ca.cert_file),
        )
    )
    with server(settings) as port:
        common = {
            "ca_file": str(ca.cert_file),
            "client_cert_file": str(broker.cert_file),
            "client_key_file": str(broker.key_file),
        }
        with PdpClient(f"localhost:{port}", bearer_token=broker_token, **common) as client:
            assert client.decide(ALICE).allowed  # a callable token is fetched per call
        with PdpClient(f"localhost:{port}", **common) as no_token:
            assert no_token.decide(ALICE).reasons[0].code == "kontext_server_error"


def test_client_fails_closed_when_the_pdp_is_unreachable() -> None:
    with PdpClient("127.0.0.1:1", timeout=0.5) as client:
        answer = client.decide(ALICE)
        assert not answer.allowed
        assert answer.reasons[0].code == "kontext_server_error"
        assert all(not a.allowed for a in client.decide_batch([ALICE, ALICE]))


def test_bearer_needs_tls_unless_told_otherwise() -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        PdpClient("127.0.0.1:1", bearer_token="x")


@pytest.mark.parametrize(
    "tls",
    [
        TlsSettings(cert_file="/nonexistent.pem", key_file="/nonexistent.key"),
        TlsSettings(cert_file="/x.pem"),
        TlsSettings(client_ca_file="/ca.pem"),
    ],
)
def test_bad_tls_settings_are_config_errors(tls: TlsSettings) -> None:
    with pytest.raises(ConfigError), server(Settings(tls=tls)):
        pass


def test_health_port_answers_probes_that_cannot_do_mutual_tls(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    issued = ca.issue("pdp-server-h", server=True)
    broker = ca.issue("broker-h", server=False)
    settings = Settings(
        address="127.0.0.1:0",
        health_address="127.0.0.1:0",
        policy_dir=EXAMPLE_POLICIES,
        metrics_address="",
        reload=ReloadSettings(watch=False),
        docs_base_url=DOCS,
        tls=_mutual_tls(ca, issued),
    )
    running = start_server(settings)
    try:
        assert running.health_port is not None and running.health_port != running.port
        with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as probe:
            answer = health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as no_decisions:
                pdp_pb2_grpc.PolicyDecisionServiceStub(probe).Check(ALICE, timeout=5)
            assert no_decisions.value.code() is grpc.StatusCode.UNIMPLEMENTED
        target = f"localhost:{running.port}"
        with PdpClient(target, ca_file=str(ca.cert_file), timeout=2) as anonymous:
            assert not anonymous.decide(ALICE).allowed  # the main port still wants a certificate
        with _with_certificate(target, ca, broker) as client:
            assert client.decide(ALICE).allowed
    finally:
        running.stop(grace=None)
    assert running.health_server is not None
