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
from tests.policy_builder import dump_yaml

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


def test_a_new_person_for_the_same_answer_is_reported(
    policies: CompiledPolicySet, tmp_path: Path
) -> None:
    """partner-user-123 (partner-portal) now maps to erin, not alice: both may use the
    application, so the answer, its codes, layers and rule are the same, but the candidate
    decides for someone else. Shown as its own change kind, in the text report and --json."""
    root = write(tmp_path)
    erin = {
        "kind": "Policy",
        "name": "erin-personal",
        "layer": "user",
        "target": {"subjects": ["erin"]},
        "rules": [{"name": "erin-allows", "effect": "allow"}],
    }
    (root / "acme" / "erin.yaml").write_text(dump_yaml(erin))
    mappings = root / "acme" / "identities.yaml"
    text = mappings.read_text()
    assert text.count("partner-user-123: alice") == 1
    mappings.write_text(text.replace("partner-user-123: alice", "partner-user-123: erin"))
    replay = Replay(load_policy_set(root))
    alice = record(policies, "partner-portal")
    assert alice["subject"]["mapped_id"] == "alice" and alice["decision"] == "ALLOW"
    replay.add(alice, "audit.jsonl:1")
    replay.add(record(policies, "second-issuer"), "audit.jsonl:2")  # still carol
    report = replay.to_dict()
    assert report["counts"]["mapped_person_changed"] == 1
    assert report["counts"]["unchanged"] == 1
    groups = report["changes"]["mapped_person_changed"]
    assert groups["organization"] == {"acme": {"count": 1, "examples": ["d"]}}
    assert "mapped_person_changed (1):" in replay.render()
    # A record without mapped_id (version 1 or 2) says nothing of the person: compared as
    # before (its namespace is kept here, so that the mapping answers alike).
    older = {**alice, "schema_version": 2, "subject": dict(alice["subject"])}
    del older["subject"]["mapped_id"]
    before_v3 = Replay(load_policy_set(root))
    before_v3.add(older, "audit.jsonl:3")
    assert before_v3.counts["unchanged"] == 1


@pytest.mark.parametrize("mapped", [7, ["alice"], {"id": "alice"}, True])
def test_a_mapped_id_that_is_not_a_string_is_malformed(
    mapped: object, policies: CompiledPolicySet
) -> None:
    replay = Replay(policies)
    hostile = record(policies, "partner-portal")
    hostile["subject"]["mapped_id"] = mapped
    replay.add(hostile, "audit.jsonl:1")
    assert replay.to_dict()["unreplayable"] == {"malformed_record": {"count": 1, "examples": ["d"]}}
