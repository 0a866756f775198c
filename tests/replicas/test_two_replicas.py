"""Two PDP replicas sharing one real Redis, each watching its own copy of the policies."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.client import check_request
from policy_engine.config import CacheSettings, Settings
from policy_engine.server.app import RunningServer, start_server
from tests.cache.support import KEY
from tests.scenarios import EXAMPLE_POLICIES

ALICE_REPO = check_request(
    "acme", "alice", "pr-reviewer", "github", "repo", subject_attributes={"groups": ["engineering"]}
)


@pytest.fixture
def replicas(tmp_path: Path, redis_server) -> Iterator[list[tuple[Path, RunningServer]]]:
    started = []
    for name in ("a", "b"):
        policies = tmp_path / name
        shutil.copytree(EXAMPLE_POLICIES, policies)
        settings = Settings(
            address="127.0.0.1:0",
            policy_dir=policies,
            threads=4,
            metrics_address="",
            cache=CacheSettings(
                redis_url=redis_server.url, redis_signing_key=KEY, local_max_entries=0
            ),
        )
        started.append((policies, start_server(settings)))
    try:
        yield started
    finally:
        for _, running in started:
            running.stop(grace=None)


def ask(port: int) -> pdp_pb2.CheckResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pdp_pb2_grpc.PolicyDecisionServiceStub(channel).Check(ALICE_REPO, timeout=5)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_replicas_share_answers_then_converge_on_a_new_revision(replicas) -> None:
    (dir_a, a), (dir_b, b) = replicas
    first = ask(a.port)
    assert first.effect == pdp_pb2.EFFECT_ALLOW and not first.cached
    from_b = ask(b.port)  # same revision, same request: B answers from A's Redis entry
    assert from_b.cached and from_b.cache_level == pdp_pb2.CACHE_LEVEL_REDIS
    assert from_b.policy_revision == first.policy_revision

    # A's operator denies `repo` first; B has not changed yet.
    deny_repo = "\n".join(
        [
            "",
            "  - name: no-repo-for-now",
            "    effect: deny",
            "    target:",
            "      scopes: [repo]",
            "",
        ]
    )
    for folder in (dir_a,):
        org = folder / "acme" / "org.yaml"
        org.write_text(org.read_text().replace("rules:\n", "rules:" + deny_repo, 1))
    assert wait_for(lambda: ask(a.port).effect == pdp_pb2.EFFECT_DENY)
    answer_a, answer_b = ask(a.port), ask(b.port)
    # Neither reads the other's revision's entries: B still answers by its own revision.
    assert answer_a.policy_revision != answer_b.policy_revision
    assert answer_b.effect == pdp_pb2.EFFECT_ALLOW and answer_b.policy_revision == (
        first.policy_revision
    )

    shutil.copy(dir_a / "acme" / "org.yaml", dir_b / "acme" / "org.yaml")
    assert wait_for(lambda: ask(b.port).policy_revision == ask(a.port).policy_revision)
    converged = ask(b.port)
    assert converged.effect == pdp_pb2.EFFECT_DENY
    assert converged.reasons[0].rule == "no-repo-for-now"
