"""`pdp test` through its real CLI entry point, on real policy directories in tmp dirs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm

from policy_engine.cli.main import main
from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.policy.bundle import read_tree, sign_bundle, verify_bundle
from policy_engine.store import DirectoryBackend, PolicyStore, ReloadResult
from policy_engine.store.watch import PolicyChangeFilter
from policy_engine.testing.cli import (
    EXIT_COVERAGE,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_PASSED,
    EXIT_USAGE,
)

REPOSITORY = Path(__file__).resolve().parents[2]

ORGANIZATION = """\
kind: Organization
defaults: {org: deny, user: allow, application: allow}
catalog:
  integrations: [github]
  applications: [bot]
"""

# Three rules: `engineers` matches for engineering, `no-delete` for delete_repo, and
# `broken` fails to evaluate whenever it runs (a missing attribute).
POLICY = """\
kind: Policy
name: tools
layer: org
rules:
  - name: engineers
    effect: allow
    condition: '"engineering" in subject.attributes.groups'
  - name: no-delete
    effect: deny
    target: {scopes: [delete_repo]}
  - name: broken
    effect: deny
    target: {scopes: [admin]}
    condition: subject.attributes.missing == 1
"""

SUITE = """\
kind: TestSuite
name: basics
fixtures:
  principals:
    alice: {id: alice, attributes: {groups: [engineering]}}
    bob: {id: bob, attributes: {groups: [sales]}}
cases:
  - name: alice-may
    subject: alice
    application: bot
    integration: github
    scope: repo
    expect: {decision: allow, layer: org, policy: tools, rule: engineers}
  - name: bob-may-not
    subject: bob
    application: bot
    integration: github
    scope: repo
    expect: {decision: deny, code: kontext_policy_denied, layer: org, rule: default}
  - name: admin-errors
    subject: alice
    application: bot
    integration: github
    scope: admin
    expect: {decision: deny, policy: tools, rule: broken}
"""


def _policy_dir(tmp_path: Path, suite: str = SUITE) -> Path:
    root = tmp_path / "policies"
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "organization.yaml").write_text(ORGANIZATION)
    (root / "acme" / "org.yaml").write_text(POLICY)
    (root / "acme" / "basics.test.yaml").write_text(suite)
    return root


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["test", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_all_cases_passing_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, str(_policy_dir(tmp_path)))
    assert code == EXIT_PASSED
    assert out.strip().splitlines()[-1] == "OK: 3 passed, 0 failed (3 cases in 1 suite)"


def test_a_failing_case_exits_1_with_expected_actual_and_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = SUITE.replace(
        "expect: {decision: allow, layer: org", "expect: {decision: deny, layer: org"
    )
    root = _policy_dir(tmp_path, suite)
    code, out, _ = _run(capsys, str(root))
    assert code == EXIT_FAILED
    assert f"FAIL acme/basics/alice-may ({root}/acme/basics.test.yaml:8)" in out
    assert "expected: DENY layer=org policy=tools rule=engineers" in out
    assert "decision: expected DENY, got ALLOW" in out
    assert "- tools/engineers [allow] matched" in out  # the explain trace
    assert out.strip().splitlines()[-1].startswith("FAILED: 2 passed, 1 failed")


def test_a_wrong_rule_is_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _policy_dir(tmp_path, SUITE.replace("rule: broken", "rule: no-delete"))
    code, out, _ = _run(capsys, str(root))
    assert code == EXIT_FAILED
    assert "no reason with policy=tools rule=no-delete (got: code=kontext_policy_denied" in out


@pytest.mark.parametrize(
    ("suite", "message"),
    [
        (
            SUITE.replace("    scope: repo\n", "    scope: repo\n    scoop: x\n", 1),
            "unknown field 'scoop' in a case",
        ),
        (
            SUITE.replace("decision: allow", "decision: ALLOW"),
            "decision 'ALLOW' is not one of allow | deny",
        ),
        (SUITE.replace("kind: TestSuite", "kind: Suite"), "kind must be 'TestSuite'"),
        (
            SUITE + "  - name: alice-may\n    subject: alice\n    application: bot\n"
            "    integration: github\n    scope: x\n    expect: {decision: allow}\n",
            "case 'alice-may' is also on line 8",
        ),
        (SUITE.replace("cases:", "time: 2026-01-01\ncases:"), "date"),
        (
            SUITE.replace("code: kontext_policy_denied", "code: policy_denied"),
            "code 'policy_denied'",
        ),
        (
            SUITE.replace(
                "    scope: admin\n", "    scope: admin\n    context: {connection: up}\n"
            ),
            "connection 'up' is not one of active | absent | unknown",
        ),
        (SUITE.replace("subject: bob", "subject: [bob]"), "'subject' must name a fixture"),
    ],
)
def test_an_invalid_suite_exits_3_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suite: str, message: str
) -> None:
    root = _policy_dir(tmp_path, suite)
    code, out, err = _run(capsys, str(root))
    assert code == EXIT_INVALID
    assert out == ""
    assert err.startswith("invalid test suites:")
    assert f"{root}/acme/basics.test.yaml:" in err
    assert message in err


def test_invalid_policies_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _policy_dir(tmp_path)
    (root / "acme" / "org.yaml").write_text(POLICY.replace("effect: deny", "effect: Deny", 1))
    code, _, err = _run(capsys, str(root))
    assert code == EXIT_INVALID
    assert err.startswith("invalid policies:") and "org.yaml:" in err


def test_no_suite_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _policy_dir(tmp_path)
    (root / "acme" / "basics.test.yaml").unlink()
    code, _, err = _run(capsys, str(root))
    assert code == EXIT_INVALID and "no test suites" in err


def test_bad_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, str(_policy_dir(tmp_path)), "--run", "(")
    assert code == EXIT_USAGE and "--run" in err


def test_run_selects_cases_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _policy_dir(tmp_path, SUITE.replace("decision: allow", "decision: deny"))
    code, out, _ = _run(capsys, str(root), "--run", "bob|admin", "--json")
    assert code == EXIT_PASSED
    report = json.loads(out)
    assert [c["name"] for c in report["cases"]] == [
        "acme/basics/bob-may-not",
        "acme/basics/admin-errors",
    ]
    assert _run(capsys, str(root), "--run", "alice-may")[0] == EXIT_FAILED
    code, _, err = _run(capsys, str(root), "--run", "nobody")
    assert code == EXIT_USAGE and "--run 'nobody' selects no case" in err


def test_junit_xml_parses_with_one_testcase_per_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _policy_dir(tmp_path, SUITE.replace("rule: engineers", "rule: nobody"))
    junit = tmp_path / "report.xml"
    assert _run(capsys, str(root), "--junit", str(junit))[0] == EXIT_FAILED
    tree = ET.parse(junit).getroot()
    assert tree.tag == "testsuites"
    assert (tree.get("tests"), tree.get("failures")) == ("3", "1")
    (suite,) = tree.findall("testsuite")
    assert suite.get("name") == "acme/basics"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["alice-may", "bob-may-not", "admin-errors"]
    failures = [c.find("failure") for c in cases]
    assert failures[1] is None and failures[2] is None
    assert failures[0] is not None and "rule=nobody" in (failures[0].get("message") or "")
    assert "explain:" in (failures[0].text or "")


def test_coverage_counts_matched_not_matched_and_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, str(_policy_dir(tmp_path)), "--coverage", "--json")
    assert code == EXIT_PASSED
    coverage = json.loads(out)["coverage"]
    rules = coverage["organizations"]["acme"]["policies"]["tools"]
    # engineers: alice twice (repo, admin), not bob; no-delete: no case asks delete_repo;
    # broken: errors for admin.
    assert rules["engineers"] == {"layer": "org", "matched": 2, "not_matched": 1, "error": 0}
    assert rules["no-delete"] == {"layer": "org", "matched": 0, "not_matched": 0, "error": 0}
    assert rules["broken"] == {"layer": "org", "matched": 0, "not_matched": 0, "error": 1}
    assert coverage["percent"] == pytest.approx(33.33)
    code, out, _ = _run(capsys, str(_policy_dir(tmp_path / "b")), "--coverage")
    assert "acme: 33.3% of rules matched" in out
    assert "- org          tools/no-delete: not reached" in out
    assert "- org          tools/broken: error (matched 0, not matched 0, error 1)" in out


def test_coverage_min_fails_below_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _policy_dir(tmp_path)
    code, _, err = _run(capsys, str(root), "--coverage-min", "50")
    assert code == EXIT_COVERAGE and "33.3% is below --coverage-min 50%" in err
    assert _run(capsys, str(root), "--coverage-min", "33")[0] == EXIT_PASSED


def test_a_fixture_key_signs_case_tokens_verified_with_the_organizations_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = """\
kind: TestSuite
name: tokens
fixtures:
  keys:
    idp: {private_key_file: keys/idp.pem, kid: k1}
cases:
  - name: claims-reach-policies
    subject: {id: alice}
    application: bot
    integration: github
    scope: repo
    time: "2026-03-02T10:00:00Z"
    token: {key: idp, claims: {groups: [engineering]}}
    expect: {decision: allow}
  - name: expired
    subject: {id: alice}
    application: bot
    integration: github
    scope: repo
    time: "2026-03-02T10:00:00Z"
    token: {key: idp, claims: {groups: [engineering], exp: 1772400000}}
    expect: {decision: deny, code: kontext_authorization_required, layer: system}
"""
    root = _policy_dir(tmp_path, suite)
    (root / "acme" / "keys").mkdir()
    key = ed25519.Ed25519PrivateKey.generate()
    (root / "acme" / "keys" / "idp.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # The organization's own IdP key is not the suite's: the suite's keys stand in for it.
    idp_jwk = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key(), as_dict=True)
    (root / "acme" / "jwks.json").write_text(json.dumps({"keys": [{**idp_jwk, "kid": "k1"}]}))
    (root / "acme" / "organization.yaml").write_text(
        ORGANIZATION + "tokens:\n  issuer: https://idp.test\n  audience: broker\n"
        "  jwks_file: jwks.json\n"
    )
    (root / "acme" / "org.yaml").write_text(
        POLICY.replace("subject.attributes.groups", "subject.claims.groups")
    )
    code, out, _ = _run(capsys, str(root))
    assert code == EXIT_PASSED, out
    # A key asked to sign with an algorithm it cannot is refused where it is written.
    suite_file = root / "acme" / "basics.test.yaml"
    suite_file.write_text(suite.replace("kid: k1}", "kid: k1, algorithm: ES256}"))
    code, _, err = _run(capsys, str(root))
    assert code == EXIT_INVALID
    assert f"{suite_file}:5: algorithm 'ES256' does not fit this Ed25519 key (one of EdDSA)" in err


def test_suites_are_not_policy_files(tmp_path: Path) -> None:
    root = _policy_dir(tmp_path)
    policies = load_policy_set(root)
    assert policies.file_count == 2
    assert "basics.test.yaml" not in {f.relative.rsplit("/", 1)[-1] for f in policies.files_read}


def test_editing_a_suite_reloads_nothing(tmp_path: Path) -> None:
    root = _policy_dir(tmp_path)
    store = PolicyStore(DirectoryBackend(root))
    assert store.reload("startup") is ReloadResult.LOADED
    suite = root / "acme" / "basics.test.yaml"
    suite.write_text("kind: TestSuite\nname: [not, a, policy\n")  # broken even as a suite
    assert not PolicyChangeFilter(root)(str(suite))  # the watcher does not wake
    assert store.reload("edit") is ReloadResult.UNCHANGED  # and a reload reads no suite
    assert store.status().last_ok


def _keys(tmp_path: Path) -> tuple[bytes, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def test_a_bundle_signature_covers_suites(tmp_path: Path) -> None:
    root = _policy_dir(tmp_path)
    private, public = _keys(tmp_path)
    snapshot, unreadable = read_tree(root)
    assert not unreadable and "acme/basics.test.yaml" in snapshot.files
    sign_bundle(root, private, snapshot)
    assert verify_bundle(root, public) == []
    (root / "acme" / "basics.test.yaml").write_text(SUITE.replace("bob", "carol"))
    problems = verify_bundle(root, public)
    assert any("basics.test.yaml" in p for p in problems)
    with pytest.raises(PolicyLoadError, match=r"basics\.test\.yaml"):
        load_policy_set(root, bundle_public_key=public)


def test_the_example_suites_pass_and_match_every_rule(tmp_path: Path) -> None:
    """As `make test` runs them: the real CLI on a copy of policies/."""
    copy = shutil.copytree(REPOSITORY / "policies", tmp_path / "policies")
    pdp = Path(sys.executable).with_name("pdp")
    done = subprocess.run(
        [str(pdp), "test", "--coverage-min", "100", "--json", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_PASSED, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["summary"]["failed"] == 0 and report["summary"]["total"] >= 20
    assert set(report["coverage"]["organizations"]) == {"acme", "globex"}
    assert report["coverage"]["percent"] == 100.0
