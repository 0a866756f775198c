"""The JSON-lines file sink: rotation keeps the chain verifiable across files; restarts link."""

from __future__ import annotations

import json
from pathlib import Path

from policy_engine.audit import AuditLog
from policy_engine.audit.chain import Chain
from policy_engine.audit.keys import Signer, generate_keypair, load_private_key, load_public_key
from policy_engine.audit.sinks import FileSink, rotated_files
from policy_engine.audit.sinks.file import last_record
from policy_engine.audit.verify import verify_files
from tests.audit.support import DENY, TOKEN, make_request, read_records, settings


def signer_and_key(tmp_path: Path) -> tuple[Signer, Path]:
    private, public = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(private, public)
    return Signer(load_private_key(private)), public


def test_rotation_keeps_k_files_and_each_file_is_sealed(tmp_path: Path) -> None:
    signer, public = signer_and_key(tmp_path)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(
        settings(tmp_path, file_path=path, file_max_bytes=20_000, file_keep=3), signer=signer
    )
    audit.start()
    for i in range(400):
        audit.record(make_request(request_id=f"r{i}"), DENY, decision_id=f"d{i}")
    assert audit.close()

    rotated = rotated_files(path)
    assert len(rotated) == 3  # older ones were deleted
    for old in rotated:
        lines = old.read_text().splitlines()
        assert json.loads(lines[0])["type"] == "file_start"
        assert json.loads(lines[-1])["type"] == "checkpoint"  # every rotated file ends signed
        assert old.stat().st_size < 20_000 + 4_000  # at most one record and a checkpoint over
    assert json.loads(path.read_text().splitlines()[0])["type"] == "file_start"

    # The kept files verify together, oldest first; the deleted ones are not there, so the
    # log is PARTIAL (intact from where it begins), never OK.
    report = verify_files([*rotated, path], load_public_key(public))
    assert report.ok and report.verdict == "PARTIAL", report.render()
    assert [g.kind for g in report.gaps] == ["head_missing"]
    assert "in files not given (or deleted by file_keep)" in report.gaps[0].message
    # The chain runs on across files: no seq restarts, no gaps.
    seqs = [r["seq"] for r in read_records(*rotated, path)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # Files given in the wrong order are reported, not passed.
    assert not verify_files([path, *rotated], load_public_key(public)).ok


def test_all_files_verify_when_none_was_deleted(tmp_path: Path) -> None:
    signer, public = signer_and_key(tmp_path)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(
        settings(tmp_path, file_path=path, file_max_bytes=10_000, file_keep=100), signer=signer
    )
    audit.start()
    for i in range(100):
        audit.record(make_request(), DENY, decision_id=f"d{i}")
    assert audit.close()
    files = [*rotated_files(path), path]
    assert len(files) > 3
    report = verify_files(files, load_public_key(public))
    assert report.verdict == "OK" and report.records == 100, report.render()
    # Dropping a whole rotated file from the middle shows as a deletion.
    report = verify_files([files[0], *files[2:]], load_public_key(public))
    assert [p.kind for p in report.problems] == ["deleted"]
    text = "".join(f.read_text() for f in files)
    assert TOKEN not in text


def test_restart_appends_a_linked_segment(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for round_ in range(3):
        audit = AuditLog(settings(tmp_path, file_path=path))
        audit.start()
        for i in range(5):
            audit.record(make_request(), DENY, decision_id=f"d{round_}-{i}")
        assert audit.close()
    records = read_records(path)
    starts = [r for r in records if r["type"] == "stream_start"]
    assert len(starts) == 3
    assert starts[0]["previous"] is None
    assert starts[1]["previous"]["stream"] == starts[0]["stream"]
    assert starts[2]["previous"]["stream"] == starts[1]["stream"]
    report = verify_files([path], None)
    assert report.ok, report.render()
    assert len(report.streams) == 3


def test_torn_last_line_is_not_glued_to_the_next_segment(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(settings(tmp_path, file_path=path))
    audit.start()
    audit.record(make_request(), DENY, decision_id="d")
    assert audit.close()
    complete = last_record(path)
    with open(path, "a") as handle:
        handle.write('{"half": "a record cut by a crash')  # no newline
    sink = FileSink(path)
    state = sink.open()
    assert state.last_record == complete
    chain = Chain(signer=None, instance="h:1", sink="file")
    sink.write([chain.start(state.last_record, 0.0)])
    sink.close()
    lines = path.read_text().splitlines()
    assert lines[-2].startswith('{"half"')
    assert json.loads(lines[-1])["type"] == "stream_start"
    path.rename(tmp_path / "audit.tampered")  # the torn line does not match the schema
    report = verify_files([tmp_path / "audit.tampered"], None)
    assert [p.kind for p in report.problems] == ["malformed"]


def test_worker_placeholder_in_the_path(tmp_path: Path) -> None:
    audit = AuditLog(settings(tmp_path, file_path=tmp_path / "audit-{worker}.jsonl"), worker=3)
    audit.start()
    audit.record(make_request(), DENY, decision_id="d")
    assert audit.close()
    assert (tmp_path / "audit-3.jsonl").exists()
    # Without the placeholder, workers other than 0 still get a file of their own.
    audit = AuditLog(settings(tmp_path, file_path=tmp_path / "audit.jsonl"), worker=2)
    audit.start()
    audit.record(make_request(), DENY, decision_id="d")
    assert audit.close()
    assert (tmp_path / "audit.w2.jsonl").exists()
