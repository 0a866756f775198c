"""Reload under load: thousands of Checks while the policy files change, some saves broken.

Zero RPCs may fail, and every answer must be exactly what the revision it reports decides
(precomputed by loading each version's directory with load_policy_set and deciding), so no
answer can come from a mix of two versions or from a broken one.
"""

from __future__ import annotations

import itertools
import random
import threading
from pathlib import Path

import grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.config import ReloadSettings, Settings
from policy_engine.server.app import start_server
from tests.store.support import (
    BAD_CEL,
    BAD_YAML,
    SCOPES,
    check_request,
    expected_by_revision,
    org_policy,
    wait_for,
    write_policy_dir,
    write_text_atomically,
)

VERSIONS = [
    org_policy(["repo", "read"]),
    org_policy(["read", "write"], deny=["repo"]),
    org_policy(["repo", "write", "admin"], deny=["delete"]),
    org_policy(["read"], deny=["write", "admin"]),
]
BROKEN = [BAD_YAML, BAD_CEL, VERSIONS[2][: len(VERSIONS[2]) // 2]]
CLIENT_THREADS = 4
MIN_CHECKS = 3000
CYCLES = 2

Answer = tuple[int, tuple[str, ...]]


def _answer(response: pdp_pb2.CheckResponse) -> Answer:
    return response.effect, tuple(r.code for r in response.reasons)


def test_thousands_of_checks_during_reloads_all_succeed_and_are_consistent(
    tmp_path: Path,
) -> None:
    expected = expected_by_revision(tmp_path / "expected", VERSIONS)
    revisions = list(expected)
    assert len(set(revisions)) == len(VERSIONS)
    # Every version decides the scopes differently from the one before it: flips are visible.
    assert all(expected[a] != expected[b] for a, b in itertools.pairwise(revisions))

    root = write_policy_dir(tmp_path / "live", VERSIONS[0])
    settings = Settings(
        address="127.0.0.1:0",
        policy_dir=root,
        threads=8,
        metrics_address="",
        reload=ReloadSettings(watch=True, debounce_ms=50),
    )
    server = start_server(settings)
    target = f"127.0.0.1:{server.port}"

    lock = threading.Lock()
    checks: list[tuple[str, str, Answer]] = []  # (scope, revision, answer)
    batches: list[list[tuple[str, str, Answer]]] = []
    failures: list[str] = []
    seen_revisions: set[str] = set()
    stop = threading.Event()

    def check_client(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(target) as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            while not stop.is_set():
                scope = rng.choice(SCOPES)
                try:
                    response = stub.Check(check_request(scope), timeout=10)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"Check {scope}: {exc.code()} {exc.details()}")
                    continue
                with lock:
                    checks.append((scope, response.policy_revision, _answer(response)))
                    seen_revisions.add(response.policy_revision)

    def batch_client() -> None:
        items = [check_request(scope) for scope in SCOPES]
        with grpc.insecure_channel(target) as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            while not stop.is_set():
                try:
                    response = stub.CheckBatch(pdp_pb2.CheckBatchRequest(items=items), timeout=10)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"CheckBatch: {exc.code()} {exc.details()}")
                    continue
                results = [
                    (scope, r.policy_revision, _answer(r))
                    for scope, r in zip(SCOPES, response.results, strict=True)
                ]
                with lock:
                    batches.append(results)

    def status() -> pdp_pb2.GetStatusResponse:
        with grpc.insecure_channel(target) as channel:
            return pdp_pb2_grpc.PolicyStatusServiceStub(channel).GetStatus(
                pdp_pb2.GetStatusRequest(), timeout=10
            )

    clients = [
        threading.Thread(target=check_client, args=(seed,), daemon=True)
        for seed in range(CLIENT_THREADS)
    ] + [threading.Thread(target=batch_client, daemon=True)]
    for client in clients:
        client.start()
    try:
        org_yaml = root / "acme" / "org.yaml"
        applied = 0
        for _ in range(CYCLES):
            for index in [*range(1, len(VERSIONS)), 0]:
                broken = BROKEN[applied % len(BROKEN)]
                before = status().last_reload_at.ToNanoseconds()
                write_text_atomically(org_yaml, broken)
                wait_for(
                    lambda before=before: (
                        (s := status()).last_reload_at.ToNanoseconds() > before
                        and not s.last_reload_ok
                    ),
                    what="the broken save to be refused",
                )
                write_text_atomically(org_yaml, VERSIONS[index])
                revision = revisions[index]
                wait_for(lambda r=revision: status().revision == r, what=f"version {index}")
                wait_for(lambda r=revision: r in seen_revisions, what=f"answers from {index}")
                applied += 1
        wait_for(lambda: len(checks) >= MIN_CHECKS, timeout=60, what=f"{MIN_CHECKS} checks")
    finally:
        stop.set()
        for client in clients:
            client.join(15)
        server.stop(grace=None)

    assert failures == []
    assert len(checks) >= MIN_CHECKS and batches
    assert seen_revisions == set(revisions)
    wrong = [
        (scope, revision, answer)
        for scope, revision, answer in checks
        if expected.get(revision, {}).get(scope) != answer
    ]
    assert wrong == [], f"{len(wrong)} of {len(checks)} answers inconsistent, e.g. {wrong[:3]}"
    for results in batches:
        assert len({revision for _, revision, _ in results}) == 1, results  # one set per batch
        for scope, revision, answer in results:
            assert expected[revision][scope] == answer, (scope, revision, answer)
