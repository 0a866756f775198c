"""`pdp eval` decides what the server decides: one decoding of the tuple for both.

The same tuple goes through `pdp eval --json --explain` (a real subprocess) and through the
broker's client to a real gRPC server on an ephemeral port; decision, reasons and explain
trace must be identical, for every kind of attribute value. What the wire cannot carry
exactly (integers beyond 2^53 - 1) is refused by both, naming the attribute.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policy_engine.api import pdp_pb2
from policy_engine.client import PdpClient, check_request
from tests.cli.support import serving_client

ORGANIZATION = """\
kind: Organization
organization: acme
catalog:
  integrations: ["github"]
  applications: ["app"]
"""

# Every rule reads one kind of value; the user layer's only allow rule does int arithmetic,
# which errors (and so does not match) on a double: an integral float read as 3.0 by one side
# and as 3 by the other would split the decision.
POLICIES = """\
kind: Policy
name: values
layer: org
rules:
  - name: everyone
    effect: allow
  - name: safe-max
    effect: deny
    condition: subject.attributes.account == 9007199254740991
  - name: safe-min
    effect: deny
    condition: subject.attributes.account == -9007199254740991
  - name: beyond-safe
    effect: deny
    condition: subject.attributes.account == 9007199254740993
  - name: nested-admin
    effect: deny
    condition: '"admin" in subject.attributes.teams[1].roles'
  - name: unicode-name
    effect: deny
    condition: 'subject.attributes.name == "Zoë 🚀" && size(subject.attributes.name) == 5'
  - name: empty-nickname
    effect: deny
    condition: 'subject.attributes.nickname == ""'
  - name: no-manager
    effect: deny
    condition: subject.attributes.manager == null
  - name: contractor
    effect: deny
    condition: subject.attributes.contractor == true
  - name: ratio
    effect: deny
    condition: subject.attributes.ratio > 0.5
  - name: ticket
    effect: deny
    condition: 'context.attributes.ticket == "OPS-1"'
---
kind: Policy
name: levels
layer: user
target:
  subjects: ["*"]
rules:
  - name: level-three
    effect: allow
    condition: subject.attributes.level + 1 == 4
---
kind: Policy
name: labels
layer: application
target:
  applications: ["*"]
rules:
  - name: everything
    effect: allow
  - name: beta
    effect: deny
    condition: '"β" in application.attributes.labels'
"""

BASE: dict[str, dict[str, Any]] = {
    "subject": {
        "account": 1,
        "teams": [{"name": "a", "roles": ["dev"]}, {"name": "b", "roles": ["ops"]}],
        "name": "Ann",
        "nickname": "an",
        "manager": "bob",
        "contractor": False,
        "ratio": 0.25,
        "level": 3,
    },
    "application": {"labels": ["ä"]},
    "context": {"ticket": "OPS-2"},
}

# name -> (changes to BASE, the decision both must give)
TUPLES: dict[str, tuple[dict[str, dict[str, Any]], str]] = {
    "plain values": ({}, "ALLOW"),
    "integral float": ({"subject": {"level": 3.0}}, "ALLOW"),
    "negative zero": ({"subject": {"level": -0.0}}, "DENY"),
    "fractional float": ({"subject": {"level": 3.5, "ratio": 0.75}}, "DENY"),
    "largest safe integer": ({"subject": {"account": 2**53 - 1}}, "DENY"),
    "smallest safe integer": ({"subject": {"account": -(2**53 - 1)}}, "DENY"),
    "huge float": ({"subject": {"account": 1e300, "ratio": 1e300}}, "DENY"),
    "one is not true": ({"subject": {"contractor": 1}}, "ALLOW"),
    "nested, unicode, empty, null, bool": (
        {
            "subject": {
                "teams": [{"name": "a", "roles": []}, {"name": "b", "roles": ["ops", "admin"]}],
                "name": "Zoë 🚀",
                "nickname": "",
                "manager": None,
                "contractor": True,
            },
            "application": {"labels": ["β", "日本"]},
            "context": {"ticket": "OPS-1", "notes": {"empty": {}, "list": []}},
        },
        "DENY",
    ),
}


def attributes(changes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = copy.deepcopy(BASE)
    for part, values in changes.items():
        merged[part].update(values)
    return merged


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("policies")
    (root / "acme").mkdir()
    (root / "acme" / "organization.yaml").write_text(ORGANIZATION)
    (root / "acme" / "policies.yaml").write_text(POLICIES)
    return root


@pytest.fixture(scope="module")
def client(policy_dir: Path) -> Iterator[PdpClient]:
    """The broker's client, connected to a real server on an ephemeral port."""
    with serving_client(policy_dir) as pdp:
        yield pdp


def pdp_eval(policy_dir: Path, values: dict[str, dict[str, Any]]) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "policy_engine.cli.main", "eval", "--policies", str(policy_dir),
        "--org", "acme", "--subject", "alice", "--application", "app",
        "--integration", "github", "--scope", "repo", "--json", "--explain",
    ]  # fmt: skip
    for part, flag in (
        ("subject", "--subject-attr"),
        ("application", "--application-attr"),
        ("context", "--context"),
    ):
        for key, value in values[part].items():
            args += [flag, f"{key}={json.dumps(value, ensure_ascii=False)}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def grpc_request(values: dict[str, dict[str, Any]]) -> pdp_pb2.CheckRequest:
    return check_request(
        "acme",
        "alice",
        "app",
        "github",
        "repo",
        subject_attributes=values["subject"],
        application_attributes=values["application"],
        context_attributes=values["context"],
        explain=True,
    )


def _name(enum: Any, number: int, prefix: str) -> str:
    return enum.Name(number).removeprefix(prefix)


def from_grpc(response: pdp_pb2.CheckResponse) -> dict[str, Any]:
    """The answer in `pdp eval --json`'s shape (enum names as the CLI spells them)."""
    reasons = []
    for r in response.reasons:
        reason = {
            "code": r.code,
            "http_status": r.http_status,
            "layer": _name(pdp_pb2.Layer, r.layer, "LAYER_").lower(),
            "policy": r.policy,
            "rule": r.rule,
            "message": r.message,
        }
        if r.field:
            reason["field"] = r.field
        reasons.append(reason)
    explain = [
        {
            "layer": _name(pdp_pb2.Layer, layer.layer, "LAYER_").lower(),
            "effect": _name(pdp_pb2.Effect, layer.effect, "EFFECT_"),
            "by_default": layer.by_default,
            "rules": [
                {
                    "policy": rule.policy,
                    "rule": rule.rule,
                    "effect": _name(pdp_pb2.Effect, rule.effect, "EFFECT_"),
                    "result": _name(pdp_pb2.RuleResult, rule.result, "RULE_RESULT_").lower(),
                    **({"detail": rule.detail} if rule.detail else {}),
                }
                for rule in layer.rules
            ],
        }
        for layer in response.explain.layers
    ]
    return {
        "decision": _name(pdp_pb2.Effect, response.effect, "EFFECT_"),
        "reasons": reasons,
        "policy_revision": response.policy_revision,
        "explain": explain,
    }


@pytest.mark.parametrize("name", TUPLES)
def test_eval_and_the_server_give_the_same_answer(
    name: str, policy_dir: Path, client: PdpClient
) -> None:
    changes, expected = TUPLES[name]
    values = attributes(changes)
    result = pdp_eval(policy_dir, values)
    assert result.returncode == 0, result.stderr
    from_cli = json.loads(result.stdout)
    from_server = from_grpc(client.check(grpc_request(values)))
    assert from_cli == from_server
    assert from_cli["decision"] == expected


@pytest.mark.parametrize(
    ("account", "arrives_as"),
    [
        (2**53 + 1, "9007199254740992.0"),
        (-(2**53 + 1), "-9007199254740992.0"),
        (2**64 + 1, "1.8446744073709552e+19"),
    ],
    ids=["2^53+1", "-(2^53+1)", "2^64+1"],
)
def test_integers_beyond_2_53_are_refused_by_the_client_and_by_eval(
    account: int, arrives_as: str, policy_dir: Path
) -> None:
    values = attributes({"subject": {"account": account}})
    with pytest.raises(ValueError, match=r"beyond \+-\(2\^53 - 1\)") as refused:
        grpc_request(values)
    assert refused.value.path == "subject.attributes.account"  # type: ignore[attr-defined]
    assert arrives_as in str(refused.value)

    result = pdp_eval(policy_dir, values)
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert "--subject-attr" in result.stderr
    assert "subject.attributes.account" in result.stderr
    assert str(account) in result.stderr and arrives_as in result.stderr
    assert "Traceback" not in result.stderr
