"""deploy/ read as kustomize and the kubelet would, without either (neither runs here).

`build()` renders the kustomization: its `resources`, the ConfigMaps of `configMapGenerator`
(name kept: the generator's hash suffix is off, which the tests require) and the `images`
tag. It knows only those fields and refuses any other, so the rendering cannot quietly differ
from kustomize's. `project_configmap()` lays a ConfigMap volume out as the kubelet does: the
files in a hidden version folder, the `..data` link to it, and one link per top-level entry
through `..data`, the shape the policy watcher is tested with (tests/store/test_watch.py).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.packaging.artifacts import REPO
from tests.store.support import free_port

DEPLOY = REPO / "deploy"
# The Secret `pdp-cache` the Deployment reads (made outside the repository; README, Deploying).
SAMPLE_SECRET = {"redis-url": "redis://:hunter2@redis.pdp.svc:6379/0", "signing-key": "k" * 64}
KNOWN_FIELDS = {"apiVersion", "kind", "resources", "images", "configMapGenerator"}
Manifest = dict[str, Any]


def kustomization() -> Manifest:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def generator_sources(generator: Manifest) -> dict[str, Path]:
    """A configMapGenerator's `files`: key -> source file (`key=path`, else the file name)."""
    sources: dict[str, Path] = {}
    for entry in generator["files"]:
        key, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        source = (DEPLOY / path).resolve()
        sources[key or source.name] = source
    return sources


def build() -> list[Manifest]:
    """Every object `kustomize build deploy/` gives, in order."""
    spec = kustomization()
    unknown = set(spec) - KNOWN_FIELDS
    assert not unknown, f"kustomization fields this rendering does not know: {unknown}"
    objects: list[Manifest] = []
    for resource in spec.get("resources", []):
        objects += [d for d in yaml.safe_load_all((DEPLOY / resource).read_text()) if d]
    for generator in spec.get("configMapGenerator", []):
        assert generator.get("options", {}).get("disableNameSuffixHash") is True, generator
        data = {k: p.read_text() for k, p in generator_sources(generator).items()}
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
             "data": data}
        )  # fmt: skip
    tags = {i["name"]: i["newTag"] for i in spec.get("images", [])}
    for obj in objects:
        for container in pod_spec(obj).get("containers", []) if obj["kind"] == "Deployment" else []:
            if container["image"] in tags:
                container["image"] = f"{container['image']}:{tags[container['image']]}"
    return objects


def only(objects: list[Manifest], kind: str) -> Manifest:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def pod_spec(deployment: Manifest) -> Manifest:
    return deployment["spec"]["template"]["spec"]


def container(deployment: Manifest, name: str = "pdp") -> Manifest:
    (found,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    return found


def volume_of_mount(deployment: Manifest, mount_path: str) -> Manifest:
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    return volume


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity in cores ("2", "1500m")."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# The node's allocatable CPU: what the kubelet gives for `limits.cpu` when the container sets
# no CPU limit (Kubernetes, "Expose Pod Information to Containers Through Environment
# Variables": "If CPU and memory limits are not specified ... the downward API defaults to the
# node allocatable value"). A large node, as a pod without a limit may land on.
NODE_ALLOCATABLE_CPU = "64"


def resource_field(container_spec: Manifest, resource: str, divisor: str) -> str:
    """What the kubelet puts in an env var from `resourceFieldRef` (rounded up, as it does):
    an unset limit is the node's allocatable, an unset request 0."""
    group, _, name = resource.partition(".")
    unset = NODE_ALLOCATABLE_CPU if group == "limits" else "0"
    quantity = container_spec.get("resources", {}).get(group, {}).get(name, unset)
    return str(math.ceil(cpu_cores(quantity) / cpu_cores(divisor)))


def project_configmap(
    volume: Path, data: dict[str, str], items: list[Manifest], version: str = "..v1"
) -> Path:
    """`data` laid out at `volume` as the kubelet projects a ConfigMap (or Secret) volume with
    `items`: the files in the hidden folder `version`, published by renaming a new `..data`
    link over the old one (atomic), one link per top-level entry through `..data`; the
    previous version's folder is then removed. Call again with a new `version` to update."""
    folder = volume / version
    for item in items:
        target = folder / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data[item["key"]])
    previous = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    (volume / "..data_tmp").symlink_to(version)
    os.replace(volume / "..data_tmp", volume / "..data")
    for entry in sorted({item["path"].split("/")[0] for item in items}):
        if not (volume / entry).is_symlink():
            (volume / entry).symlink_to(os.path.join("..data", entry))
    if previous is not None:
        shutil.rmtree(volume / previous)
    return volume


def mount_volumes(
    deployment: Manifest, objects: list[Manifest], root: Path, secret: dict[str, str]
) -> dict[str, Path]:
    """Each volume mount of the container as a folder under `root`, filled as the kubelet
    fills it (`secret`: the Secret's data); mount path -> folder."""
    folders: dict[str, Path] = {}
    configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    for mount in container(deployment)["volumeMounts"]:
        folder = root / mount["name"]
        folder.mkdir()
        volume = volume_of_mount(deployment, mount["mountPath"])
        if "configMap" in volume:
            source = volume["configMap"]
            project_configmap(folder, configmaps[source["name"]], source["items"])
        elif "secret" in volume:
            project_configmap(folder, secret, volume["secret"]["items"])
        folders[mount["mountPath"]] = folder
    return folders


def container_environment(
    deployment: Manifest, mounts: dict[str, Path], secret: dict[str, str]
) -> dict[str, str]:
    """The container's environment as the kubelet sets it: values (paths in a mount moved to
    its folder), resource fields rounded up as it rounds them, Secret keys from `secret`."""
    spec = container(deployment)
    env: dict[str, str] = {}
    for var in spec["env"]:
        if "value" in var:
            value = var["value"]
            for mount_path, folder in mounts.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    value = str(folder) + value[len(mount_path) :]
                    break
            env[var["name"]] = value
        elif field := var["valueFrom"].get("resourceFieldRef"):
            assert field["containerName"] == spec["name"]
            env[var["name"]] = resource_field(spec, field["resource"], field["divisor"])
        else:
            env[var["name"]] = secret[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


HOST_PORT = re.compile(r"^\[::\]:(\d+)$")  # every address of the pod


@dataclass
class LoopbackPod:
    """The Deployment's container laid out under a test's folder, its addresses moved to free
    loopback ports: what `pdp serve` needs to run it as the kubelet would, minus isolation."""

    objects: list[Manifest]
    deployment: Manifest
    spec: Manifest  # the container
    mounts: dict[str, Path]  # mount path -> folder
    env: dict[str, str]  # its environment, PDP_* addresses on 127.0.0.1
    probe_port: int  # the gRPC probes' port
    grpc_port: int


def loopback_pod(root: Path, redis_url: str) -> LoopbackPod:
    """`LoopbackPod` of the built manifests with volumes under `root` and the Secret's Redis URL
    `redis_url`; the stop does not wait (`PDP_TRANSPORT__SHUTDOWN_WAIT_MS` 0: its length is
    checked against the probes and the grace period in test_manifests)."""
    objects = build()
    deployment = only(objects, "Deployment")
    secret = {**SAMPLE_SECRET, "redis-url": redis_url}
    mounts = mount_volumes(deployment, objects, root, secret)
    env = container_environment(deployment, mounts, secret)
    ports: dict[int, int] = {}
    for name, value in env.items():
        if match := HOST_PORT.match(value):
            ports[int(match[1])] = free_port()
            env[name] = f"127.0.0.1:{ports[int(match[1])]}"
    spec = container(deployment)
    env["PDP_TRANSPORT__SHUTDOWN_WAIT_MS"] = "0"
    grpc_port = ports[next(p["containerPort"] for p in spec["ports"] if p["name"] == "grpc")]
    probe_port = ports[spec["livenessProbe"]["grpc"]["port"]]
    return LoopbackPod(objects, deployment, spec, mounts, env, probe_port, grpc_port)
