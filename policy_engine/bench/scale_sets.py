"""Generated policy sets for the scale benchmark (`make bench-scale`), written to real files.

Each organization is built like the acme example (`policies/acme/`): an `organization.yaml`
with acme's catalog and every layer defaulting to deny, acme's org layer (engineering may use
GitHub and Linear, nobody deletes repositories, chat for everyone), acme's application layer
(pr-reviewer: GitHub only; standup-bot: working hours, read and write only), a glob user
policy for every subject (`subjects: ["*"]`), and one user policy per person
(`users/user-00042.yaml`) with two CEL rules:

- an allow rule whose condition reads the subject's groups and the scope,
- a deny rule for risky scopes (`admin:*`, or `admin:org` and `admin:repo_hook`).

Two variants of the same set:

- `distinct`: every condition text in the set differs (each carries its person's own
  literals: team, admin group, break-glass account), in a few different shapes, so nothing
  compiled for one rule can be reused for another;
- `templated`: every person's rules use the same few texts (three allow conditions, two deny
  conditions), as policies stamped from a template or inherited from SSO roles are.

Person `i` of organization `o` is subject `user-<i>` of organization `org-<o>` (or `acme`
when there is one organization) with groups `engineering` and `team-<g>`, where `g` is the
person's index over the whole set. With those groups, pr-reviewer, GitHub:

- scope `repo` is allowed by all three layers (every allow shape is true for it),
- scope `admin:org` is denied by the person's own deny rule (user layer).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from policy_engine.api import pdp_pb2
from policy_engine.bench.workloads import ALLOW, Expected, check_request

Variant = Literal["distinct", "templated"]
VARIANTS: tuple[Variant, ...] = ("distinct", "templated")

ALLOW_SCOPE = "repo"
DENY_SCOPE = "admin:org"
DENY_USER = Expected(pdp_pb2.EFFECT_DENY, pdp_pb2.LAYER_USER)
APPLICATION = "pr-reviewer"
INTEGRATION = "github"

ORGANIZATION_FILE = """\
kind: Organization
organization: {org}
description: Generated for the scale benchmark, shaped like acme.
defaults:
  org: deny
  user: deny
  application: deny
catalog:
  integrations: [github, linear, slack, stripe]
  applications: [pr-reviewer, standup-bot, billing-agent]
"""

# acme's org layer; `{eng}` is the extra engineering group of a distinct set's organization.
ORG_FILE = """\
kind: Policy
name: engineering-developer-tools
layer: org
description: Engineering may use GitHub and Linear.
target:
  integrations: [github, linear]
rules:
  - name: engineering-may-use-developer-tools
    effect: allow
    condition: '"engineering" in subject.attributes.groups{eng}'
  - name: no-repository-deletion
    effect: deny
    target:
      scopes: [delete_repo]
    message: Deleting repositories through an agent is not allowed.
---
kind: Policy
name: chat-for-everyone
layer: org
target:
  integrations: [slack]
rules:
  - name: employees-may-chat
    effect: allow
    condition: has(subject.attributes.groups) && size(subject.attributes.groups) > {chat}
  - name: no-slack-admin
    effect: deny
    target:
      scopes: ["admin", "admin:*"]
"""

APPLICATION_FILES = {
    "pr-reviewer.yaml": """\
kind: Policy
name: pr-reviewer-scope
layer: application
target:
  applications: [pr-reviewer]
rules:
  - name: github-only
    effect: allow
    target:
      integrations: [github]
""",
    "standup-bot.yaml": """\
kind: Policy
name: standup-bot-scope
layer: application
target:
  applications: [standup-bot]
  integrations: [linear, slack]
rules:
  - name: working-hours
    effect: allow
    condition: now.betweenHours("08:00", "{close}", "America/New_York")
  - name: read-and-write-only
    effect: deny
    condition: '!scope.startsWithAny(["read", "write", "chat:{org}"])'
""",
}

# The glob user policy every request meets: external users never administer anything.
BASELINE_FILE = """\
kind: Policy
name: sso-baseline
layer: user
target:
  subjects: ["*"]
rules:
  - name: no-admin-for-external-users
    effect: deny
    condition: subject.kind == "external_user" && scope.startsWith("admin{suffix}")
"""

USER_FILE = """\
kind: Policy
name: user-{i}-personal
layer: user
target:
  subjects: [user-{i}]
rules:
  - name: my-applications-may-work
    effect: allow
    condition: '{allow}'
  - name: no-risky-scopes
    effect: deny
    target:
      scopes: {deny_scopes}
    condition: '{deny}'
    message: user-{i} does not let applications administer anything.
"""

# Every shape is true for the allowed tuple (groups engineering and team-<g>, scope repo).
DISTINCT_ALLOW = (
    '"team-{g}" in subject.attributes.groups && scope.startsWith("repo")',
    'subject.attributes.groups.exists(x, x == "team-{g}") && scope != "secret-{g}"',
    'has(subject.attributes.groups) && "team-{g}" in subject.attributes.groups'
    " && size(scope) < {limit}",
    '("team-{g}" in subject.attributes.groups || subject.id == "owner-{g}")'
    ' && scope.startsWithAny(["repo", "read:{g}"])',
)
# Every shape is true for the denied tuple (scope admin:org, no admin group).
DISTINCT_DENY = (
    '!("admins-{g}" in subject.attributes.groups)',
    'scope.startsWith("admin") && subject.id != "break-glass-{g}"',
    'subject.kind == "user" && !scope.endsWith(":team-{g}")',
)
TEMPLATED_ALLOW = (
    '"engineering" in subject.attributes.groups && scope.startsWithAny(["repo", "read:"])',
    'has(subject.attributes.groups) && "engineering" in subject.attributes.groups',
    'subject.attributes.groups.exists(x, x == "engineering") && scope != "secret"',
)
TEMPLATED_DENY = (
    '!("org-admins" in subject.attributes.groups)',
    'scope.startsWith("admin") && subject.id != "break-glass"',
)
DENY_SCOPES = ('["admin:*"]', '["admin:org", "admin:repo_hook"]')


@dataclass(frozen=True, slots=True)
class SetSpec:
    """One generated set: `users` user policies in each of `organizations` organizations."""

    users: int
    variant: Variant
    organizations: int = 1

    def __post_init__(self) -> None:
        if self.users < 1 or self.organizations < 1:
            raise ValueError("a set needs at least one organization and one user")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}: {self.variant!r}")

    @property
    def user_policies(self) -> int:
        return self.users * self.organizations

    @property
    def name(self) -> str:
        if self.organizations == 1:
            return f"{self.users:,} users, {self.variant}"
        return f"{self.organizations:,} orgs x {self.users:,} users, {self.variant}"

    @property
    def slug(self) -> str:
        return f"o{self.organizations}-u{self.users}-{self.variant}"

    def organization(self, o: int) -> str:
        return "acme" if self.organizations == 1 else f"org-{o:05d}"

    def global_index(self, o: int, i: int) -> int:
        return o * self.users + i


@dataclass(frozen=True, slots=True)
class Probe:
    """A request the benchmark sends, and the decision it must get."""

    label: str
    request: pdp_pb2.CheckRequest
    expected: Expected


@dataclass(frozen=True, slots=True)
class Edit:
    """One user's policy file and the edit that flips their allowed tuple to a user-layer deny.

    `flipped` narrows the allow rule with a new condition text (so the edit costs a real
    compile, as an edited condition does); writing `original` back flips the answer again.
    """

    path: Path
    original: str
    flipped: str
    probe: Probe  # allowed before the edit
    after: Expected  # what the probe gets once the edit is served


@dataclass(frozen=True, slots=True)
class GeneratedSet:
    """A set written under `root`: its counts, the probes to load it with, the edit to make."""

    spec: SetSpec
    root: Path
    files: int
    bytes: int
    rules: int
    probes: tuple[Probe, ...]
    edit: Edit


def _person(spec: SetSpec, o: int, i: int) -> tuple[str, str]:
    """The allow and deny condition texts of person `i` of organization `o`."""
    g = spec.global_index(o, i)
    if spec.variant == "templated":
        return TEMPLATED_ALLOW[g % len(TEMPLATED_ALLOW)], TEMPLATED_DENY[g % len(TEMPLATED_DENY)]
    allow = DISTINCT_ALLOW[g % len(DISTINCT_ALLOW)].format(g=g, limit=100 + g)
    deny = DISTINCT_DENY[g % len(DISTINCT_DENY)].format(g=g)
    return allow, deny


def user_file(spec: SetSpec, o: int, i: int, *, allow_suffix: str = "") -> str:
    """The YAML of person `i`'s policy; `allow_suffix` is appended to the allow condition."""
    allow, deny = _person(spec, o, i)
    g = spec.global_index(o, i)
    return USER_FILE.format(
        i=i,
        allow=allow.replace("'", "''") + allow_suffix,
        deny=deny.replace("'", "''"),
        deny_scopes=DENY_SCOPES[(g // 7) % len(DENY_SCOPES)],
    )


def _organization_files(spec: SetSpec, o: int) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every file of organization `o`, users last."""
    org = spec.organization(o)
    distinct = spec.variant == "distinct"
    yield "organization.yaml", ORGANIZATION_FILE.format(org=org)
    yield (
        "org.yaml",
        ORG_FILE.format(
            eng=(f' || "eng-{o}" in subject.attributes.groups' if distinct else ""),
            chat=(-1 - o if distinct else 0),
        ),
    )
    for name, text in APPLICATION_FILES.items():
        close = f"{19 + o % 4}:{o // 4 % 60:02d}" if distinct else "19:00"
        yield f"applications/{name}", text.format(close=close, org=o if distinct else "")
    yield "users/baseline.yaml", BASELINE_FILE.format(suffix=f":{o}" if distinct else "")
    width = max(5, len(str(spec.users - 1)))
    for i in range(spec.users):
        yield f"users/user-{i:0{width}d}.yaml", user_file(spec, o, i)


def probe_for(spec: SetSpec, o: int, i: int, *, allowed: bool) -> Probe:
    """Person `i` of organization `o` asking for `repo` (allowed) or `admin:org` (denied)."""
    g = spec.global_index(o, i)
    scope = ALLOW_SCOPE if allowed else DENY_SCOPE
    request = check_request(
        f"user-{i}",
        ["engineering", f"team-{g}"],
        INTEGRATION,
        scope,
        application=APPLICATION,
        organization=spec.organization(o),
    )
    label = f"{spec.organization(o)}/user-{i} {scope}"
    return Probe(label, request, ALLOW if allowed else DENY_USER)


def spread(spec: SetSpec, count: int) -> list[tuple[int, int]]:
    """`count` (organization, person) pairs spread evenly over the set, never the person
    `edit_person` picks (when there is anyone else), all different when the set has more
    people than `count`. With at least `count` organizations (more than `count` when each has
    one person), each pick is in another one."""
    edit = spec.global_index(*edit_person(spec))
    total = spec.user_policies
    picks: list[tuple[int, int]] = []
    for k in range(count):
        if spec.organizations >= count and spec.users > 1:
            o = (k * spec.organizations) // count + (spec.organizations // count) // 2
            i = ((k * spec.users) // count + spec.users // 2) % spec.users
            if spec.global_index(o, i) == edit:
                i = (i + 1) % spec.users
            picks.append((o, i))
            continue
        others = max(total - 1, 1)  # everyone but the edited person
        g = (k * others) // count + (others // count) // 2
        if total > 1 and g >= edit:
            g += 1
        picks.append(divmod(g, spec.users))
    return picks


def edit_person(spec: SetSpec) -> tuple[int, int]:
    """The (organization, person) whose file the benchmark edits: two thirds into the set."""
    return divmod((spec.user_policies * 2) // 3, spec.users)


def probes(spec: SetSpec, count: int) -> tuple[Probe, ...]:
    """`count` probes over different people spread across the set, alternately allowed and
    denied (so the load is not one hot subject, and both outcomes are decided)."""
    return tuple(
        probe_for(spec, o, i, allowed=(k % 2 == 0)) for k, (o, i) in enumerate(spread(spec, count))
    )


def write_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a hidden temporary file renamed into place, so a
    watching server never reads it half-written."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def generate(spec: SetSpec, root: Path, *, probe_count: int = 8) -> GeneratedSet:
    """Write `spec`'s set into `root` (created; must not hold another set) and describe it.

    Raises FileExistsError if `root` exists and is not empty, ValueError for a bad count.
    """
    if probe_count < 1:
        raise ValueError("probe_count must be at least 1")
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    files = size = 0
    for o in range(spec.organizations):
        folder = root / spec.organization(o)
        for sub in ("applications", "users"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for relative, text in _organization_files(spec, o):
            data = text.encode()
            (folder / relative).write_bytes(data)
            files += 1
            size += len(data)
    # Rules per organization: org 4, application 3, baseline 1, two per person.
    rules = spec.organizations * (8 + 2 * spec.users)
    o, i = edit_person(spec)
    width = max(5, len(str(spec.users - 1)))
    edit = Edit(
        path=root / spec.organization(o) / "users" / f"user-{i:0{width}d}.yaml",
        original=user_file(spec, o, i),
        flipped=user_file(spec, o, i, allow_suffix=f' && scope != "{ALLOW_SCOPE}"'),
        probe=probe_for(spec, o, i, allowed=True),
        after=DENY_USER,
    )
    return GeneratedSet(spec, root, files, size, rules, probes(spec, probe_count), edit)
