"""deploy/: valid Kubernetes objects, and settings the server accepts and that fit together.

The objects are validated against the Kubernetes 1.34 schemas (kubernetes-validate, strict:
no unknown field). The container's settings are checked by `pdp config check` itself, run
with the container's environment as the kubelet would give it (the CPU limit for
`resourceFieldRef`, a sample Secret, every mount a temporary folder laid out as the kubelet
lays it out), and the fields that matter are compared with what it reports.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from policy_engine.policy import load_policy_set
from policy_engine.server.app import AUDIT_CLOSE_SECONDS, STOP_GRACE_SECONDS
from tests.deploy.manifests import (
    SAMPLE_SECRET,
    Manifest,
    build,
    container,
    container_environment,
    generator_sources,
    kustomization,
    mount_volumes,
    only,
    pod_spec,
    volume_of_mount,
)
from tests.packaging.artifacts import REPO

KUBERNETES = "1.34"
SUPERVISOR_SLACK_SECONDS = 10  # app.py: a stopping worker's slack before the supervisor kills it
SENSITIVE = re.compile(r"(REDIS_URL|SIGNING_KEY|VERIFY_KEYS|PASSWORD|TOKEN|SECRET)(_FILE)?$")


@pytest.fixture(scope="module")
def objects() -> list[Manifest]:
    return build()


@pytest.fixture(scope="module")
def deployment(objects: list[Manifest]) -> Manifest:
    return only(objects, "Deployment")


def test_every_object_is_valid_for_kubernetes(objects: list[Manifest]) -> None:
    assert {o["kind"] for o in objects} == {
        "Deployment", "Service", "PodDisruptionBudget", "ConfigMap"
    }  # fmt: skip
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc}")


def _policy_items(deployment: Manifest, policy_dir: str) -> list[Manifest]:
    return volume_of_mount(deployment, policy_dir)["configMap"]["items"]


@pytest.fixture(scope="module")
def effective(
    deployment: Manifest, objects: list[Manifest], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """`pdp config check --format json` with the container's arguments and environment; the
    settings it reports, with the mounts' folders (key `_mounts`)."""
    root = tmp_path_factory.mktemp("pod")
    mounts = mount_volumes(deployment, objects, root, SAMPLE_SECRET)
    spec = container(deployment)
    assert spec["args"][0] == "serve"
    outer = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env = {**outer, **container_environment(deployment, mounts, SAMPLE_SECRET)}
    done = subprocess.run(
        [sys.executable, "-m", "policy_engine.cli.main", "config", "check", "--format", "json",
         *spec["args"][1:]],
        capture_output=True, text=True, cwd=root, env=env,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout), "_mounts": mounts}


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_the_probes_ask_grpc_health_on_the_health_port(
    deployment: Manifest, effective: dict[str, Any]
) -> None:
    spec = container(deployment)
    health_port = _port(effective["health_address"])
    assert health_port != _port(effective["address"])
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports["health"] == health_port and ports["grpc"] == _port(effective["address"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"] == {"port": health_port}, probe  # "" = the overall status


def test_one_worker_per_core_of_the_cpu_request(
    deployment: Manifest, effective: dict[str, Any]
) -> None:
    spec = container(deployment)
    limit, request = spec["resources"]["limits"]["cpu"], spec["resources"]["requests"]["cpu"]
    assert limit == request, "requests = limits: the cores the workers count on are reserved"
    assert re.fullmatch(r"[1-9][0-9]*", limit), "whole cores: a fraction would round up"
    (workers,) = [v for v in spec["env"] if v["name"] == "PDP_WORKERS"]
    assert workers["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"
    assert "--workers" not in spec["args"]
    assert effective["workers"] == int(limit)


@pytest.mark.parametrize(
    ("cpu", "workers"),
    [
        ({"requests": "2"}, 2),  # the limit dropped (clusters that set none)
        ({"requests": "500m", "limits": "500m"}, 1),
        ({"requests": "1500m", "limits": "1500m"}, 2),
        ({"requests": "2", "limits": "4"}, 2),
    ],
)
def test_the_workers_follow_the_cpu_request_whatever_the_limit(
    deployment: Manifest, objects: list[Manifest], tmp_path: Path, cpu: dict[str, str], workers: int
) -> None:
    """PDP_WORKERS is the CPU the pod is sure of, rounded up as the kubelet rounds it. From
    `limits.cpu` it was the node's allocatable CPU when the limit is dropped, as many clusters
    prefer (64 workers of ~100 MB each in a 1 GiB container: OOM-killed at start)."""
    edited = copy.deepcopy(deployment)
    resources = container(edited)["resources"]
    for group in ("requests", "limits"):
        resources[group].pop("cpu", None)
        if group in cpu:
            resources[group]["cpu"] = cpu[group]
    mounts = mount_volumes(edited, objects, tmp_path, SAMPLE_SECRET)
    env = container_environment(edited, mounts, SAMPLE_SECRET)
    assert int(env["PDP_WORKERS"]) == workers


def test_secrets_come_from_the_secret_never_from_plain_values(
    deployment: Manifest, effective: dict[str, Any]
) -> None:
    spec = container(deployment)
    for var in spec["env"]:
        if not SENSITIVE.search(var["name"]):
            continue
        if var["name"].endswith("_FILE"):  # a path: it must lie in a Secret volume
            path = var["value"]
            mount = next(m for m in spec["volumeMounts"] if path.startswith(m["mountPath"]))
            volume = volume_of_mount(deployment, mount["mountPath"])
            assert "secret" in volume, var
            assert {i["path"] for i in volume["secret"]["items"]} == {Path(var["value"]).name}
        else:
            assert "secretKeyRef" in var.get("valueFrom", {}), var
    mounts = effective["_mounts"]
    assert effective["cache"]["redis_url"].startswith("redis://")
    assert effective["cache"]["redis_signing_key"] == "", "the key only from its file"
    assert Path(effective["cache"]["redis_signing_key_file"]).is_relative_to(
        mounts["/etc/pdp/secrets"]
    )
    mode = volume_of_mount(deployment, "/etc/pdp/secrets")["secret"]["defaultMode"]
    security = pod_spec(deployment)["securityContext"]
    assert mode & 0o040 and security["fsGroup"] == security["runAsGroup"], "readable, non-root"


def test_the_policy_directory_is_the_configmap_mount_and_serves_the_examples(
    deployment: Manifest, effective: dict[str, Any]
) -> None:
    """The served directory is the ConfigMap's mount; laid out as the kubelet lays it out
    (the shape tests/store/test_watch.py reloads through `..data` swaps), it loads the same
    files as the committed examples in policies/."""
    mounts = effective["_mounts"]
    (mount_path,) = [p for p, f in mounts.items() if Path(effective["policy_dir"]) == f]
    assert "configMap" in volume_of_mount(deployment, mount_path)
    assert not [m for m in container(deployment)["volumeMounts"] if "subPath" in m], (
        "a subPath mount is never updated: no hot reload"
    )
    deployed = load_policy_set(Path(effective["policy_dir"]))
    tracked = subprocess.run(
        ["git", "ls-files", "policies"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    examples = load_policy_set(REPO / "policies")
    expected = {f.relative for f in examples.files_read if f"policies/{f.relative}" in tracked}
    shipped = {f.relative for f in deployed.files_read}
    assert shipped == expected, (
        f"deploy/ ships {sorted(shipped - expected)} too many, lacks {sorted(expected - shipped)}:"
        " edit configMapGenerator in deploy/kustomization.yaml and the Deployment's items"
    )
    assert set(deployed.organizations) == set(examples.organizations)


def test_the_configmap_items_and_the_generator_agree(deployment: Manifest) -> None:
    (generator,) = kustomization()["configMapGenerator"]
    sources = generator_sources(generator)
    items = _policy_items(deployment, "/etc/pdp/policies")
    assert (
        volume_of_mount(deployment, "/etc/pdp/policies")["configMap"]["name"] == (generator["name"])
    )
    assert {i["key"] for i in items} == set(sources)
    for item in items:
        assert sources[item["key"]] == (REPO / "policies" / item["path"]).resolve(), item


def test_a_stop_fits_in_the_termination_grace_period(
    deployment: Manifest, effective: dict[str, Any]
) -> None:
    """SIGTERM: NOT_SERVING but answering for shutdown_wait (long enough for the readiness
    probe to see it), then calls in flight, the audit drain and the supervisor's slack; the
    kubelet's SIGKILL must come after all of it."""
    spec = container(deployment)
    wait = effective["transport"]["shutdown_wait_ms"] / 1000
    readiness = spec["readinessProbe"]
    assert wait >= readiness["periodSeconds"] * readiness["failureThreshold"]
    needed = wait + STOP_GRACE_SECONDS + AUDIT_CLOSE_SECONDS + SUPERVISOR_SLACK_SECONDS
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= needed


def test_the_pod_runs_unprivileged_on_a_read_only_root(deployment: Manifest) -> None:
    pod, spec = pod_spec(deployment), container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in spec["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"}, "the workers' metrics folder (tempfile) and nothing else"


def test_the_service_and_the_budget_select_the_pods(
    objects: list[Manifest], deployment: Manifest
) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service, budget = only(objects, "Service"), only(objects, "PodDisruptionBudget")
    assert service["spec"]["selector"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    named = {p["name"] for p in container(deployment)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
