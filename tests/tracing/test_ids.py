"""The call's trace and span IDs in its audit records (schema version 4: `trace_id`,
`span_id`) and in JSON log lines made inside a span: a real server, real audit files, a real
Redis URL nothing answers on (its failure is what logs inside the call).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import grpc
import pytest

from policy_engine.api import pdp_pb2
from policy_engine.audit.canonical import canonical, split
from policy_engine.audit.record import PreparedHit, PreparedRecord, build_record, encode_record
from policy_engine.audit.verify import verify_files
from policy_engine.client import check_request
from policy_engine.config import AuditSettings, CacheSettings, TracingSettings
from policy_engine.logs import make_formatter
from tests.audit.support import ALLOW, make_request, read_records, schema_errors
from tests.cache.support import KEY
from tests.store.support import free_port
from tests.tracing.support import (
    CHECK_SPAN,
    TRACE_ID,
    erin_on_github,
    ids,
    metadata,
    recording,
    serving,
    traced_settings,
)

TRACE = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")


def _joined(parts: tuple[str, ...]) -> str:
    """A record's canonical text from its Parts, without the chain fields."""
    return "{" + ",".join(part for part in parts[:4] if part) + "}"


@pytest.mark.parametrize("trace", [TRACE, None])
def test_the_fast_and_prepared_encodings_place_the_ids_as_canonical_json_does(
    trace: tuple[str, str] | None,
) -> None:
    request = make_request()
    fields = {
        "decision_id": "d-1",
        "cache_level": "local",
        "latency_ms": 0.25,
        "instance": "host:1",
        "time": 1_700_000_000.5,
    }
    record = build_record(request, ALLOW, **fields, trace=trace)  # type: ignore[arg-type]
    assert ("trace_id" in record) is (trace is not None)
    if trace is not None:
        assert (record["trace_id"], record["span_id"]) == trace
    expected = canonical(record)
    assert _joined(split(record)) == expected
    assert _joined(encode_record(request, ALLOW, **fields, trace=trace)) == expected  # type: ignore[arg-type]
    prepared = PreparedHit(PreparedRecord(request, ALLOW), request.request_id, None)
    rendered = prepared.render("d-1", "local", 0.25, "host:1", 1_700_000_000.5, trace)
    assert _joined(rendered) == expected
    assert not schema_errors(
        {**record, "stream": "ab" * 16, "seq": 1, "prev_hash": "0" * 64, "hash": "0" * 64}
    )


def test_a_record_with_a_broken_trace_id_is_refused_by_the_schema() -> None:
    record = build_record(
        make_request(), ALLOW, decision_id="d", instance="h:1", time=1.0, trace=("XYZ", "1")
    )
    chained = {**record, "stream": "ab" * 16, "seq": 1, "prev_hash": "0" * 64, "hash": "0" * 64}
    assert len(schema_errors(chained)) == 2
    del chained["span_id"]
    assert any("span_id" in error for error in schema_errors(chained))


def _audited(
    tmp_path: Path, tracing: bool
) -> tuple[list[dict[str, object]], dict[str, tuple[str, str]]]:
    """Calls through a server with the audit log on: an evaluated Check, a cached one, one
    refused as invalid, a batch of two (each with the broker's traceparent) and one without;
    the records written, and the (trace ID, span ID) of each call's span by request ID."""
    audit_file = tmp_path / "audit.jsonl"
    settings = traced_settings(
        audit=AuditSettings(enabled=True, file_path=audit_file),
        tracing=TracingSettings(enabled=tracing),
    )
    invalid = check_request("globex", "", "release-bot", "github", "repo", request_id="bad")
    batch = pdp_pb2.CheckBatchRequest(items=[erin_on_github("b-1"), erin_on_github("b-2")])
    with recording() as recorder, serving(settings) as (_running, stub):
        stub.Check(erin_on_github("fresh"), metadata=metadata(), timeout=10)
        cached = stub.Check(erin_on_github("cached"), metadata=metadata(), timeout=10)
        assert cached.cache_level == pdp_pb2.CACHE_LEVEL_LOCAL
        with pytest.raises(grpc.RpcError):
            stub.Check(invalid, metadata=metadata(), timeout=10)
        stub.CheckBatch(batch, metadata=metadata(), timeout=10)
        stub.Check(erin_on_github("own-trace"), timeout=10)
        spans = recorder.spans()
    by_request: dict[str, tuple[str, str]] = {}
    for span in spans:
        attributes = span.attributes or {}
        if "pdp.request_id" in attributes:
            by_request[str(attributes["pdp.request_id"])] = ids(span)
        elif attributes.get("rpc.method") == "CheckBatch":
            by_request["b-1"] = by_request["b-2"] = ids(span)
    report = verify_files([audit_file], None)
    assert report.ok and not report.gaps, report.problems
    return [r for r in read_records(audit_file) if r["type"] == "decision"], by_request


def test_every_audit_record_carries_its_calls_trace_and_span(tmp_path: Path) -> None:
    records, spans = _audited(tmp_path, tracing=True)
    assert sorted(str(r["request_id"]) for r in records) == sorted(
        ["fresh", "cached", "bad", "b-1", "b-2", "own-trace"]
    )
    for record in records:
        assert record["schema_version"] == 5
        trace_id, span_id = spans[str(record["request_id"])]
        assert (record["trace_id"], record["span_id"]) == (trace_id, span_id), record
        assert not schema_errors(record)
    in_broker_trace = {str(r["request_id"]) for r in records if r["trace_id"] == TRACE_ID}
    assert in_broker_trace == {"fresh", "cached", "bad", "b-1", "b-2"}
    assert {r["cache_level"] for r in records if r["request_id"] == "cached"} == {"local"}


def test_without_tracing_records_have_no_trace_fields_and_no_span_is_made(tmp_path: Path) -> None:
    records, spans = _audited(tmp_path, tracing=False)
    assert spans == {}
    assert len(records) == 6
    assert all("trace_id" not in r and "span_id" not in r for r in records)
    assert {r["schema_version"] for r in records} == {5}


def test_a_json_log_line_made_inside_a_call_carries_its_trace_and_span() -> None:
    nothing_there = f"redis://127.0.0.1:{free_port()}/0"
    settings = traced_settings(
        cache=CacheSettings(
            redis_url=nothing_there, redis_signing_key=KEY, breaker_failure_threshold=1
        ),
        log_format="json",
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter("json"))
    logger = logging.getLogger("policy_engine")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with recording() as recorder, serving(settings) as (_running, stub):
            logging.getLogger("policy_engine.test").warning("outside any span")
            # Redis refuses the connection: the cache lookup fails and its breaker opens, then
            # the quota count fails and its breaker opens (globex's quota denies then), each
            # said in the log inside its span of the call.
            answer = stub.Check(erin_on_github(), metadata=metadata(), timeout=10)
            assert [r.code for r in answer.reasons] == ["kontext_server_error"]
            [call] = recorder.wait_for_calls(CHECK_SPAN, 1)
            spans = {s.name: s for s in recorder.children(call)}
        logging.getLogger("policy_engine.test").warning("after the server stopped")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_message = {line["message"]: line for line in lines}
    cache = next(line for m, line in by_message.items() if m.startswith("redis circuit"))
    assert (cache["trace_id"], cache["span_id"]) == (TRACE_ID, ids(spans["pdp.cache.lookup"])[1])
    quota = next(line for m, line in by_message.items() if m.startswith("quota counters"))
    assert (quota["trace_id"], quota["span_id"]) == (TRACE_ID, ids(spans["pdp.quota.consume"])[1])
    assert "trace_id" not in by_message["outside any span"]
    assert "trace_id" not in by_message["after the server stopped"]
