"""The benchmark harness's pure parts: framing, h2load log/summary parsing, percentiles, rows.

Nothing here starts a server or times anything; `make bench` exercises the rest end to end.
"""

from __future__ import annotations

import struct

import pytest

from policy_engine.api import pdp_pb2
from policy_engine.bench import h2load, workloads
from policy_engine.bench.cli import requests_for
from policy_engine.bench.report import RowResult, ratios, results_table

# --- gRPC framing ----------------------------------------------------------------------------


def test_frame_is_flag_then_big_endian_length_then_message() -> None:
    message = workloads.allow_tuple().SerializeToString()
    frame = h2load.grpc_frame(message)
    assert frame[0] == 0
    assert struct.unpack(">I", frame[1:5])[0] == len(message)
    assert frame[5:] == message
    assert h2load.unframe(frame) == message
    assert pdp_pb2.CheckRequest.FromString(h2load.unframe(frame)) == workloads.allow_tuple()


def test_frame_of_empty_message_and_compressed_flag() -> None:
    assert h2load.grpc_frame(b"") == b"\x00\x00\x00\x00\x00"
    assert h2load.grpc_frame(b"ab", compressed=True) == b"\x01\x00\x00\x00\x02ab"


def test_length_above_255_uses_all_four_bytes() -> None:
    frame = h2load.grpc_frame(b"x" * 70_000)
    assert frame[1:5] == (70_000).to_bytes(4, "big")


@pytest.mark.parametrize("frame", [b"\x00\x00", b"\x00\x00\x00\x00\x05abc"])
def test_unframe_rejects_truncated_frames(frame: bytes) -> None:
    with pytest.raises(ValueError):
        h2load.unframe(frame)


# --- h2load log and summary ------------------------------------------------------------------

# Three lines as nghttp2 1.52's h2load writes them (start µs, status, elapsed µs).
LOG = "1795428092205378\t200\t1807\n1795428092205381\t200\t2231\n1795428092207657\t503\t960\n"


def test_parse_log_reads_start_status_elapsed() -> None:
    entries = h2load.parse_log(LOG)
    assert entries[0] == h2load.LogEntry(1795428092205378, 200, 1807)
    assert [e.status for e in entries] == [200, 200, 503]


def test_parse_log_skips_blank_lines_and_rejects_garbage() -> None:
    assert len(h2load.parse_log(LOG + "\n\n")) == 3
    with pytest.raises(ValueError, match="line 2"):
        h2load.parse_log("1\t200\t3\n1 200 3\n")
    with pytest.raises(ValueError, match="not integers"):
        h2load.parse_log("1\tOK\t3\n")


def test_summarize_counts_non_200_and_rate_over_the_span() -> None:
    latency = h2load.summarize(h2load.parse_log(LOG))
    assert latency.count == 3
    assert latency.not_ok == 1
    assert latency.max_ms == pytest.approx(2.231)
    assert latency.p50_ms == pytest.approx(1.807)
    # From the first start (…205378) to the last finish (…207657 + 960): 3239 µs.
    assert latency.req_per_s == pytest.approx(3 / 3239e-6)


def test_summarize_rejects_an_empty_log() -> None:
    with pytest.raises(ValueError):
        h2load.summarize([])


SUMMARY = """\
finished in 4.94s, 4045.84 req/s, 420.74KB/s
requests: 20000 total, 20000 started, 20000 done, 19990 succeeded, 10 failed, 0 errored, 0 timeout
status codes: 19990 2xx, 0 3xx, 0 4xx, 10 5xx
traffic: 614.40KB (629145) total, 17.90KB (18330) headers (space savings 96.17%)
"""


def test_parse_summary() -> None:
    summary = h2load.parse_summary("starting benchmark...\n" + SUMMARY)
    assert summary == h2load.Summary(
        req_per_s=4045.84, total=20000, succeeded=19990, failed=10, errored=0, timeout=0,
        status_2xx=19990,
    )  # fmt: skip


def test_parse_summary_without_summary_lines_fails() -> None:
    with pytest.raises(ValueError):
        h2load.parse_summary("progress: 10% done\n")


# --- percentiles -----------------------------------------------------------------------------


def test_nearest_rank_percentiles_of_1_to_100() -> None:
    values = list(range(1, 101))
    assert h2load.percentile(values, 50) == 50
    assert h2load.percentile(values, 99) == 99
    assert h2load.percentile(values, 99.9) == 100
    assert h2load.percentile(values, 100) == 100
    assert h2load.percentile(values, 0.5) == 1


def test_p999_of_1000_values_is_an_observed_value() -> None:
    values = [v * 10 for v in range(1, 1001)]
    assert h2load.percentile(values, 99.9) == 9990
    assert h2load.percentile(values, 99) == 9900


def test_percentile_of_one_value_and_bad_inputs() -> None:
    assert h2load.percentile([7], 50) == 7
    assert h2load.percentile([7], 99.9) == 7
    with pytest.raises(ValueError):
        h2load.percentile([], 50)
    with pytest.raises(ValueError):
        h2load.percentile([1, 2], 0)


def test_measured_run_never_has_too_few_requests() -> None:
    shape = h2load.LoadShape(clients=8, streams=8)
    assert requests_for(10.0, 10.0, shape) == 500
    assert requests_for(4000.0, 10.0, shape) == 40_000


def test_command_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2load.shutil, "which", lambda name: "/usr/bin/h2load")
    body = h2load.Path("/tmp/b")
    cmd = h2load.grpc_command("http://h/x", body, h2load.LoadShape(), duration_s=1.5)
    assert cmd[:3] == ["/usr/bin/h2load", "-D", "1500ms"]
    assert "te: trailers" in cmd and "content-type: application/grpc" in cmd
    cmd = h2load.grpc_command("http://h/x", body, h2load.LoadShape(), requests=3)
    assert cmd[1:3] == ["-n", "8"]  # at least one request per connection
    assert cmd[-1] == "http://h/x"


# --- rows and their checks -------------------------------------------------------------------


def _response(effect: int, *layers: int) -> pdp_pb2.CheckResponse:
    return pdp_pb2.CheckResponse(
        effect=effect,
        reasons=[pdp_pb2.Reason(code="kontext_policy_denied", layer=layer) for layer in layers],
    )


def test_mixed_batch_is_half_allow_and_denies_in_every_layer() -> None:
    batch, expected = workloads.mixed_batch(100)
    assert len(batch.items) == len(expected) == 100
    assert sum(e.effect == pdp_pb2.EFFECT_ALLOW for e in expected) == 50
    assert {e.layer for e in expected if e.effect == pdp_pb2.EFFECT_DENY} == {
        pdp_pb2.LAYER_ORG, pdp_pb2.LAYER_USER, pdp_pb2.LAYER_APPLICATION,
    }  # fmt: skip


def test_checks_accept_the_expected_answer_and_name_a_wrong_one() -> None:
    deny = workloads.expect_decision(workloads.DENY_ORG_DEFAULT)
    assert deny(_response(pdp_pb2.EFFECT_DENY, pdp_pb2.LAYER_ORG)) == []
    assert "lack" in deny(_response(pdp_pb2.EFFECT_DENY, pdp_pb2.LAYER_USER))[0]
    assert "EFFECT_ALLOW" in deny(_response(pdp_pb2.EFFECT_ALLOW))[0]

    batch = workloads.expect_batch([workloads.ALLOW, workloads.DENY_ORG_DEFAULT])
    good = pdp_pb2.CheckBatchResponse(
        results=[_response(pdp_pb2.EFFECT_ALLOW), _response(pdp_pb2.EFFECT_DENY, 2)]
    )
    assert batch(good) == []
    wrong = pdp_pb2.CheckBatchResponse(results=[_response(pdp_pb2.EFFECT_ALLOW)] * 2)
    assert batch(wrong)[0].startswith("item 1:")
    assert workloads.expect_results(3)(good) == ["2 results, expected 3"]


def test_selecting_rows_adds_their_baselines_in_table_order() -> None:
    rows = workloads.default_rows()
    names = [r.name for r in workloads.select(rows, ["CheckBatch 100", "Check deny"])]
    assert names == ["empty Check", "Check deny", "empty CheckBatch 100", "CheckBatch 100"]
    with pytest.raises(KeyError):
        workloads.select(rows, ["no such row"])


def test_ratios_are_against_each_rows_baseline() -> None:
    results = [
        RowResult("empty Check", "empty Check", 1, req_per_s=4000),
        RowResult("Check allow", "empty Check", 1, req_per_s=3000),
        RowResult("CheckBatch 100", "empty CheckBatch 100", 100, req_per_s=50),
        RowResult("broken", "empty Check", 1, error="server exited\nwith code 1"),
    ]
    assert ratios(results) == {
        "empty Check": 1.0, "Check allow": 0.75, "CheckBatch 100": None, "broken": None,
    }  # fmt: skip
    assert results[2].decisions_per_s == 5000
    table = results_table(results)
    assert "| broken | FAILED: server exited with code 1 |" in table
