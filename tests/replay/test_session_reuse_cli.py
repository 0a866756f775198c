"""`pdp replay` reusing decisions across session IDs gives the report it gives without reuse.

The log is the real audit writer's (the replay bench's generator: every record its own
session ID) plus hostile copies of its lines: other session IDs (valid, invalid, at and over
the length limit, non-ASCII, escaped), a duplicate session ID member, extra context members.
Candidate `blind` adds org rules reading every other context field in every spelling the
analysis (`policy_engine.replay.reads`) takes as not reading the session ID; candidate
`forced` is `blind` plus, in each organization, a deny rule that reads the session ID and
never matches: it decides every record as `blind` does, but replay may reuse nothing across
session IDs under it. Both reports must be the same but for the revision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from policy_engine.cli.main import EXIT_OK, main
from policy_engine.policy import load_policy_set
from policy_engine.replay import replay_files
from policy_engine.replay.bench import generate
from policy_engine.replay.reads import organizations_reading_session_id
from tests.server.harness import EXAMPLE_POLICIES

RECORDS = 450

BLIND_RULES = """
---
kind: Policy
name: context-but-not-sessions
layer: org
rules:
  - name: absent-from-ten
    effect: deny
    condition: >-
      !context.connected && (context).client_ip.startsWith("10.")
      && .context.connection != "active"
  - name: odd-attribute
    effect: deny
    condition: >-
      context.attributes.?odd.orValue(false) == true
      || has(context.attributes.session_id)
      || [context.attributes].exists(a, has(a.x) && a.x == "session_id")
"""
NEVER = """
---
kind: Policy
name: reads-sessions
layer: org
rules:
  - name: never-matches
    effect: deny
    condition: context.session_id == "zz-never-a-session"
"""

SESSIONS = [
    "",
    "other-1",
    "s" * 256,
    "s" * 257,
    "a b",
    "a\u00a0b",
    "a\u2028b",
    "a\u200bb",
    "a\x7fb",
    "é-7",
    "\U0001f680",
]


def _as_written(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f'{text[:-1]},"hash":{json.dumps(record["hash"])}}}'


def _hostile(lines: list[str]) -> list[str]:
    out = []
    for number, line in enumerate(lines):
        out.append(line)
        record = json.loads(line)
        if record.get("type") != "decision" or number % 3:
            continue
        for index, session in enumerate(SESSIONS):
            copy = json.loads(line)
            copy["context"]["session_id"] = session
            copy["decision_id"] += f"-s{index}"
            out.append(_as_written(copy))
        session = json.dumps(record["context"]["session_id"])
        member = f',"session_id":{session},'
        variants = {
            "esc": member.replace('"session_id":"', '"session_id":"\\u0061', 1),
            "bsl": member.replace('"session_id":"', '"session_id":"a\\\\', 1),
            "dup": f',"session_id":"a b"{member}',
            "dupvalid": f',"session_id":"x-1"{member[:-1]},"session_id":"a b",',
            "extra": f'{member}"sessionz":1,',
        }
        for name, replacement in variants.items():
            changed = line.replace(member, replacement, 1)
            if changed != line:
                out.append(changed.replace('"decision_id":"', f'"decision_id":"{name}-', 1))
    return out


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    written = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    generate(written, RECORDS, load_policy_set(EXAMPLE_POLICIES), distinct=True)
    lines = written.read_text(encoding="utf-8").splitlines()
    path = written.parent / "hostile.jsonl"
    path.write_text("".join(f"{line}\n" for line in _hostile(lines)), encoding="utf-8")
    return path


def _candidate(root: Path, *extra: str) -> Path:
    directory = root / "policies"
    shutil.copytree(EXAMPLE_POLICIES, directory)
    for organization in ("acme", "globex"):
        with (directory / organization / "org.yaml").open("a", encoding="utf-8") as handle:
            for text in extra:
                handle.write(text)
    return directory


def _report(log: Path, policies: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    argv = ["replay", "--audit", str(log), "--policies", str(policies), "--json"]
    assert main(argv) == EXIT_OK
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    report.pop("policy_revision")
    return report


def test_reuse_across_sessions_reports_what_no_reuse_reports(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blind = _candidate(tmp_path / "blind", BLIND_RULES)
    forced = _candidate(tmp_path / "forced", BLIND_RULES, NEVER)
    assert organizations_reading_session_id(load_policy_set(blind)) == frozenset()
    assert organizations_reading_session_id(load_policy_set(forced)) == {"acme", "globex"}
    reused = _report(log, blind, capsys)
    alone = _report(log, forced, capsys)
    assert reused == alone
    # Not vacuous: the invalid session IDs are validation denies, the rules above decide.
    assert reused["counts"]["ALLOW->DENY"] > 0
    assert "context-but-not-sessions" in json.dumps(reused["changes"])
    # ... and under `blind` the copies with valid session IDs shared their line's decision.
    replay = replay_files([log], load_policy_set(blind))
    without = replay_files([log], load_policy_set(forced))
    assert len(replay._memo) < len(without._memo)
