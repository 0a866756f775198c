"""Policy directories for the store tests: real YAML on disk, versions that decide differently.

Organization `acme` has one integration (github) and one application (app). The user and
application layers are open; the org layer (org.yaml) is what each version changes: it
allows some scopes and denies others, so the same request flips between versions.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from policy_engine.api import pdp_pb2
from policy_engine.domain.decision import Decision
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from tests.policy_builder import request

ORGANIZATION_YAML = """\
kind: Organization
organization: acme
catalog:
  integrations: [github]
  applications: [app]
"""

OPEN_LAYERS_YAML = """\
kind: Policy
name: open-user
layer: user
target:
  subjects: ["*"]
rules:
  - name: everyone
    effect: allow
---
kind: Policy
name: open-application
layer: application
target:
  applications: ["*"]
rules:
  - name: everything
    effect: allow
"""

SCOPES = ("repo", "read", "write", "admin", "delete")


def org_policy(allow: Iterable[str], deny: Iterable[str] = ()) -> str:
    """The org layer: `allow` scopes allowed for engineering, `deny` scopes always denied."""
    allowed = ", ".join(f'"{s}"' for s in allow)
    denied = ", ".join(f'"{s}"' for s in deny) or '"none-denied"'
    return f"""\
kind: Policy
name: developer-tools
layer: org
target:
  integrations: [github]
rules:
  - name: engineering-may-use-github
    effect: allow
    condition: |
      "engineering" in subject.attributes.groups && scope in [{allowed}]
  - name: forbidden-scopes
    effect: deny
    condition: scope in [{denied}]
    message: This scope is not allowed at acme.
"""


# Line 10 of org_policy's text is the first condition's CEL: `scope == ["repo"` cannot compile.
BAD_CEL = org_policy(["repo"]).replace('scope in ["repo"]', 'scope == ["repo"')
BAD_CEL_LINE = 10
BAD_YAML = 'kind: Policy\nname: developer-tools\nlayer: org\nrules: [\n  {name: "unclosed\n'


def write_text_atomically(path: Path, text: str) -> None:
    """How editors and deploy tools save: a hidden temporary file renamed over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_policy_dir(root: Path, org_yaml: str) -> Path:
    """A complete policy directory whose org layer is `org_yaml`."""
    folder = root / "acme"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "organization.yaml").write_text(ORGANIZATION_YAML)
    (folder / "open.yaml").write_text(OPEN_LAYERS_YAML)
    (folder / "org.yaml").write_text(org_yaml)
    return root


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def decide_scope(policies: CompiledPolicySet, scope: str) -> Decision:
    return decide(
        policies,
        request(scope, application="app", groups=["engineering"]),
        now=datetime.now(UTC),
    )


def expected_by_revision(
    scratch: Path, versions: Iterable[str]
) -> dict[str, dict[str, tuple[int, tuple[str, ...]]]]:
    """For each version of org.yaml, its revision and the expected answer for every scope,
    computed the way operators would with `pdp eval`: load the directory and decide."""
    expected: dict[str, dict[str, tuple[int, tuple[str, ...]]]] = {}
    for index, text in enumerate(versions):
        policies = load_policy_set(write_policy_dir(scratch / f"v{index}", text))
        answers = {}
        for scope in SCOPES:
            decision = decide_scope(policies, scope)
            effect = pdp_pb2.EFFECT_ALLOW if decision.allowed else pdp_pb2.EFFECT_DENY
            answers[scope] = (effect, tuple(r.code.value for r in decision.reasons))
        expected[policies.revision] = answers
    return expected


def check_request(scope: str, organization: str = "acme") -> pdp_pb2.CheckRequest:
    message = pdp_pb2.CheckRequest(
        organization=organization,
        subject=pdp_pb2.Subject(id="alice"),
        application=pdp_pb2.Application(id="app"),
        integration=pdp_pb2.Integration(id="github"),
        scope=scope,
    )
    message.subject.attributes.update({"groups": ["engineering"]})
    return message


T = TypeVar("T")


def wait_for(
    probe: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `probe` until it returns something truthy; fail after a generous deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or probe}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_unreadable(path: Path) -> None:
    """A policy file whose read fails. chmod cannot stop root, so as root the file is a link
    to /proc/self/mem: a regular file whose first bytes are unmapped (read() gives EIO)."""
    path.unlink(missing_ok=True)
    if os.geteuid() == 0:
        path.symlink_to("/proc/self/mem")
    else:
        path.write_text(ORGANIZATION_YAML)
        path.chmod(0)
