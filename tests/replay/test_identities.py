"""`pdp replay` of external user decisions: a version 3 record keeps the namespace the
request named, so a replay asks the candidate's identity mapping exactly what the server
asked (both replay paths), and a mapping change shows as a changed decision."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy_engine.audit.record import build_record
from policy_engine.domain.request import CheckRequest, Resource, Subject, SubjectKind
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.replay import Replay
from policy_engine.replay.replay import _decide, direct_request, replay_record
from tests.engine.test_identities import write

NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    return load_policy_set(write(tmp_path_factory.mktemp("replay-identities")))


def record(policies: CompiledPolicySet, namespace: str) -> dict:
    request = CheckRequest(
        organization="acme",
        subject=Subject("partner-user-123", SubjectKind.EXTERNAL_USER, namespace=namespace),
        application=Resource("both"),
        integration=Resource("github"),
        scope="repo",
    )
    decision = decide(policies, request, now=NOW)
    return build_record(request, decision, decision_id="d", instance="test", time=NOW.timestamp())


def test_a_record_keeps_the_namespace_and_the_person(policies: CompiledPolicySet) -> None:
    carol = record(policies, "second-issuer")
    assert carol["subject"]["namespace"] == "second-issuer"
    assert carol["subject"]["mapped_id"] == "carol" and carol["decision"] == "ALLOW"
    # Without the namespace, the application's two namespaces make the request ambiguous.
    assert record(policies, "")["decision"] == "DENY"


def test_both_replay_paths_ask_the_recorded_namespace(policies: CompiledPolicySet) -> None:
    carol = record(policies, "second-issuer")
    direct = direct_request(carol, "")
    assert direct is not None and direct.subject.namespace == "second-issuer"
    assert _decide(carol, policies, "").mapped_subject_id == "carol"
    assert replay_record(carol, policies).effect.value == "ALLOW"


def test_a_mapping_change_is_a_changed_decision(
    policies: CompiledPolicySet, tmp_path: Path
) -> None:
    root = write(tmp_path)
    mappings = root / "acme" / "identities.yaml"
    mappings.write_text(mappings.read_text().replace("partner-user-123: carol", "{}"))
    mappings.write_text(mappings.read_text().replace("identities:\n  {}", "identities: {}"))
    candidate = load_policy_set(root)
    replay = Replay(candidate)
    replay.add(record(policies, "second-issuer"), "audit.jsonl:1")
    assert replay.counts["ALLOW->DENY"] == 1
