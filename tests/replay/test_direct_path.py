"""Replay's direct path (record -> domain request -> engine) decides exactly as the protobuf
round trip `pdp eval` makes (record -> CheckRequest message -> bytes -> RequestConverter).

The corpus is a log the real audit writer wrote of decisions the example policies made
(allow and deny, subject tokens, context times, records that cannot be replayed), plus records
changed to hold what the round trip refuses or converts: big and fractional numbers, NaN,
deep or wide maps, non-string IDs, other spellings of connection and times, unknown keys.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.replay import Replay, replay_files, unreplayable_reason
from policy_engine.replay.bench import generate
from policy_engine.replay.replay import (
    PART_MEMO_SIZE,
    TokenReplay,
    Unreplayable,
    _Built,
    _whole_value,
    direct_request,
)
from tests.audit.support import read_records
from tests.server.harness import EXAMPLE_POLICIES

RECORDS = 1500


# A rule whose answer depends on a value's type: an integral number arrives as an int, any
# other as a double, on the server and on both replay paths alike.
TYPED_RULE = """
---
kind: Policy
name: replay-value-types
layer: org
rules:
  - name: fractional-level
    effect: deny
    condition: has(subject.attributes.level) && type(subject.attributes.level) == double
  - name: attribute-spelt-like-a-record-key
    effect: deny
    condition: |
      has(application.attributes.cache_level)
        && application.attributes.cache_level == "local"
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicySet:
    """The example policies, and in each organization the rule above."""
    directory = tmp_path_factory.mktemp("candidate") / "policies"
    shutil.copytree(EXAMPLE_POLICIES, directory)
    for org in ("acme", "globex"):
        with (directory / org / "org.yaml").open("a") as handle:
            handle.write(TYPED_RULE)
    return load_policy_set(directory)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    generate(path, RECORDS, load_policy_set(EXAMPLE_POLICIES), distinct=True)
    return path


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        parent = record
        for name in path[:-1]:
            parent = parent[name]
        parent[path[-1]] = value

    return change


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": True}
    for _ in range(levels - 1):
        value = {"next": value}
    return value


SUBJECT = ("subject", "attributes")
CONTEXT = ("context",)
# (name, change): each is applied to a copy of several corpus records.
CHANGES: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("integral float", _set((*SUBJECT, "level"), 3.0)),
    ("fraction", _set((*SUBJECT, "level"), 2.5)),
    ("huge float", _set((*SUBJECT, "level"), 1e300)),
    ("safe int edge", _set((*SUBJECT, "level"), 2**53 - 1)),
    ("unsafe int", _set((*SUBJECT, "level"), 2**53)),
    ("negative unsafe int", _set((*SUBJECT, "level"), -(2**60))),
    ("nan", _set((*SUBJECT, "level"), float("nan"))),
    ("infinity", _set((*SUBJECT, "level"), float("inf"))),
    ("bool", _set((*SUBJECT, "admin"), True)),
    ("null", _set((*SUBJECT, "manager"), None)),
    ("nested", _set((*SUBJECT, "team"), {"name": "core", "ids": [1, 2.0, [3.5, None]]})),
    ("deep map", _set((*SUBJECT, "deep"), _deep(12))),
    ("deep at the bound", _set((*SUBJECT, "deep"), _deep(9))),
    ("wide map", _set((*SUBJECT, "wide"), {f"k{i:03d}": i for i in range(70)})),
    ("wide list", _set((*SUBJECT, "groups"), [f"g{i}" for i in range(70)])),
    ("empty containers", _set((*SUBJECT, "empty"), {"m": {}, "l": []})),
    ("non-ASCII", _set((*SUBJECT, "name"), "Zoë 東京 🚀")),
    ("numeric subject ID", _set(("subject", "id"), 7)),
    ("numeric scope", _set(("scope",), 7)),
    ("null organization", _set(("organization",), None)),
    ("unknown kind", _set(("subject", "kind"), "robot")),
    ("service account", _set(("subject", "kind"), "service_account")),
    ("connection upper case", _set((*CONTEXT, "connection"), "ACTIVE")),
    ("connection bool", _set((*CONTEXT, "connection"), False)),
    ("connection unknown word", _set((*CONTEXT, "connection"), "maybe")),
    ("numeric client IP", _set((*CONTEXT, "client_ip"), 10)),
    ("context time with offset", _set((*CONTEXT, "time"), "2026-03-02T18:30:00.5+05:30")),
    ("naive context time", _set((*CONTEXT, "time"), "2026-03-02T15:00:00")),
    ("context time at year 1", _set((*CONTEXT, "time"), "0001-01-01T00:00:00+05:00")),
    ("context time at year 9999", _set((*CONTEXT, "time"), "9999-12-31T23:59:59.999999-01:00")),
    ("context time not a time", _set((*CONTEXT, "time"), "yesterday")),
    ("context time a number", _set((*CONTEXT, "time"), 5)),
    ("record time not a time", _set(("time",), "soon")),
    ("attributes not a map", _set(("application", "attributes"), ["a"])),
    ("null attributes", _set(("integration", "attributes"), None)),
    ("unknown subject key", _set(("subject", "nickname"), "al")),
    ("unknown top-level key", _set(("quota",), {"used": 3})),
    ("claims with a float", _set(("subject", "token_claims"), {"sub": "x", "n": 1.5})),
    ("token key", _set(("subject", "token_key"), {"alg": "HS256", "kid": None, "key_set": None})),
    ("token key not an object", _set(("subject", "token_key"), [1])),
    ("a mapped person", _set(("subject", "mapped_id"), "carol")),
    ("a mapped person not a string", _set(("subject", "mapped_id"), 5)),
    # Keys spelt like the record's own: a line matched by its text must not be misread.
    (
        "record keys in a subject",
        _set((*SUBJECT, "x"), {"reasons": [], "request_id": "r", "time": "t", "type": "x"}),
    ),
]


def _as_v2(record: dict[str, Any]) -> dict[str, Any]:
    """A record of a later schema as version 2 holds it: the bench's subjects have no
    identity mapping, so the subject fields later versions add hold nothing here."""
    if record["schema_version"] > 2:
        record["schema_version"] = 2
        record["subject"] = {k: v for k, v in record["subject"].items() if k in _V2_SUBJECT}
    return record


_V2_SUBJECT = {"id", "kind", "token_sha256", "token_claims", "attributes"}


def _decisions(log: Path) -> list[dict[str, Any]]:
    return [_as_v2(r) for r in read_records(log) if r["type"] == "decision"]


def _corpus(log: Path) -> Iterator[dict[str, Any]]:
    records = _decisions(log)
    yield from records
    for index, (_, change) in enumerate(CHANGES):
        for record in records[index :: len(records) // 8][:8]:
            changed = copy.deepcopy(record)
            change(changed)
            yield changed
    # Application attributes spelt like the record's own keys: read by their text, the two
    # lines of each pair would look alike but for a "cache_level" scalar, which is no input.
    for record in records[:8]:
        for level in ("none", "local"):
            changed = copy.deepcopy(record)
            changed["application"]["attributes"] = {"a": 1, "cache_level": level, "context": {}}
            changed["decision_id"] += level
            yield changed


def _outcome(tokens: TokenReplay, record: dict[str, Any], exact_text: bool) -> Any:
    try:
        return tokens.decide(record, exact_text=exact_text)
    except Unreplayable as exc:
        return exc.reason


def test_both_paths_decide_every_record_alike(log: Path, policies: CompiledPolicySet) -> None:
    tokens = TokenReplay(policies)
    direct = replayed = 0
    for record in _corpus(log):
        if unreplayable_reason(record) is not None:
            continue
        replayed += 1
        token = ""
        direct += direct_request(record, token) is not None
        assert _outcome(tokens, record, True) == _outcome(tokens, record, False), record
    # Most records take the direct path; the changed ones exercise the way back.
    assert replayed > RECORDS // 2
    assert replayed > direct > RECORDS // 2


def _as_written(record: dict[str, Any]) -> str:
    """The record as the audit writer writes it: canonical JSON, then its hash."""
    body = {k: v for k, v in record.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f'{text[:-1]},"hash":{json.dumps(record["hash"])}}}'


def _lines(log: Path, tmp_path: Path) -> Path:
    """The corpus twice as a canonical log (the second time with other decision IDs), without
    \\u escapes: the direct path may take every line, and lines seen before are reused."""
    path = tmp_path / "audit.jsonl"
    records = list(_corpus(log))
    again = [{**r, "decision_id": f"{r['decision_id']}-again"} for r in records]
    text = "".join(_as_written(record) + "\n" for record in records + again)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def test_a_replayed_log_reports_as_the_round_trip_does(
    log: Path, tmp_path: Path, policies: CompiledPolicySet
) -> None:
    path = _lines(log, tmp_path)
    replay = replay_files([path], policies)
    assert replay._lines  # lines seen before were counted from their text
    fast = replay.to_dict()
    faithful = Replay(policies)
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        faithful.add(json.loads(line), f"{path}:{number}", exact_text=False)
    assert fast == faithful.to_dict()
    assert fast["decisions"] > 2 * RECORDS
    assert {"rate_limited", "token_refused", "unrepresentable_value", "malformed_record"} <= set(
        fast["unreplayable"]
    )


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_lone_surrogate_is_unrepresentable_however_it_is_spelt(
    ensure_ascii: bool, log: Path, tmp_path: Path, policies: CompiledPolicySet
) -> None:
    """As a `\\ud800` escape, or as the bytes a lax encoder writes for it (which json.loads
    of bytes lets through): the wire cannot carry it, on either path."""
    record = next(r for r in _decisions(log) if r["reasons"] == [])
    record["subject"]["attributes"]["name"] = "\ud800"
    text = json.dumps(record, sort_keys=True, ensure_ascii=ensure_ascii)
    path = tmp_path / "audit.jsonl"
    path.write_bytes(text.encode("utf-8", "surrogatepass") + b"\n")
    report = replay_files([path], policies).to_dict()
    assert report["unreplayable"] == {
        "unrepresentable_value": {"count": 1, "examples": [record["decision_id"]]}
    }


def test_a_line_with_a_byte_order_mark_is_read_as_before(
    log: Path, tmp_path: Path, policies: CompiledPolicySet
) -> None:
    record = next(r for r in _decisions(log) if r["reasons"] == [])
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode() + b"\n")
    assert replay_files([path], policies).to_dict()["counts"]["unchanged"] == 1


@pytest.mark.parametrize("name", ["latency_ms", "seq", "schema_version"])
def test_a_number_json_cannot_read_leaves_the_line_unreadable(
    name: str, log: Path, tmp_path: Path, policies: CompiledPolicySet
) -> None:
    """A per-record number of 5,000 digits: json.loads refuses it (more than 4,300 digits), so
    the line is unreadable, though it otherwise has the writer's shape."""
    record = next(r for r in _decisions(log) if r["reasons"] == [])
    text = _as_written(record)
    spelt = f'"{name}":{json.dumps(record[name])}'
    assert text.count(spelt) == 1
    path = tmp_path / "audit.jsonl"
    path.write_text(text.replace(spelt, f'"{name}":{"7" * 5000}') + "\n")
    report = replay_files([path], policies).to_dict()
    assert report["unreplayable"] == {"unreadable_line": {"count": 1, "examples": [f"{path}:1"]}}


def test_built_values_are_kept_by_the_part_object_and_bounded() -> None:
    """Equal parts that are other objects are built again (nothing is keyed by an ID that a
    dead object's successor may take: an entry keeps its part alive); the memo is bounded."""
    calls: list[int] = []

    def build(part: dict[str, Any]) -> int:
        calls.append(part["n"])
        return part["n"] * 10

    built = _Built()
    first = {"n": 1}
    assert built.get(first, build) == built.get(first, build) == 10
    assert built.get({"n": 1}, build) == 10
    assert calls == [1, 1]
    for n in range(PART_MEMO_SIZE + 5):
        built.get({"n": n}, build)
    assert len(built._values) <= PART_MEMO_SIZE


def test_a_part_is_read_as_one_whole_value_or_not_at_all() -> None:
    assert _whole_value('{"a":[1,2.5,"x"]}') == {"a": [1, 2.5, "x"]}
    for text in ('{"a":1} ', ' {"a":1}', '{"a":1}{', '{"a":', "", "x"):
        with pytest.raises((ValueError, StopIteration)):
            _whole_value(text)


def test_lines_sharing_parts_are_each_decided_as_their_own_record(
    log: Path, tmp_path: Path, policies: CompiledPolicySet
) -> None:
    """Records read from one log share the values of equal part texts (subjects, resources,
    reasons): each is still decided as its own record, as when read alone. The log holds
    each record, then each with another record's subject, then each again."""
    records = [r for r in _decisions(log) if r["reasons"] == []][:200]
    swapped = [
        {**r, "subject": records[-1 - i]["subject"], "decision_id": r["decision_id"] + "-s"}
        for i, r in enumerate(records)
    ]
    path = tmp_path / "audit.jsonl"
    lines = [_as_written(r) + "\n" for r in records + swapped + records]
    path.write_text("".join(lines))
    replay = replay_files([path], policies)
    assert replay._parts  # parts were read once and shared
    alone = Replay(policies)
    for number, line in enumerate(lines, 1):
        alone.add(json.loads(line), f"{path}:{number}", exact_text=False)  # nothing shared
    assert replay.to_dict() == alone.to_dict()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('},"time":"', '} ,"time":"'),  # a space after the subject part
        (',"decision":', '\t,"decision":'),  # after the context part
        ('"reasons":', '"reasons": '),  # before the reasons part
    ],
)
def test_a_part_with_spaces_around_it_is_read_with_its_line(
    old: str, new: str, log: Path, tmp_path: Path, policies: CompiledPolicySet
) -> None:
    """JSON allows spaces around a value; the writer never writes them. Such a line is read
    whole, and counts as the line without them does."""
    record = next(r for r in _decisions(log) if r["reasons"] == [])
    text = _as_written(record)
    assert text.count(old) == 1
    plain, spaced = tmp_path / "plain.jsonl", tmp_path / "spaced.jsonl"
    plain.write_text(text + "\n")
    spaced.write_text(text.replace(old, new) + "\n")
    assert replay_files([spaced], policies).to_dict() == replay_files([plain], policies).to_dict()


def _at(seconds: float) -> str:
    """A record time as the writer spells it."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_token_decision_is_reused_until_its_token_expires_only(
    log: Path, tmp_path: Path, policies: CompiledPolicySet
) -> None:
    """A decision on a subject token holds from when it was made until the token's verdict
    may change (its expiry, and the clock leeway): lines with the same inputs in between
    count as it did; a line after it is decided again (the token has expired: its reason
    changes), and so is a line before the expired one (a token expired at a time has not
    at an earlier one)."""
    record = next(
        r
        for r in _decisions(log)
        if r["subject"]["token_claims"]
        and not r["context"]["time"]
        and {reason["code"] for reason in r["reasons"]} == {"kontext_policy_denied"}
    )
    expiry = record["subject"]["token_claims"]["exp"]
    made = datetime.fromisoformat(record["time"]).timestamp()
    # (the last line: before the expiry again, as a log of several servers may be ordered)
    times = [made, made + 3600, expiry - 1, expiry + 3600, made + 60]
    records = [
        {**record, "time": _at(at), "decision_id": f"{record['decision_id']}-{n}"}
        for n, at in enumerate(times)
    ]
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(_as_written(r) + "\n" for r in records))
    replay = replay_files([path], policies)
    # The first line's outcome, kept for its token's lifetime (under the line's key, and the
    # one without its session ID: the candidate's rules do not read it).
    assert len(set(replay._lines.values())) == 1
    report = replay.to_dict()
    # Denied by a policy while the token held; after it expired, for the token instead.
    assert report["counts"]["unchanged"] == 4
    assert report["counts"]["code_changed"] == 1
    faithful = Replay(policies)
    for number, r in enumerate(records, 1):
        faithful.add(copy.deepcopy(r), f"{path}:{number}", exact_text=False)
    assert report == faithful.to_dict()
    examples = report["changes"]["code_changed"]["organization"]["acme"]["examples"]
    assert examples == [f"{record['decision_id']}-3"]
