"""ConfigMap updates landing while the pod answers: every answer is decided by one whole
version of the policy files, never a mix, and by the revision it names.

The pod runs with the container's settings (two workers, the Secret's Redis for the decision
cache and the quota counters), as tests/deploy/test_pod.py runs it. The ConfigMap alternates
between the examples (support-copilot may use Slack: ALLOW) and an edit of one file that takes
Slack from it (DENY), each update published as the kubelet publishes it (a new version folder,
`..data` renamed over, the old folder removed) while a client calls `Check` back to back on
one connection per worker.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import grpc

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.client import check_request
from policy_engine.policy import load_policy_set
from tests.deploy.manifests import (
    loopback_pod,
    project_configmap,
    volume_of_mount,
)
from tests.packaging.artifacts import health_status, serving
from tests.store.support import wait_for

EDITED_KEY = "globex.applications.yaml"
SWAPS = 6


def _request(request_id: str) -> pdp_pb2.CheckRequest:
    return check_request(
        "globex",
        "sam",
        "support-copilot",
        "slack",
        "chat:write",
        subject_attributes={"groups": ["support"]},
        request_id=request_id,
    )


class Caller:
    """Calls `Check` back to back on `channels` (one connection each, each a worker of its
    own or not, as the kernel spreads them) until stopped; keeps every answer."""

    def __init__(self, port: int, channels: int = 4) -> None:
        self._channels = [
            grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(channels)
        ]
        self.answers: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stubs = [pdp_pb2_grpc.PolicyDecisionServiceStub(c) for c in self._channels]
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                answer = stubs[n % len(stubs)].Check(_request(f"r-{n}"), timeout=10)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code()}: {exc.details()}")
                continue
            self.answers.append((answer.effect, answer.policy_revision))

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for channel in self._channels:
            channel.close()


def test_configmap_updates_under_load_never_mix_versions(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    pod = loopback_pod(tmp_path, redis_server.url)
    objects, deployment, spec, mounts, env = (
        pod.objects, pod.deployment, pod.spec, pod.mounts, pod.env
    )  # fmt: skip
    probe_port, grpc_port = pod.probe_port, pod.grpc_port

    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    original = dict(configmap["data"])
    edited = dict(original)
    assert "integrations: [salesforce, slack]" in edited[EDITED_KEY]
    edited[EDITED_KEY] = edited[EDITED_KEY].replace(
        "integrations: [salesforce, slack]", "integrations: [salesforce]"
    )
    items = volume_of_mount(deployment, "/etc/pdp/policies")["configMap"]["items"]
    expected = {
        load_policy_set(project_configmap(tmp_path / name, data, items, "..v0")).revision: effect
        for name, data, effect in (
            ("original", original, pdp_pb2.EFFECT_ALLOW),
            ("edited", edited, pdp_pb2.EFFECT_DENY),
        )
    }
    revision_of = {id(original): next(iter(expected)), id(edited): list(expected)[1]}

    outer = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    log_file = tmp_path / "pod.log"
    command = [sys.executable, "-m", "policy_engine.cli.main", *spec["args"]]
    with serving(command, cwd=mounts["/tmp"], env={**outer, **env}, log_file=log_file) as proc:

        def probe() -> bool:
            assert proc.poll() is None, log_file.read_text()
            return health_status(probe_port) == 1  # SERVING

        wait_for(probe, timeout=60, interval=0.2, what="the startup probe")
        with Caller(grpc_port) as caller:
            wait_for(lambda: caller.answers, timeout=30, what="a first answer")
            for swap in range(SWAPS):
                data = edited if swap % 2 == 0 else original
                project_configmap(mounts["/etc/pdp/policies"], data, items, f"..v{swap + 2}")
                wanted = revision_of[id(data)]
                seen = len(caller.answers)

                def served(seen: int = seen, wanted: str = wanted) -> bool:
                    return any(rev == wanted for _, rev in caller.answers[seen:])

                wait_for(served, timeout=30, what=f"update {swap + 1} served")
            # Every worker reloads the last version: the calls end up all decided by it.
            last = revision_of[id(original if SWAPS % 2 == 0 else edited)]
            seen = len(caller.answers)
            wait_for(
                lambda: (
                    len(caller.answers) > seen + 20
                    and all(rev == last for _, rev in caller.answers[-20:])
                ),
                timeout=30,
                what="the last update served by every worker",
            )
        assert not caller.errors, caller.errors[:5]
        wrong = [(effect, rev) for effect, rev in caller.answers if expected.get(rev) != effect]
        assert not wrong, f"{len(wrong)} of {len(caller.answers)} answers: {wrong[:5]}"
        assert {rev for _, rev in caller.answers} == set(expected)
        assert "Traceback" not in log_file.read_text()
