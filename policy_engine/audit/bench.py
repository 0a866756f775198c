"""`python -m policy_engine.audit.bench`: what the audit log costs, in-process.

Measures (1) `AuditLog.record()` on the request path, with the writer idle (a queue large
enough that nothing blocks; the writer is paused), and (2) the writer's throughput: records
per second from the queue to a file (built, chained, written, flushed), and the CPU it uses.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from policy_engine.audit import writer as writer_module
from policy_engine.audit.writer import AuditLog
from policy_engine.config import AuditSettings
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, Layer, Reason
from policy_engine.domain.request import (
    CheckRequest,
    ConnectionState,
    RequestContext,
    Resource,
    Subject,
)


def sample() -> tuple[CheckRequest, Decision]:
    request = CheckRequest(
        organization="acme",
        subject=Subject(
            "alice",
            attributes={"groups": ["engineering"], "email": "alice@acme.example"},
            access_token="eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
        ),
        application=Resource("pr-reviewer", {"owner": "platform"}),
        integration=Resource("github"),
        scope="delete_repo",
        context=RequestContext(ConnectionState.ACTIVE, "10.1.2.3", None, "sess-1"),
        request_id="req-1",
    )
    decision = Decision(
        Effect.DENY,
        (
            Reason(
                ErrorCode.POLICY_DENIED,
                Layer.ORG,
                "engineering-developer-tools",
                "no-repository-deletion",
                "Deleting repositories through an agent is not allowed at Acme.",
            ),
        ),
        "3f0c9a1b2c3d4e5f",
    )
    return request, decision


def measure(count: int, directory: Path) -> dict[str, float]:
    request, decision = sample()
    settings = AuditSettings(
        enabled=True,
        file_path=directory / "audit.jsonl",
        queue_size=count + 10,
        sink_buffer=count + 10,
        file_max_bytes=0,
    )
    # Hold the dispatcher so record() is measured alone, then let the writer run flat out.
    release = threading.Event()
    real = writer_module.encode_record

    def held(*args: Any, **kwargs: Any) -> Any:
        release.wait()
        return real(*args, **kwargs)

    writer_module.encode_record = held
    try:
        audit = AuditLog(settings)
        audit.start()
        audit.record(request, decision, decision_id="warm-up")
        time.sleep(0.05)
        started = time.perf_counter()
        for i in range(count):
            audit.record(request, decision, decision_id=f"d{i}", cache_level="local")
        record_seconds = time.perf_counter() - started
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        release.set()
        writer_module.encode_record = real
        assert audit.close(timeout=600)
        wall = time.perf_counter() - wall_started
        cpu = time.process_time() - cpu_started
    finally:
        writer_module.encode_record = real
        release.set()
    size = (directory / "audit.jsonl").stat().st_size
    return {
        "record_us": record_seconds / count * 1e6,
        "writer_records_per_s": count / wall,
        "writer_cpu_us_per_record": cpu / count * 1e6,
        "bytes_per_record": size / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        result = measure(args.count, Path(directory))
    print(f"AuditLog.record():      {result['record_us']:.2f} µs per call (request path)")
    print(f"writer to a file:       {result['writer_records_per_s']:,.0f} records/s")
    print(f"writer CPU:             {result['writer_cpu_us_per_record']:.1f} µs per record")
    print(f"record size on disk:    {result['bytes_per_record']:.0f} bytes")


if __name__ == "__main__":
    main()
