"""Tamper evidence: a real signed log, then each kind of tampering, each reported at its seq."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from policy_engine.audit import AuditLog
from policy_engine.audit.canonical import canonical
from policy_engine.audit.keys import Signer, generate_keypair, load_private_key, load_public_key
from policy_engine.audit.verify import Report, verify_files, verify_lines
from tests.audit.support import ALLOW, DENY, make_request, settings

RECORDS = 60
EVERY = 10


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("keys")
    private, public = directory / "audit.key", directory / "audit.pub"
    generate_keypair(private, public)
    return private, public


def write_log(path: Path, private: Path, count: int = RECORDS) -> list[str]:
    audit = AuditLog(
        settings(path.parent, file_path=path, checkpoint_every=EVERY),
        signer=Signer(load_private_key(private)),
    )
    audit.start()
    for i in range(count):
        audit.record(
            make_request(request_id=f"r{i}"), DENY if i % 3 else ALLOW, decision_id=f"d{i}"
        )
    assert audit.close()
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> list[str]:
    return write_log(tmp_path_factory.mktemp("log") / "audit.jsonl", keys[0])


def rehash(record: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in record.items() if k != "hash"}
    record["hash"] = hashlib.sha256(canonical(body).encode()).hexdigest()
    return record


def line_of(lines: list[str], seq: int) -> int:
    return next(i for i, line in enumerate(lines) if json.loads(line)["seq"] == seq)


def check(
    tmp_path: Path,
    lines: list[str],
    public: Path,
    change: Callable[[list[str]], list[str]] | None = None,
) -> Report:
    changed = change(list(lines)) if change else lines
    path = tmp_path / "audit.tampered"
    path.write_text("".join(f"{line}\n" for line in changed))
    report = verify_files([path], load_public_key(public))
    print(report.render())
    return report


def kinds(report: Report) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in report.problems]


def test_intact_log_verifies(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    report = check(tmp_path, intact, keys[1])
    assert report.ok
    assert report.records == RECORDS
    # stream_start + 60 records = 61, a checkpoint after every 10 sealed records, then final.
    assert report.checkpoints == len([line for line in intact if '"checkpoint"' in line])
    last = json.loads(intact[-1])
    assert last["type"] == "checkpoint" and last["final"] is True
    assert report.last_signed_seq == last["seq"]
    assert report.render().startswith(
        f"OK: {RECORDS} records, {report.checkpoints} checkpoints, last signed seq {last['seq']}"
    )
    assert not report.warnings


def test_edited_field(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    def edit(lines: list[str]) -> list[str]:
        i = line_of(lines, 7)
        record = json.loads(lines[i])
        record["decision"] = "ALLOW" if record["decision"] == "DENY" else "DENY"
        lines[i] = json.dumps(record)
        return lines

    report = check(tmp_path, intact, keys[1], edit)
    assert kinds(report) == [("edited", 7)]


def test_edited_and_rehashed_record(
    tmp_path: Path, intact: list[str], keys: tuple[Path, Path]
) -> None:
    def edit(lines: list[str]) -> list[str]:
        i = line_of(lines, 7)
        record = json.loads(lines[i])
        record["subject"]["id"] = "mallory"
        lines[i] = json.dumps(rehash(record))
        return lines

    report = check(tmp_path, intact, keys[1], edit)
    assert kinds(report) == [("altered", 8)]
    assert "seq 7" in report.problems[0].message


def test_edited_and_whole_chain_rewritten(
    tmp_path: Path, intact: list[str], keys: tuple[Path, Path]
) -> None:
    """Recomputing every later hash hides the edit from the chain, not from the signature."""

    def rewrite(lines: list[str]) -> list[str]:
        records = [json.loads(line) for line in lines]
        start = line_of(lines, 7)
        records[start]["scope"] = "admin:org"
        for i in range(start, len(records)):
            if i > start:
                records[i]["prev_hash"] = records[i - 1]["hash"]
            rehash(records[i])
        return [json.dumps(r) for r in records]

    report = check(tmp_path, intact, keys[1], rewrite)
    assert report.problems
    assert {p.kind for p in report.problems} == {"bad_signature"}
    first_checkpoint_after = min(
        json.loads(line)["seq"]
        for line in intact
        if '"checkpoint"' in line and json.loads(line)["seq"] > 7
    )
    assert report.problems[0].seq == first_checkpoint_after


def test_deleted_record(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    report = check(tmp_path, intact, keys[1], lambda lines: lines[:20] + lines[21:])
    seq = json.loads(intact[20])["seq"]
    assert kinds(report) == [("deleted", seq)]
    assert f"seq {seq} missing" in report.problems[0].message


def test_deleted_range(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    report = check(tmp_path, intact, keys[1], lambda lines: lines[:20] + lines[23:])
    seq = json.loads(intact[20])["seq"]
    assert kinds(report) == [("deleted", seq)]
    assert f"seq {seq}-{seq + 2} missing (3 record(s) deleted)" in report.problems[0].message


def test_inserted_forged_record(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    """A well-formed forgery in the right place: same seq and prev_hash as the real one."""

    def insert(lines: list[str]) -> list[str]:
        i = line_of(lines, 12)
        forged = json.loads(lines[i])
        forged["decision"], forged["reasons"] = "ALLOW", []
        forged["subject"]["id"] = "mallory"
        return [*lines[:i], json.dumps(rehash(forged)), *lines[i:]]

    report = check(tmp_path, intact, keys[1], insert)
    assert kinds(report) == [("inserted", 12)]
    assert f"audit.tampered:{line_of(intact, 12) + 1}" in report.problems[0].message


def test_inserted_stray_record(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    def insert(lines: list[str]) -> list[str]:
        forged = json.loads(lines[15])
        forged["seq"], forged["prev_hash"] = 5000, "1" * 64
        return [*lines[:15], json.dumps(rehash(forged)), *lines[15:]]

    report = check(tmp_path, intact, keys[1], insert)
    assert kinds(report) == [("inserted", 5000)]


def test_swapped_neighbours(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    def swap(lines: list[str]) -> list[str]:
        i = line_of(lines, 30)
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        return lines

    report = check(tmp_path, intact, keys[1], swap)
    assert kinds(report) == [("reordered", 31)]
    assert "seq 31" in report.problems[0].message and "seq 30" in report.problems[0].message


def test_swapped_far_apart(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    def swap(lines: list[str]) -> list[str]:
        i, j = line_of(lines, 20), line_of(lines, 25)
        lines[i], lines[j] = lines[j], lines[i]
        return lines

    report = check(tmp_path, intact, keys[1], swap)
    assert {p.kind for p in report.problems} == {"reordered"}
    assert {p.seq for p in report.problems} <= {20, 21, 25, 26}


def test_corrupted_checkpoint_signature(
    tmp_path: Path, intact: list[str], keys: tuple[Path, Path]
) -> None:
    def corrupt(lines: list[str]) -> list[str]:
        i = next(k for k, line in enumerate(lines) if '"checkpoint"' in line)
        record = json.loads(lines[i])
        signature = record["signature"]
        record["signature"] = ("0" if signature[0] != "0" else "1") + signature[1:]
        lines[i] = json.dumps(rehash(record))
        return lines

    report = check(tmp_path, intact, keys[1], corrupt)
    checkpoint_seq = json.loads(next(line for line in intact if '"checkpoint"' in line))["seq"]
    assert ("bad_signature", checkpoint_seq) in kinds(report)


def test_wrong_public_key(tmp_path: Path, intact: list[str]) -> None:
    other_private, other_public = tmp_path / "other.key", tmp_path / "other.pub"
    generate_keypair(other_private, other_public)
    report = check(tmp_path, intact, other_public)
    assert report.problems
    assert {p.kind for p in report.problems} == {"wrong_key"}


def test_cut_tail_is_a_warning_with_the_count(
    tmp_path: Path, intact: list[str], keys: tuple[Path, Path]
) -> None:
    """The documented limit: records after the last checkpoint can be cut undetected."""
    first_checkpoint = next(i for i, line in enumerate(intact) if '"checkpoint"' in line)
    kept = intact[: first_checkpoint + 4]  # three records after that checkpoint, no final one
    report = check(tmp_path, kept, keys[1])
    assert report.ok  # the chain is intact...
    assert any("3 record(s) after the last valid checkpoint" in w for w in report.warnings)
    # ...but it does not end with its final checkpoint: cut, or the writer was killed.
    assert report.verdict == "INCOMPLETE"
    assert [(g.kind, g.seq) for g in report.gaps] == [("unclosed", json.loads(kept[-1])["seq"])]
    # A log still being written (--live) has no final checkpoint yet: the open end is accepted.
    live = verify_files([tmp_path / "audit.tampered"], load_public_key(keys[1]), live=True)
    assert live.verdict == "OK", live.render()
    assert any("no final checkpoint" in n for n in live.notes)


def test_record_after_the_final_checkpoint(
    tmp_path: Path, intact: list[str], keys: tuple[Path, Path]
) -> None:
    def append(lines: list[str]) -> list[str]:
        last = json.loads(lines[-1])
        forged = json.loads(lines[-2])
        forged.update(seq=last["seq"] + 1, prev_hash=last["hash"], decision="ALLOW")
        return [*lines, json.dumps(rehash(forged))]

    report = check(tmp_path, intact, keys[1], append)
    assert ("appended", json.loads(intact[-1])["seq"] + 1) in kinds(report)


def test_head_cut(tmp_path: Path, intact: list[str], keys: tuple[Path, Path]) -> None:
    report = check(tmp_path, intact, keys[1], lambda lines: lines[3:])
    assert kinds(report) == [("cut", json.loads(intact[3])["seq"])]


def test_restart_is_a_new_linked_segment(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    path = tmp_path / "audit.jsonl"
    first = write_log(path, keys[0], count=15)
    both = write_log(path, keys[0], count=5)
    report = verify_files([path], load_public_key(keys[1]))
    assert report.ok, report.render()
    assert len(report.streams) == 2
    start = json.loads(both[len(first)])
    assert start["type"] == "stream_start"
    assert start["previous"]["seq"] == json.loads(first[-1])["seq"]
    assert start["prev_hash"] == json.loads(first[-1])["hash"]

    # Cutting the end of the first segment (its final checkpoint included) is now detected.
    cut = both[: len(first) - 3] + both[len(first) :]
    report = check(tmp_path, cut, keys[1])
    assert kinds(report) == [("deleted", json.loads(first[-3])["seq"])]


@hypothesis_settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_any_change_but_cutting_the_tail_is_reported(
    data: st.DataObject, intact: list[str], keys: tuple[Path, Path]
) -> None:
    lines = intact[:40]  # ends unsigned after the checkpoint at seq 33: a live file
    n = len(lines)
    operation = data.draw(st.sampled_from(["delete", "swap", "duplicate", "move", "edit"]))
    changed = list(lines)
    if operation == "delete":
        i = data.draw(st.integers(0, n - 2))  # not the last line: that is a tail cut
        del changed[i]
    elif operation == "swap":
        i = data.draw(st.integers(0, n - 2))
        j = data.draw(st.integers(i + 1, n - 1))
        changed[i], changed[j] = changed[j], changed[i]
    elif operation == "duplicate":
        i = data.draw(st.integers(0, n - 1))
        changed.insert(data.draw(st.integers(0, n)), lines[i])
    elif operation == "move":
        i = data.draw(st.integers(0, n - 1))
        line = changed.pop(i)
        k = data.draw(st.integers(0, n - 1).filter(lambda k: k != i))
        changed.insert(k, line)
    else:
        i = data.draw(st.integers(0, n - 1))
        record = json.loads(changed[i])
        record["time"] = "2000-01-01T00:00:00.000000Z"
        changed[i] = json.dumps(record)
    report = verify_lines(
        [(line, f"f:{k}", k == 1) for k, line in enumerate(changed, 1)],
        load_public_key(keys[1]),
    )
    assert not report.ok, f"{operation} went unnoticed"
    assert report.problems[0].where.startswith("f:")
