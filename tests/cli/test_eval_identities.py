"""`pdp eval` of an external user ID: the namespace flag reaches the request, and the answer
names the person the ID was decided as (text and JSON)."""

from __future__ import annotations

import json

import pytest

from policy_engine.cli.main import main
from tests.scenarios import EXAMPLE_POLICIES

BASE = [
    "eval", "--policies", str(EXAMPLE_POLICIES), "--org", "globex",
    "--subject", "partner-user-123", "--subject-kind", "external_user",
    "--subject-attr", 'groups=["support"]', "--application", "support-copilot",
    "--integration", "slack",
]  # fmt: skip


def test_eval_decides_an_external_id_as_its_person(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, "--subject-namespace", "partner-portal", "--scope", "im:history"]) == 0
    out = capsys.readouterr().out
    assert "decided as 'sam'" in out and "sam-personal rule=no-direct-messages" in out
    assert main([*BASE, "--scope", "chat:write", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["decision"] == "ALLOW" and answer["mapped_subject_id"] == "sam"


def test_eval_names_the_namespace_a_user_may_not_have(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*BASE, "--scope", "chat:write", "--json", "--subject-namespace", "contractors"]
    assert main(args) == 0  # decided: a deny
    answer = json.loads(capsys.readouterr().out)
    assert [r["rule"] for r in answer["reasons"]] == ["external-user-mode-allowed"]
    assert "mapped_subject_id" not in answer
    user = [a if a != "external_user" else "user" for a in args]
    assert main(user) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [r["field"] for r in answer["reasons"]] == ["subject.namespace"]
