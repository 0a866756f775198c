"""`kind: Quota` documents: loaded into each organization's compiled quotas, or refused with
file:line for every bad field; matched by target through an index; bucketed per `per` parts
by an unambiguous digest; and the editor schema (schemas/quota.schema.json) agrees."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.policy.compile_cache import CompileCache
from policy_engine.policy.quotas import NO_QUOTAS, bucket
from policy_engine.quota import Algorithm, WhenUnavailable
from tests.policy.test_schemas import _schema_errors
from tests.policy_builder import allow_all, dump_yaml, write_organization

REPOSITORY = Path(__file__).resolve().parents[2]

QUOTA: dict[str, Any] = {
    "kind": "Quota",
    "name": "github-per-person-hourly",
    "description": "Each person's applications get at most 100 GitHub credentials an hour.",
    "target": {"integrations": ["github"]},
    "limit": 100,
    "window": "1h",
    "algorithm": "fixed",
    "per": ["subject"],
    "when_unavailable": "deny",
}


def _write(root: Path, *documents: dict[str, Any] | str) -> Path:
    folder = write_organization(
        root, "acme", integrations=["github", "linear", "slack"], applications=["app", "bot"]
    )
    (folder / "policy.yaml").write_text(dump_yaml({"kind": "Policy", **allow_all("org")}))
    text = "---\n".join(d if isinstance(d, str) else dump_yaml(d) for d in documents)
    (folder / "quotas.yaml").write_text(text)
    return folder / "quotas.yaml"


def _problems(tmp_path: Path, *documents: dict[str, Any] | str) -> list[str]:
    """Every issue the loader reports, as `line: message` for the quota file."""
    path = _write(tmp_path, *documents)
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_set(tmp_path)
    assert all(issue.file == path for issue in caught.value.issues), caught.value
    return [f"{issue.line}: {issue.message}" for issue in caught.value.issues]


def test_a_quota_loads_into_its_organizations_compiled_set(tmp_path: Path) -> None:
    sliding = {**QUOTA, "name": "bot-daily", "target": {"applications": "bot"}, "window": "1d"}
    sliding.update(algorithm="sliding", per=[], when_unavailable="allow")
    del sliding["description"]
    _write(tmp_path, QUOTA, sliding)
    policies = load_policy_set(tmp_path)
    quotas = policies.organizations["acme"].quotas
    assert policies.has_quotas
    specs = {quota.spec.name: quota for quota in quotas.quotas}
    hourly, daily = specs["github-per-person-hourly"], specs["bot-daily"]
    assert (hourly.spec.limit, hourly.spec.window_ms, hourly.per) == (100, 3_600_000, ("subject",))
    assert hourly.spec.algorithm is Algorithm.FIXED
    assert hourly.spec.when_unavailable is WhenUnavailable.DENY
    assert hourly.spec.organization == "acme"
    assert (daily.spec.window_ms, daily.per) == (86_400_000, ())
    assert daily.spec.algorithm is Algorithm.SLIDING
    assert daily.spec.when_unavailable is WhenUnavailable.ALLOW


def test_an_organization_without_quotas_has_none(tmp_path: Path) -> None:
    write_organization(tmp_path, "acme", policies=[allow_all("org")])
    policies = load_policy_set(tmp_path)
    assert policies.organizations["acme"].quotas is NO_QUOTAS
    assert not policies.has_quotas


def test_the_shipped_globex_quotas_load() -> None:
    quotas = load_policy_set(REPOSITORY / "policies").organizations["globex"].quotas
    assert {q.spec.name for q in quotas.quotas} == {"github-per-person-hourly", "release-bot-daily"}


# Each: a change to the valid QUOTA, and the (line, words) the loader must report. The file is
# dump_yaml(QUOTA) with keys in QUOTA's order: kind on line 1, name 2, description 3, target
# 4-6, limit 7, window 8, algorithm 9, per 10-11, when_unavailable 12.
BAD_FIELDS: dict[str, tuple[dict[str, Any], int, str]] = {
    "unknown key": ({"owner": "me"}, 13, "unknown field 'owner' in Quota"),
    "limit zero": ({"limit": 0}, 7, "'limit' must be a whole number from 1 to"),
    "limit negative": ({"limit": -5}, 7, "not -5"),
    "limit too big": ({"limit": 1_000_000_001}, 7, "'limit' must be a whole number"),
    "limit a boolean": ({"limit": True}, 7, "not true"),
    "limit text": ({"limit": "100"}, 7, "not '100'"),
    "limit a list": ({"limit": [1]}, 7, "not a list"),
    "window without unit": ({"window": "3600"}, 8, "'window' must be a whole number of s, m"),
    "window a number": ({"window": 60}, 8, "not 60"),
    "window fractional": ({"window": "1.5h"}, 8, "not '1.5h'"),
    "window zero": ({"window": "0s"}, 8, "not '0s'"),
    "window too long": ({"window": "32d"}, 8, "from 1s to 31d"),
    "window in hours too long": ({"window": "745h"}, 8, "not '745h'"),
    "window upper case": ({"window": "1H"}, 8, "not '1H'"),
    "window with a space": ({"window": "1 h"}, 8, "not '1 h'"),
    "algorithm unknown": ({"algorithm": "token-bucket"}, 9, "is not one of fixed, sliding"),
    "algorithm capitalised": ({"algorithm": "Fixed"}, 9, "is not one of fixed, sliding"),
    "per unknown part": ({"per": ["subject", "tenant"]}, 10, "'tenant' is not one of subject"),
    "per repeated part": ({"per": ["scope", "scope"]}, 10, "'scope' is listed twice"),
    "per organization": ({"per": ["organization"]}, 10, "'organization' is always part"),
    "per a string": ({"per": "subject"}, 10, "'per' must be a list of subject"),
    "per holds a number": ({"per": [1]}, 10, "1 is not one of subject"),
    "when_unavailable unknown": ({"when_unavailable": "retry"}, 12, "is not one of deny, allow"),
    "when_unavailable a boolean": ({"when_unavailable": True}, 12, "is not one of deny, allow"),
    "name with a space": ({"name": "per person"}, 2, "must match"),
    "description a number": ({"description": 7}, 3, "'description' must be text"),
    "target a list": ({"target": ["github"]}, 4, "'target' must be a mapping"),
    "target unknown dimension": ({"target": {"integration": "github"}}, 5, "unknown field"),
    "target with a space": ({"target": {"scopes": ["a b"]}}, 6, "is not a valid ID or pattern"),
    "integration not in the catalog": (
        {"target": {"integrations": ["gitlab"]}},
        1,
        "integration 'gitlab' is not in the catalog",
    ),
    "application not in the catalog": (
        {"target": {"applications": ["robot"]}},
        1,
        "application 'robot' is not in the catalog",
    ),
}


@pytest.mark.parametrize("name", BAD_FIELDS)
def test_each_bad_field_is_refused_with_its_line(tmp_path: Path, name: str) -> None:
    change, line, words = BAD_FIELDS[name]
    problems = _problems(tmp_path, {**QUOTA, **change})
    assert any(p.startswith(f"{line}: ") and words in p for p in problems), problems


@pytest.mark.parametrize("field", ["name", "limit", "window"])
def test_a_required_field_missing_is_refused(tmp_path: Path, field: str) -> None:
    quota = {key: value for key, value in QUOTA.items() if key != field}
    problems = _problems(tmp_path, quota)
    assert any(f"missing required field {field!r}" in p for p in problems), problems


def test_every_bad_field_of_one_document_is_reported_at_once(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path, {**QUOTA, "limit": 0, "window": "2y", "per": ["who"], "algorithm": "x"}
    )
    assert [p.split(":")[0] for p in problems] == ["7", "8", "9", "10"]


def test_a_quota_name_used_twice_is_refused_with_both_places(tmp_path: Path) -> None:
    problems = _problems(tmp_path, QUOTA, {**QUOTA, "limit": 5})
    assert len(problems) == 1 and "duplicate quota name" in problems[0], problems
    assert problems[0].startswith("14: ") and "quotas.yaml:1)" in problems[0]


def test_a_quota_kind_spelled_wrong_is_refused(tmp_path: Path) -> None:
    problems = _problems(tmp_path, {**QUOTA, "kind": "quota"})
    assert problems and "'kind' must be" in problems[0] and "Quota" in problems[0]


# --- matching ----------------------------------------------------------------------------------


def _quotas(tmp_path: Path, *documents: dict[str, Any]) -> Any:
    _write(tmp_path, *documents)
    return load_policy_set(tmp_path).organizations["acme"].quotas


def test_matching_follows_each_target_dimension(tmp_path: Path) -> None:
    documents = [
        {**QUOTA, "name": "github", "target": {"integrations": ["github"]}},
        {**QUOTA, "name": "bot", "target": {"applications": ["bot"]}},
        {**QUOTA, "name": "admins", "target": {"subjects": ["admin-*"], "scopes": ["write:*"]}},
        {**QUOTA, "name": "everything", "target": {}},
    ]
    quotas = _quotas(tmp_path, *documents)

    def names(subject: str, application: str, integration: str, scope: str) -> list[str]:
        found = quotas.matching(subject, application, integration, scope)
        return [quota.spec.name for quota in found]

    assert names("alice", "app", "github", "repo") == ["everything", "github"]
    assert names("alice", "bot", "slack", "read") == ["bot", "everything"]
    assert names("admin-1", "app", "linear", "write:issues") == ["admins", "everything"]
    assert names("admin-1", "app", "linear", "read") == ["everything"]
    assert names("alice", "app", "gitlab", "repo") == []  # not in the catalog: never allowed


def test_a_lookup_tests_only_the_quotas_filed_under_the_request(tmp_path: Path) -> None:
    """Many per-application quotas: the index hands back the one filed under the request's
    application, not every quota of the integration (the RuleIndex, as for rules)."""
    applications = [f"app-{i}" for i in range(50)]
    write_organization(tmp_path, "acme", integrations=["github"], applications=applications)
    folder = tmp_path / "acme"
    (folder / "policy.yaml").write_text(dump_yaml({"kind": "Policy", **allow_all("org")}))
    documents = [
        {**QUOTA, "name": f"q-{app}", "target": {"applications": [app]}} for app in applications
    ]
    (folder / "quotas.yaml").write_text("---\n".join(dump_yaml(d) for d in documents))
    quotas = load_policy_set(tmp_path).organizations["acme"].quotas
    index = quotas.by_integration["github"]
    assert list(index.candidates("alice", "app-7", "repo")) == [
        q for q in quotas.quotas if q.spec.name == "q-app-7"
    ]


def test_charges_are_keyed_by_the_per_parts_only(tmp_path: Path) -> None:
    per_subject = {**QUOTA, "name": "per-subject", "per": ["subject"]}
    per_pair = {**QUOTA, "name": "per-pair", "per": ["application", "scope"]}
    whole = {**QUOTA, "name": "whole", "per": []}
    quotas = _quotas(tmp_path, per_subject, per_pair, whole)

    def buckets(*request: str) -> dict[str, str]:
        return {c.spec.name: c.bucket for c in quotas.charges(*request)}

    alice = buckets("alice", "app", "github", "repo")
    alice_bot = buckets("alice", "bot", "github", "read")
    bob = buckets("bob", "app", "github", "repo")
    assert alice["per-subject"] == alice_bot["per-subject"] != bob["per-subject"]
    assert alice["per-pair"] == bob["per-pair"] != alice_bot["per-pair"]
    assert alice["whole"] == bob["whole"] == alice_bot["whole"] == hashlib.sha256().hexdigest()


def test_buckets_cannot_be_forged_with_delimiters() -> None:
    """Values holding what a joined key would use as separators never share a bucket."""
    assert bucket([("subject", "a:b")]) != bucket([("subject", "a"), ("scope", "b")])
    assert bucket([("application", "x"), ("scope", "yz")]) != bucket(
        [("application", "xy"), ("scope", "z")]
    )
    assert bucket([("subject", "alice")]) != bucket([("application", "alice")])
    assert bucket([("subject", "\x00\x00\x00\x05alice")]) != bucket([("subject", "alice")])
    assert len(bucket([("subject", "é" * 300)])) == 64


# --- the editor schema ---------------------------------------------------------------------------

SCHEMA_VIOLATIONS: dict[str, dict[str, Any]] = {
    name: {**QUOTA, **change}
    for name, (change, _, _) in BAD_FIELDS.items()
    if "catalog" not in name  # the schema cannot see the catalog
}
SCHEMA_VIOLATIONS["missing limit"] = {k: v for k, v in QUOTA.items() if k != "limit"}
SCHEMA_VIOLATIONS["missing window"] = {k: v for k, v in QUOTA.items() if k != "window"}


def test_the_valid_quota_validates() -> None:
    assert _schema_errors(QUOTA) == []
    assert _schema_errors(QUOTA, "quota.schema.json") == []
    assert _schema_errors({**QUOTA, "per": [], "target": {}}) == []


@pytest.mark.parametrize("name", SCHEMA_VIOLATIONS)
def test_the_loader_refuses_quotas_the_schema_refuses(tmp_path: Path, name: str) -> None:
    quota = SCHEMA_VIOLATIONS[name]
    if name not in {"window too long", "window in hours too long"}:  # 1s..31d: loader only
        assert _schema_errors(quota), f"the schema accepts: {name}"
        assert _schema_errors(quota, "quota.schema.json")
    _write(tmp_path, quota)
    with pytest.raises(PolicyLoadError):
        load_policy_set(tmp_path)


def test_reloads_through_the_compile_cache_keep_and_update_the_quotas(tmp_path: Path) -> None:
    """An organization reused whole or updated by the compile cache still has its quotas,
    as they are now (they are compiled on every load)."""
    path = _write(tmp_path, QUOTA)
    cache = CompileCache()

    def limits() -> dict[str, int]:
        quotas = load_policy_set(tmp_path, cache=cache).organizations["acme"].quotas
        return {quota.spec.name: quota.spec.limit for quota in quotas.quotas}

    assert limits() == {"github-per-person-hourly": 100}
    assert limits() == {"github-per-person-hourly": 100}  # nothing changed: reused whole
    path.write_text(dump_yaml({**QUOTA, "limit": 7}))
    assert limits() == {"github-per-person-hourly": 7}
    (tmp_path / "acme" / "extra.yaml").write_text(
        dump_yaml({"kind": "Policy", **allow_all("user")})  # a changed file: updated
    )
    assert limits() == {"github-per-person-hourly": 7}
    path.unlink()
    quotas = load_policy_set(tmp_path, cache=cache).organizations["acme"].quotas
    assert quotas is NO_QUOTAS
