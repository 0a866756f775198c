"""`pdp test` cases of who acts for whom: a case's token is issued to the case's application
and, for an external user, to the person the mapping gives it; a namespace is an external
user's only. Through the real CLI entry point on policy directories in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.testing.test_pdp_test import ORGANIZATION, POLICY, _policy_dir, _run

MAPPING = """\
kind: IdentityMapping
namespace: partners
applications: [bot]
identities:
  partner-7: alice
"""

SUITE = """\
kind: TestSuite
name: identities
time: "2026-03-02T10:00:00Z"
fixtures:
  principals:
    partner: {id: partner-7, kind: external_user, namespace: partners}
  keys:
    idp: {private_key_file: idp.pem, kid: k1}
cases:
  - name: the-partners-token-is-alices-and-the-bots
    subject: partner
    application: bot
    integration: github
    scope: repo
    token: {key: idp, claims: {groups: [engineering]}}
    expect: {decision: allow}
  - name: a-token-naming-no-application
    subject: alice
    application: bot
    integration: github
    scope: repo
    token: {key: idp, claims: {groups: [engineering], client_id: null}}
    expect: {decision: deny, code: kontext_authorization_required, rule: valid-subject-token}
  - name: a-token-of-another-application
    subject: alice
    application: bot
    integration: github
    scope: repo
    token: {key: idp, claims: {groups: [engineering], client_id: other-bot}}
    expect: {decision: deny, code: kontext_authorization_required, rule: valid-subject-token}
  - name: an-unlinked-partner
    subject: {id: partner-8, kind: external_user}
    application: bot
    integration: github
    scope: repo
    expect: {decision: deny, code: kontext_authorization_required, rule: external-user-mapped}
"""


def _write(tmp_path: Path, suite: str = SUITE) -> Path:
    root = _policy_dir(tmp_path, suite)
    folder = root / "acme"
    (folder / "partners.yaml").write_text(MAPPING)
    (folder / "idp.pem").write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / "org.yaml").write_text(
        POLICY.replace(
            '"engineering" in subject.attributes.groups', '"engineering" in subject.claims.groups'
        )
    )
    assert "bot" in ORGANIZATION
    return root


def test_case_tokens_are_the_mapped_persons_and_the_applications(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, str(_write(tmp_path)))
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "OK: 4 passed, 0 failed (4 cases in 1 suite)"


def test_a_namespace_is_only_for_an_external_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = SUITE.replace(
        "partner: {id: partner-7, kind: external_user, namespace: partners}",
        "partner: {id: partner-7, namespace: partners}",
    )
    root = _write(tmp_path, suite)
    code, _, err = _run(capsys, str(root))
    assert code == 3
    assert f"{root / 'acme' / 'basics.test.yaml'}:6: only an external_user has a namespace" in err
