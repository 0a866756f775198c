"""The container as the kubelet runs it: as its user (10001, no capabilities), on a read-only
root file system, with only its volumes mounted, every file of them owned and moded as the
kubelet makes them (the Secret's 0440 root:fsGroup, the ConfigMap's 0444 root:root).

No container engine runs here, so a mount namespace stands in for one: `/` remounted
read-only, the `/tmp` emptyDir a size-limited tmpfs, the ConfigMap and Secret volumes bound
read-only (under `/mnt/pod`: `/etc/pdp` does not exist on this machine and the root is
read-only), Python's install made readable as the image's is. `setpriv` drops to the pod's
user and group. The server must serve the probes, answer, export its workers' metrics and stop
on SIGTERM within the pod's grace period, writing nowhere but `/tmp`.

Needs root, `unshare` and `setpriv` (util-linux); skipped, saying so, without them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from policy_engine.api import pdp_pb2, pdp_pb2_grpc
from policy_engine.bench.redis_server import RedisServer
from policy_engine.client import check_request
from tests.deploy.manifests import (
    SAMPLE_SECRET,
    Manifest,
    build,
    container,
    container_environment,
    mount_volumes,
    only,
    pod_spec,
    volume_of_mount,
)
from tests.packaging.artifacts import REPO, health_status
from tests.store.support import free_port, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")),
    reason="needs root, unshare and setpriv to run the pod's user on a read-only root",
)

POD_ROOT = "/mnt/pod"  # where the volumes are bound inside the namespace
# The namespace: volumes bound, /tmp a tmpfs, Python readable, / read-only, then the pod's
# user. Arguments: uid, gid, tmp size, Python's prefix, the checkout, its virtualenv, then
# (mount path, folder, ro|rw) triples, "--", the command. The checkout and virtualenv (the
# image's installed package and console script) are bound back where they were after /tmp and
# /root are covered: a clone under /tmp (as CI may make it) would be hidden by the pod's /tmp.
_SANDBOX = r"""
set -eu
uid=$1 gid=$2 tmp_size=$3 prefix=$4 repo=$5 venv=$6; shift 6
mount -t tmpfs -o mode=755,size=1m pod /mnt
mkdir -p /mnt/python /mnt/repo /mnt/venv
mount --bind "$prefix" /mnt/python
mount --bind "$repo" /mnt/repo
mount --bind "$venv" /mnt/venv
case "$prefix" in /root/*)  # /root is 0700 here; the image's Python is world-readable
    mount -t tmpfs -o mode=755,size=1m root /root
    mkdir -p "$prefix"
    mount --move /mnt/python "$prefix";;
esac
while [ "$1" != "--" ]; do
    mkdir -p "/mnt/pod$1"
    mount --bind "$2" "/mnt/pod$1"
    [ "$3" = ro ] && mount -o remount,bind,ro "/mnt/pod$1"
    shift 3
done
shift
mount -t tmpfs -o "mode=1777,size=$tmp_size" tmp /tmp
mkdir -p "$repo" && mount --move /mnt/repo "$repo" && mount -o remount,bind,ro "$repo"
mkdir -p "$venv" && mount --move /mnt/venv "$venv" && mount -o remount,bind,ro "$venv"
mount -o remount,bind,ro /
mount -o remount,bind,ro /mnt
cd /tmp
exec setpriv --reuid "$uid" --regid "$gid" --clear-groups --no-new-privs "$@"
"""


def _mebibytes(quantity: str) -> str:
    assert quantity.endswith("Mi"), quantity
    return f"{int(quantity[:-2])}m"


def _own_as_the_kubelet(deployment: Manifest, mounts: dict[str, Path]) -> None:
    """Each ConfigMap/Secret volume's files root-owned with the volume's defaultMode, the
    pod's fsGroup as their group (the kubelet's AtomicWriter with fsGroup)."""
    group = pod_spec(deployment)["securityContext"]["fsGroup"]
    for mount_path, folder in mounts.items():
        volume = volume_of_mount(deployment, mount_path)
        source = volume.get("configMap") or volume.get("secret")
        if source is None:
            continue
        for path in [folder, *folder.rglob("*")]:
            if path.is_symlink():
                continue
            os.chown(path, 0, group)
            os.chmod(path, source["defaultMode"] if path.is_file() else 0o2755)


def test_the_pod_runs_as_its_user_on_a_read_only_root(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    objects = build()
    deployment = only(objects, "Deployment")
    spec = container(deployment)
    security = pod_spec(deployment)["securityContext"]
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    secret = {**SAMPLE_SECRET, "redis-url": redis_server.url}
    (tmp_path / "volumes").mkdir()
    folders = mount_volumes(deployment, objects, tmp_path / "volumes", secret)
    _own_as_the_kubelet(deployment, folders)
    inside = {p: Path("/tmp") if p == "/tmp" else Path(POD_ROOT + p) for p in folders}
    env = container_environment(deployment, inside, secret)
    ports: dict[int, int] = {}
    for name, value in env.items():
        if value.startswith("[::]:"):
            ports[int(value.rpartition(":")[2])] = port = free_port()
            env[name] = f"127.0.0.1:{port}"
    named = {p["name"]: ports[p["containerPort"]] for p in spec["ports"]}
    assert int(env["PDP_WORKERS"]) >= 2, "the deployed shape: several workers"

    triples: list[str] = []
    for mount in spec["volumeMounts"]:
        if mount["mountPath"] != "/tmp":
            mode = "ro" if mount.get("readOnly") else "rw"
            triples += [mount["mountPath"], str(folders[mount["mountPath"]]), mode]
    tmp_volume = volume_of_mount(deployment, "/tmp")["emptyDir"]
    image_env = {  # the Dockerfile's ENV, and no home (useradd --no-create-home)
        # The image's `pdp` (pip's console script) is on PATH; here the checkout's venv's.
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _SANDBOX, "pod",
        str(security["runAsUser"]), str(security["runAsGroup"]),
        _mebibytes(tmp_volume["sizeLimit"]), sys.base_prefix, str(REPO), sys.prefix, *triples, "--",
        "env", "-i", *(f"{k}={v}" for k, v in {**image_env, **env}.items()),
        "pdp", *spec["args"],  # the Dockerfile's ENTRYPOINT, the Deployment's args
    ]  # fmt: skip
    log_file = tmp_path / "pod.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log)
    try:

        def probe() -> bool:
            assert proc.poll() is None, log_file.read_text()
            return health_status(named["health"]) == health_pb2.HealthCheckResponse.SERVING

        wait_for(probe, timeout=60, interval=0.2, what="the startup probe")
        request = check_request(
            "globex", "erin", "release-bot", "github", "repo",
            subject_attributes={"groups": ["engineering"]},
        )  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{named['grpc']}") as channel:
            stub = pdp_pb2_grpc.PolicyDecisionServiceStub(channel)
            for _ in range(2):  # the second from the cache (Redis, signed with the Secret's key)
                assert stub.Check(request, timeout=10).effect == pdp_pb2.EFFECT_ALLOW
        with urllib.request.urlopen(f"http://127.0.0.1:{named['metrics']}/metrics") as reply:
            scraped = reply.read().decode()
        assert "pdp_" in scraped, "the workers' metrics, from their files in /tmp"
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=pod_spec(deployment)["terminationGracePeriodSeconds"])
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "not stopped within the grace period:\n" + log_file.read_text()
            ) from None
        assert code == 0, log_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_file.read_text()
    for trouble in ("Traceback", "Read-only file system", "Permission denied"):
        assert trouble not in output, output
