"""Writes small policy directories for tests: real YAML files, loaded by the real loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from policy_engine.domain.request import CheckRequest, RequestContext, Resource, Subject


class _PolicyDumper(yaml.SafeDumper):
    """Policy files may not hold anchors or aliases, so shared objects are written out in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(value: Any) -> str:
    return yaml.dump(value, Dumper=_PolicyDumper, sort_keys=False)


def write_organization(
    root: Path,
    org: str,
    *,
    integrations: list[str] | None = None,
    applications: list[str] | None = None,
    defaults: dict[str, str] | None = None,
    policies: list[dict[str, Any]] | None = None,
) -> Path:
    folder = root / org
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "kind": "Organization",
        "catalog": {
            "integrations": integrations or ["github", "linear"],
            "applications": applications or ["app"],
        },
    }
    if defaults:
        config["defaults"] = defaults
    (folder / "organization.yaml").write_text(dump_yaml(config))
    for index, policy in enumerate(policies or []):
        (folder / f"policy-{index:03d}.yaml").write_text(dump_yaml({"kind": "Policy", **policy}))
    return folder


def allow_all(layer: str, name: str | None = None) -> dict[str, Any]:
    """A policy that opens one layer, so tests can focus on another."""
    target = {"user": {"subjects": ["*"]}, "application": {"applications": ["*"]}}.get(layer, {})
    return {
        "name": name or f"open-{layer}",
        "layer": layer,
        "target": target,
        "rules": [{"name": "everything", "effect": "allow"}],
    }


def request(
    scope: str = "repo",
    *,
    organization: str = "acme",
    subject: str = "alice",
    integration: str = "github",
    application: str = "app",
    explain: bool = False,
    **attributes: Any,
) -> CheckRequest:
    return CheckRequest(
        organization=organization,
        subject=Subject(subject, attributes=attributes),
        application=Resource(application),
        integration=Resource(integration),
        scope=scope,
        context=RequestContext(),
        explain=explain,
    )


def user_policy(index: int, *, templated: bool) -> dict[str, Any]:
    """User `user-<index>`'s policy: two rules with CEL conditions. `templated` ones are the
    same text for every user (shared compile work); otherwise each embeds the user's index."""
    tag = "" if templated else f"-{index}"
    return {
        "name": f"user-{index}",
        "layer": "user",
        "target": {"subjects": [f"user-{index}"]},
        "rules": [
            {
                "name": "own-groups",
                "effect": "allow",
                "condition": f'"team{tag}" in subject.attributes.groups '
                f'&& scope.startsWith("repo{tag}")',
            },
            {
                "name": "no-admin",
                "effect": "deny",
                "condition": f'scope == "admin{tag}" || integration.id in ["slack{tag}", "x"]',
            },
        ],
    }


_MAX_USERS = 99_999  # write_user_policies: five digits in the file names


def write_user_policies(
    root: Path, org: str = "acme", count: int = 100, *, templated: bool = True
) -> Path:
    """One organization holding `count` user policies of two rules each, one file each
    (users/user-<index>.yaml), plus an org-layer and an application-layer allow-all."""
    folder = write_organization(root, org, policies=[allow_all("org"), allow_all("application")])
    users = folder / "users"
    users.mkdir(exist_ok=True)
    # One YAML dump, each index written into its text: the same bytes as a dump per policy
    # (the index only ever stands alone in a quoted or plain scalar); a dump each was most of
    # the time of writing 10,000 (6 s of CPU, now 2).
    sentinel = str(_MAX_USERS)
    template = dump_yaml({"kind": "Policy", **user_policy(_MAX_USERS, templated=templated)})
    assert template.count(sentinel) == (2 if templated else 6), template
    assert count <= _MAX_USERS, count
    for index in range(count):
        (users / f"user-{index:05d}.yaml").write_text(template.replace(sentinel, str(index)))
    return folder
