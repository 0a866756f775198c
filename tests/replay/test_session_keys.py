"""Replay leaves a valid session ID out of the keys it reuses decisions under, but only when
no condition of the candidate may read `context.session_id`: the analysis
(`may_read_session_id`) is conservative, and a log of distinct sessions with hostile session
IDs and context texts replays exactly as each record decided alone."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from policy_engine.cel import CelCompileError, compile_expression
from policy_engine.config import RequestLimits
from policy_engine.domain.request import (
    CheckRequest,
    ConnectionState,
    RequestContext,
    Resource,
    Subject,
    SubjectKind,
)
from policy_engine.engine.activation import CEL_DECLARATIONS, build_activation
from policy_engine.engine.validation import session_id_valid
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.replay import Replay, replay_files
from policy_engine.replay.bench import generate
from policy_engine.replay.reads import (
    may_read_session_id,
    organizations_reading_session_id,
    policies_may_read_session_id,
)
from policy_engine.replay.replay import _without_session
from tests.audit.support import read_records
from tests.server.harness import EXAMPLE_POLICIES

RECORDS = 1200

# Conditions that may read the session ID, however they spell it (some are conservative:
# a comprehension variable called `context` is taken for the variable).
READS = [
    'context.session_id == "s"',
    "has(context.session_id) && context.connected",
    'context["session_id"] == "s"',
    'context["session" + "_id"] == "s"',
    'context.?session_id.orValue("") == "s"',
    'context.`session_id` == "s"',
    '(context).session_id.endsWith("7")',
    '.context.session_id == "s"',
    '[context].exists(c, c.session_id == "s")',
    '[context][0].session_id == "s"',
    "context == {}",
    '"session_id" in context',
    "size(context) > 4",
    "context.size() > 4",
    '[{"session_id": "s"}].exists(context, context.session_id == "s")',
    "[1].exists(context, context == 1) && context.connected",
    'context.connected && context.session_id != ""',
    '{"k": context}.k.session_id == "s"',
    'cel.bind(c, context, c.session_id == "s")',
    'context.attributes.a == 1 || context.session_id == "s"',
]
# Conditions that cannot: every `context` is the operand of a selection of another field.
BLIND = [
    'context.client_ip.inCidr("10.20.0.0/16")',
    "!context.connected",
    'context.connection == "active"',
    "has(context.attributes.session_id)",
    'context.attributes.session_id == "s"',
    'context.attributes["session_id"] == "s"',
    '(context).connection == "active"',
    ".context.attributes.a == 1",
    'subject.attributes.context == "session_id"',
    '"context" == scope || "session_id" == scope',
    "[1, 2].exists(x, x == 2) && context.connected",
    "[context.attributes].exists(a, has(a.session_id))",
    'subject.id == "u1"',
]


@pytest.mark.parametrize("source", READS)
def test_a_condition_that_may_read_the_session_id_is_found(source: str) -> None:
    assert may_read_session_id(source)


@pytest.mark.parametrize("source", BLIND)
def test_a_condition_that_cannot_is_not(source: str) -> None:
    assert not may_read_session_id(source)


def _request(session_id: str) -> CheckRequest:
    return CheckRequest(
        organization="acme",
        subject=Subject("u1", SubjectKind.USER, {"context": "session_id"}),
        application=Resource("app"),
        integration=Resource("github"),
        scope="session_id",
        context=RequestContext(
            connection=ConnectionState.ACTIVE,
            client_ip="10.20.0.1",
            session_id=session_id,
            attributes={"session_id": "attr", "a": 1},
        ),
    )


def _value(source: str, session_id: str) -> Any:
    compiled = compile_expression(source, CEL_DECLARATIONS)
    activation = build_activation(_request(session_id), datetime(2026, 3, 2, tzinfo=UTC), {})
    try:
        return compiled.evaluate(activation)
    except Exception as exc:  # an evaluation error is a value here: compared by kind
        return type(exc)


@pytest.mark.parametrize("source", BLIND)
def test_what_is_said_not_to_read_it_does_not_depend_on_it(source: str) -> None:
    assert _value(source, "s") == _value(source, "other-7")


def test_what_is_said_to_read_it_mostly_does() -> None:
    """The analysis is not vacuous: most conditions it flags do answer otherwise."""
    differ = 0
    for source in READS:
        try:
            differ += _value(source, "s") != _value(source, "t-7")
        except CelCompileError:
            continue
    assert differ >= 8


def test_session_id_validity_is_the_engines() -> None:
    limits = RequestLimits()
    assert session_id_valid("", limits) and session_id_valid("s-1|x@y", limits)
    assert session_id_valid("s" * limits.max_id_length, limits)
    for bad in ("s" * (limits.max_id_length + 1), "a b", "a\u00a0b", "a\x7fb", "a\tb"):
        assert not session_id_valid(bad, limits), bad


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"attributes":{},"client_ip":"","connection":"active","session_id":"s1","time":null}',
            ('{"attributes":{},"client_ip":"","connection":"active"', "null"),
        ),
        (
            '{"attributes":{},"session_id":"s","time":"2026-03-02T00:00:00Z"}',
            ('{"attributes":{}', '"2026-03-02T00:00:00Z"'),
        ),
        # An invalid session ID stays in the key: it is a validation deny of its own.
        ('{"attributes":{},"session_id":"a b","time":null}', None),
        ('{"attributes":{},"session_id":"' + "s" * 257 + '","time":null}', None),
        # Escapes, a member after the session ID (the one json.loads keeps), nested look-alikes.
        ('{"attributes":{},"session_id":"a\\"b","time":null}', None),
        ('{"attributes":{},"session_id":"a\\u0020b","time":null}', None),
        ('{"session_id":"ok","time":null,"session_id":"a b"}', None),
        ('{"attributes":{"x":{"session_id":"s","time":null}},"time":null}', None),
        ('{"attributes":{"x":{"session_id":"s","time":null}}}', None),
        ('{"attributes":{},"session_id":"s","time":5}', None),
        ('{"attributes":{},"session_id":"a\\\\b","time":null}', None),
        ('{"attributes":{},"session_id":"s","time":"x\\"y"}', None),
        ('{"attributes":{},"session_id":"s\x01","time":null}', None),
        ('{"attributes":{},"session_id":"s","time":null} ', None),
        ('{"attributes":{},"session_id":"s","time":nullx}', None),
        ('{"attributes":{},"session_id":"s","time":"t"}x', None),
        ('{"session_id":"s","time":null}', None),  # no comma before: not the writer's
    ],
)
def test_what_is_left_out_of_a_context_text(text: str, expected: Any) -> None:
    assert _without_session(text) == expected


SESSION_RULE = """
---
kind: Policy
name: replay-sessions
layer: org
rules:
  - name: no-sessions-ending-in-7
    effect: deny
    condition: context.session_id.endsWith("7")
"""


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    generate(path, RECORDS, load_policy_set(EXAMPLE_POLICIES), distinct=True)
    return [r for r in read_records(path) if r["type"] == "decision"]


@pytest.fixture(scope="module")
def reading(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    directory = tmp_path_factory.mktemp("candidate") / "policies"
    shutil.copytree(EXAMPLE_POLICIES, directory)
    with (directory / "acme" / "org.yaml").open("a") as handle:
        handle.write(SESSION_RULE)
    return load_policy_set(directory)


def test_the_examples_do_not_read_it_and_a_rule_that_does_is_seen(
    reading: CompiledPolicySet,
) -> None:
    assert not policies_may_read_session_id(load_policy_set(EXAMPLE_POLICIES))
    assert policies_may_read_session_id(reading)
    assert organizations_reading_session_id(reading) == {"acme"}


def _as_written(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f'{text[:-1]},"hash":{json.dumps(record["hash"])}}}'


# Session IDs given to copies of each allowed record, after it: valid ones may share its
# decision, invalid ones are validation denies (ALLOW->DENY) and must not.
SESSIONS = ["", "other-1", "other-7", "s" * 256, "s" * 257, "a b", "a\u00a0b", "a\x7fb", "é-7"]


def _hostile_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for record in records:
        lines.append(_as_written(record))
        if record["decision"] != "ALLOW":
            continue
        for number, session in enumerate(SESSIONS):
            copy = json.loads(json.dumps(record))
            copy["context"]["session_id"] = session
            copy["decision_id"] += f"-{number}"
            lines.append(_as_written(copy))
            # The same session's next line: found by its own key (kept when its first
            # line was found without its session ID).
            copy["decision_id"] += "-again"
            lines.append(_as_written(copy))
        # A context text with a second session ID after the time (json.loads keeps it).
        line = _as_written({**record, "decision_id": record["decision_id"] + "-dup"})
        lines.append(line.replace(',"time":null}', ',"time":null,"session_id":"a b"}', 1))
        line = _as_written({**record, "decision_id": record["decision_id"] + "-dup7"})
        lines.append(line.replace(',"time":null}', ',"time":null,"session_id":"x-7"}', 1))
    return lines


@pytest.mark.parametrize("candidate", ["examples", "reading"])
def test_a_log_of_distinct_sessions_replays_as_each_record_alone(
    candidate: str,
    log: list[dict[str, Any]],
    reading: CompiledPolicySet,
    tmp_path: Path,
) -> None:
    policies = load_policy_set(EXAMPLE_POLICIES) if candidate == "examples" else reading
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(line + "\n" for line in _hostile_lines(log)), encoding="utf-8")
    replay = replay_files([path], policies)
    faithful = Replay(policies)  # record by record, keyed by every input, protobuf path
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        faithful.add(json.loads(line), f"{path}:{number}", exact_text=False)
    fast = replay.to_dict()
    assert fast == faithful.to_dict()
    assert fast["counts"]["ALLOW->DENY"] > 0  # the invalid session IDs at least
    # The copies with valid session IDs shared their record's decision, in the organizations
    # none of whose rules may read it.
    blind = {"examples": {"acme", "globex"}, "reading": {"globex"}}[candidate]
    assert replay._session_readers == {"acme", "globex"} - blind
    allowed = sum(r["decision"] == "ALLOW" and r["organization"] in blind for r in log)
    assert allowed > 10
    assert len(replay._memo) <= len(faithful._memo) - 3 * allowed
    if candidate == "reading":
        assert "replay-sessions/no-sessions-ending-in-7" in str(fast["changes"]["ALLOW->DENY"])
