"""SIGTERM under load, as deployed: `pdp serve --workers 2` in a subprocess, clients hammering it.

Every decision a client received an answer for must be in its worker's audit file exactly
once, and each file's chain must verify to its final signed checkpoint.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from policy_engine.api import pdp_pb2_grpc
from policy_engine.audit.keys import generate_keypair, load_public_key
from policy_engine.audit.verify import verify_files
from tests.audit.support import read_records
from tests.cache.support import tuple_request
from tests.server.harness import EXAMPLE_POLICIES, serve_process
from tests.store.support import wait_for

CLIENTS = 4


def _hammer(port: int, client: int, stop: threading.Event, answered: list[str]) -> None:
    """Check until the server stops answering; every decision ID received goes in `answered`."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            subject, groups = ("alice", ("engineering",)) if n % 2 else ("bob", ("sales",))
            msg = tuple_request(subject, groups, request_id=f"c{client}-{n}")
            try:
                answered.append(stub.Check(msg, timeout=10).decision_id)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    return  # the server is going away: nothing more will be answered
                raise


def test_sigterm_under_load_loses_no_answered_decision(tmp_path: Path) -> None:
    private, public = tmp_path / "audit.key", tmp_path / "audit.pub"
    generate_keypair(private, public)
    audit_dir = tmp_path / "audit"
    env = {
        "PDP_METRICS_ADDRESS": "",
        "PDP_AUDIT__ENABLED": "true",
        "PDP_AUDIT__FILE_PATH": str(audit_dir / "audit-{worker}.jsonl"),
        "PDP_AUDIT__SIGNING_KEY_FILE": str(private),
        "PDP_AUDIT__CHECKPOINT_EVERY": "200",
    }
    stop = threading.Event()
    answered: list[list[str]] = [[] for _ in range(CLIENTS)]
    with serve_process(tmp_path, EXAMPLE_POLICIES, workers=2, env=env) as (proc, port, log):
        clients = [
            threading.Thread(target=_hammer, args=(port, c, stop, answered[c]), daemon=True)
            for c in range(CLIENTS)
        ]
        for thread in clients:
            thread.start()
        wait_for(lambda: sum(map(len, answered)) >= 400, timeout=30, what="load to build up")
        proc.terminate()  # SIGTERM, with the clients still sending
        deadline = time.monotonic() + 60
        for thread in clients:
            thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        stop.set()
        assert proc.wait(timeout=60) == 0, log.read_text()

    received = [decision_id for ids in answered for decision_id in ids]
    assert len(received) == len(set(received))
    files = sorted(audit_dir.glob("audit-*.jsonl"))
    assert [f.name for f in files] == ["audit-0.jsonl", "audit-1.jsonl"]
    logged: Counter[str] = Counter()
    public_key = load_public_key(public)
    for path in files:
        records = read_records(path)
        logged.update(r["decision_id"] for r in records if r["type"] == "decision")
        report = verify_files([path], public_key)
        assert report.ok, report.render()
        assert records[-1]["type"] == "checkpoint", "the writer sealed the file on shutdown"
    assert not [d for d, n in logged.items() if n > 1], "a decision was logged twice"
    missing = set(received) - set(logged)
    assert not missing, f"{len(missing)} answered decisions are not in the log"
    assert len(received) >= 400
