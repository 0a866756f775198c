"""Strict policy files: what YAML could read two ways, or could use to hide or to explode, is
refused with file:line before it reaches a decision. Real files on disk, the real loader."""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.config import PolicyLimits
from policy_engine.domain.decision import Effect
from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.policy.yamlpos import ambiguity, load_documents
from policy_engine.store import DirectoryBackend, PolicyStore
from tests.scenarios import EXAMPLE_POLICIES, pdp
from tests.store.support import decide_scope, org_policy, write_policy_dir

# Finding 1, as reported: the first `rules:` holds the deny, the second only the allow.
TWO_RULES_KEYS = """\
kind: Policy
name: developer-tools
layer: org
target:
  integrations: [github]
rules:
  - name: no-repository-deletion
    effect: deny
    target:
      scopes: [delete_repo]
rules:
  - name: engineering-may-use-github
    effect: allow
    condition: '"engineering" in subject.attributes.groups'
"""

SCOPED_DENY = """\
kind: Policy
name: developer-tools
layer: org
target:
  integrations: [github]
rules:
  - name: engineering-may-use-github
    effect: allow
    condition: '"engineering" in subject.attributes.groups'
  - name: no-repository-deletion
    effect: deny
    target:
      scopes: [delete_repo]
"""

# The deny rule's effect written a second time.
DENY_THEN_ALLOW = SCOPED_DENY + "    effect: allow\n"


def load_errors(root: Path, limits: PolicyLimits | None = None) -> str:
    with pytest.raises(PolicyLoadError) as error:
        load_policy_set(root, limits=limits)
    return str(error.value)


# -- duplicate keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "first", "second", "key"),
    [(TWO_RULES_KEYS, 6, 11, "rules"), (DENY_THEN_ALLOW, 11, 14, "effect")],
    ids=["two rules keys", "deny then allow"],
)
def test_finding_1_duplicate_keys_are_refused_naming_both_lines(
    tmp_path: Path, text: str, first: int, second: int, key: str
) -> None:
    root = write_policy_dir(tmp_path / "policies", text)
    message = load_errors(root)
    assert f"org.yaml:{second}: duplicate key {key!r} at lines {first} and {second}" in message
    validated = pdp("validate", str(root))
    assert validated.returncode == 1
    assert f"duplicate key {key!r} at lines {first} and {second}" in validated.stderr


def test_finding_1_the_serving_set_keeps_denying(tmp_path: Path) -> None:
    """The store's last good set (which denies delete_repo) survives the rewrite."""
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"], deny=["delete_repo"]))
    store = PolicyStore(DirectoryBackend(root))
    store.reload("start")
    good = store.current().revision
    assert decide_scope(store.current(), "delete_repo").effect is Effect.DENY
    for text in (TWO_RULES_KEYS, DENY_THEN_ALLOW):
        (root / "acme" / "org.yaml").write_text(text)
        store.reload("duplicate keys")
        assert store.current().revision == good
        assert "duplicate key" in store.status().last_error
        assert decide_scope(store.current(), "delete_repo").effect is Effect.DENY


ORGANIZATION_WITH_TOKENS = """\
kind: Organization
catalog:
  integrations: [github]
  applications: [app]{catalog_extra}
tokens:
  jwks_url: https://idp.example/jwks
  audience: pdp
  required: true{tokens_extra}
"""


GITHUB = "  integrations: [github]\n"
DUPLICATES_AT_DEPTH = [
    (None, DENY_THEN_ALLOW.replace("    effect: allow\n", "    effect: deny\n"), "effect"),
    (
        None,
        org_policy(["repo"]).replace(GITHUB, GITHUB + "  integrations: ['*']\n"),
        "integrations",
    ),
    (
        ORGANIZATION_WITH_TOKENS.format(catalog_extra="\n  integrations: [x]", tokens_extra=""),
        None,
        "integrations",
    ),
    (
        ORGANIZATION_WITH_TOKENS.format(catalog_extra="", tokens_extra="\n  required: false"),
        None,
        "required",
    ),
    (None, org_policy(["repo"]).replace("layer: org\n", "layer: org\nlayer: user\n"), "layer"),
]


@pytest.mark.parametrize(
    ("org_yaml", "policy_yaml", "key"),
    DUPLICATES_AT_DEPTH,
    ids=["in a rule", "in a target", "in the catalog", "in tokens", "at the top"],
)
def test_duplicate_keys_at_any_depth(
    tmp_path: Path, org_yaml: str | None, policy_yaml: str | None, key: str
) -> None:
    root = write_policy_dir(tmp_path / "policies", policy_yaml or org_policy(["repo"]))
    if org_yaml is not None:
        (root / "acme" / "organization.yaml").write_text(org_yaml)
    assert f"duplicate key {key!r} at lines" in load_errors(root)


# -- anchors, aliases, merge keys, tags --------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """Finding 2's kind: nine anchored lists, each holding the previous nine times."""
    lines = ['  - &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        lines.append(f"  - &l{level} [" + ",".join([f"*l{level - 1}"] * 9) + "]")
    return "kind: Policy\nname: bomb\nlayer: org\ndescription:\n" + "\n".join(lines) + "\n"


def test_finding_2_an_alias_bomb_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb.encode()) < 600  # 9^9 = 387 million strings once expanded
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    (root / "acme" / "bomb.yaml").write_text(bomb)
    tracemalloc.start()
    try:
        message = load_errors(root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The first anchor stops the composer: the message names it and its line, and memory never
    # grew with the expansion (a few MB for the whole load, CEL compiler included).
    assert "bomb.yaml:5: invalid YAML: anchors (&l0) are not allowed" in message
    assert peak < 20 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: &x 1\n", "anchors (&x) are not allowed"),
        ("a: *x\n", "aliases (*x) are not allowed"),
        ("a: !!str 0123\n", "tags (tag:yaml.org,2002:str) are not allowed"),
        ("a: !custom x\n", "tags (!custom) are not allowed"),
        ("<<: {layer: org}\nkind: Policy\n", "merge keys (<<) are not allowed"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels"),
    ],
    ids=["anchor", "alias", "standard tag", "local tag", "merge key", "deep nesting"],
)
def test_anchors_aliases_merge_keys_tags_and_deep_nesting_are_refused(
    tmp_path: Path, text: str, expected: str
) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    (root / "acme" / "extra.yaml").write_text(text)
    message = load_errors(root)
    assert "extra.yaml:1:" in message and expected in message


def test_a_merge_key_cannot_smuggle_in_a_field(tmp_path: Path) -> None:
    """Under PyYAML's YAML 1.1 a `<<` merge would add `effect: allow` to the deny rule."""
    text = org_policy(["repo"], deny=["delete_repo"]).replace(
        "  - name: forbidden-scopes\n", "  - name: forbidden-scopes\n    <<: {effect: allow}\n"
    )
    root = write_policy_dir(tmp_path / "policies", text)
    assert "merge keys (<<) are not allowed" in load_errors(root)


# -- size limits, before parsing ---------------------------------------------------------------


def test_an_oversize_file_is_refused_unparsed_naming_the_setting(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    big = root / "acme" / "big.yaml"
    with big.open("wb") as handle:  # finding 2's 50 MB file, sparse: nothing to write
        handle.truncate(50 * 1024 * 1024)
    message = load_errors(root)
    assert (
        "big.yaml:0: file is 52428800 bytes or more, over policy_limits.max_file_bytes" in message
    )
    assert "YAML" not in message  # never handed to the parser


def test_a_small_limit_refuses_an_invalid_file_without_parsing_it(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    (root / "acme" / "broken.yaml").write_text("rules: [\n" + "x" * 3000)
    message = load_errors(root, PolicyLimits(max_file_bytes=2000))
    assert "broken.yaml:0:" in message and "policy_limits.max_file_bytes (2000)" in message
    assert "invalid YAML" not in message


def test_an_oversize_set_is_refused_naming_the_setting(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    for index in range(5):  # each file is fine alone; together they are too much
        (root / "acme" / f"filler-{index}.yaml").write_text("# " + "x" * 900 + "\n")
    limits = PolicyLimits(max_file_bytes=2000, max_set_bytes=3000)
    message = load_errors(root, limits)
    assert "policy_limits.max_set_bytes (3000); nothing was parsed" in message
    assert "not a mapping" not in message and "YAML" not in message


def test_the_server_backend_applies_the_configured_limits(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    store = PolicyStore(DirectoryBackend(root, limits=PolicyLimits(max_file_bytes=100)))
    store.reload("start")
    assert store.peek() is None
    assert "policy_limits.max_file_bytes (100)" in store.status().last_error


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    os.mkfifo(root / "acme" / "pipe.yaml")
    assert "pipe.yaml:0: cannot read" in load_errors(root)


# -- values read as written --------------------------------------------------------------------


AMBIGUOUS_FIELDS = [
    ("scopes", "no", "a boolean"),
    ("scopes", "off", "a boolean"),
    ("scopes", "y", "a boolean"),
    ("scopes", "0123", "a number"),
    ("scopes", "0x1F", "a number"),
    ("scopes", "1:30", "a sexagesimal"),
    ("scopes", "2024-01-01", "a date"),
    ("scopes", "1.5", "a number"),
    ("scopes", ".inf", "a number"),
    ("subjects", "Yes", "a boolean"),
    ("subjects", "NULL", "null"),
]


@pytest.mark.parametrize(("dimension", "text", "what"), AMBIGUOUS_FIELDS)
def test_yaml_1_1_forms_in_targets_are_refused_as_written(
    tmp_path: Path, dimension: str, text: str, what: str
) -> None:
    policy = org_policy(["repo"], deny=["delete_repo"]).replace(
        "  integrations: [github]\n", f"  integrations: [github]\n  {dimension}: [{text}]\n"
    )
    message = load_errors(write_policy_dir(tmp_path / "policies", policy))
    assert f"org.yaml:6: `{text}` is ambiguous: some YAML readers take it for {what}" in message
    assert f"Write '{text}' in quotes" in message
    quoted = policy.replace(f"[{text}]", f"['{text}']")
    load_policy_set(write_policy_dir(tmp_path / "quoted", quoted))  # quoted, it is just text


@pytest.mark.parametrize(
    ("where", "old", "new", "shown"),
    [
        ("catalog", "integrations: [github]", "integrations: [github, 0123]", "0123"),
        ("catalog", "applications: [app]", "applications: [app, on]", "on"),
        ("organization", "kind: Organization\n", "kind: Organization\norganization: no\n", "no"),
        ("policy name", None, "2024-01-01", "2024-01-01"),
    ],
)
def test_yaml_1_1_forms_in_names_and_catalog_are_refused_as_written(
    tmp_path: Path, where: str, old: str | None, new: str, shown: str
) -> None:
    policy = org_policy(["repo"])
    root = write_policy_dir(tmp_path / "policies", policy)
    if old is None:
        (root / "acme" / "org.yaml").write_text(policy.replace("developer-tools", new))
    else:
        org = root / "acme" / "organization.yaml"
        org.write_text(org.read_text().replace(old, new))
    message = load_errors(root)
    assert f"`{shown}` is ambiguous" in message and f"Write '{shown}' in quotes" in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("cache", "yes", "`yes` is ambiguous"),
        ("cache", "on", "`on` is ambiguous"),
        ("cache", "True", "`True` is ambiguous"),
        ("cache", "'true'", "'cache' must be true or false, not 'true'"),
        ("cache", "1", "'cache' must be true or false, not 1"),
    ],
)
def test_boolean_fields_accept_only_true_and_false(
    tmp_path: Path, field: str, value: str, expected: str
) -> None:
    policy = org_policy(["repo"]).replace("layer: org\n", f"layer: org\n{field}: {value}\n")
    assert expected in load_errors(write_policy_dir(tmp_path / "policies", policy))


def test_required_token_flag_accepts_only_true_and_false(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    org = root / "acme" / "organization.yaml"
    org.write_text(
        ORGANIZATION_WITH_TOKENS.format(catalog_extra="", tokens_extra="").replace(
            "required: true", "required: yes"
        )
    )
    assert "`yes` is ambiguous" in load_errors(root)
    org.write_text(
        ORGANIZATION_WITH_TOKENS.format(catalog_extra="", tokens_extra="").replace(
            "required: true", "required: 'true'"
        )
    )
    assert "'required' must be true or false, not 'true'" in load_errors(root)  # fmt: skip


def test_numbers_where_text_is_wanted_say_how_to_quote(tmp_path: Path) -> None:
    policy = org_policy(["repo"]).replace("name: developer-tools", "name: 2024")
    message = load_errors(write_policy_dir(tmp_path / "policies", policy))
    expected = "(`2024` is read as a number: write '2024' in quotes)"
    assert f"'name' must be a non-empty string {expected}" in message


def test_unambiguous_scalars_and_the_shipped_policies_still_load(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE_POLICIES, tmp_path / "policies")
    assert set(load_policy_set(tmp_path / "policies").organizations) == {"acme", "globex"}
    loaded = load_documents("a: true\nb: false\nc: 30\nd: null\ne: ~\nf:\ng: repo:read\nh: 2fa\n")
    assert loaded.problems == []
    assert loaded.documents[0].value == {
        "a": True, "b": False, "c": 30, "d": None, "e": None, "f": None, "g": "repo:read",
        "h": "2fa",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("written", "field"),
    [
        ("      scopes: [delete_repo]", "      scopes: ~"),
        ("      scopes: [delete_repo]", "      scopes:"),
        ("    effect: deny", "    effect: deny\n    condition: null"),
    ],
    ids=["scopes-tilde", "scopes-empty", "condition-null"],
)
def test_a_field_written_without_a_value_cannot_widen_a_rule(
    tmp_path: Path, written: str, field: str
) -> None:
    """Absent means "no constraint": `scopes: ~` on the deny rule would make it deny every
    scope, and on an allow rule allow every scope; `condition: null` would drop a condition."""
    assert (
        decide_scope(load_policy_set(write_policy_dir(tmp_path / "ok", SCOPED_DENY)), "repo").effect
        is Effect.ALLOW
    )
    root = write_policy_dir(tmp_path / "null", SCOPED_DENY.replace(written, field, 1))
    with pytest.raises(PolicyLoadError, match=r"has no value \(null\)"):
        load_policy_set(root)


# -- one case rule for keywords ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("effect: allow", "effect: Allow", "effect 'Allow' is not one of allow, deny"),
        ("effect: deny", "effect: DENY", "effect 'DENY' is not one of allow, deny"),
        ("layer: org", "layer: Org", "layer 'Org' is not one of org, user, application"),
        ("kind: Policy", "kind: policy", "or IdentityMapping, not 'policy'"),
        ("message: This", "code: KONTEXT_RATE_LIMITED\n    message: This", "code 'KONTEXT_RATE"),
        ("message: This", "code: rate_limited\n    message: This", "code 'rate_limited' is not"),
    ],
)
def test_keywords_are_spelled_exactly(tmp_path: Path, old: str, new: str, expected: str) -> None:
    policy = org_policy(["repo"], deny=["delete_repo"])
    assert old in policy
    message = load_errors(write_policy_dir(tmp_path / "policies", policy.replace(old, new, 1)))
    assert expected in message
    assert "keywords are spelled exactly so" in message


def test_layer_defaults_are_spelled_exactly(tmp_path: Path) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    org = root / "acme" / "organization.yaml"
    org.write_text(org.read_text() + "defaults:\n  org: Allow\n")
    expected = "org 'Allow' is not one of allow, deny (keywords are spelled exactly so)"
    assert expected in load_errors(root)


# -- no parse ambiguity slips through ----------------------------------------------------------

SCALAR_PIECES = st.sampled_from(
    [*"0123456789aAbBeEfFnNoOsSxXyYtTlL.:-+_~ ", "inf", "nan", "true", "null", "yes", "off"]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SCALAR_PIECES, min_size=0, max_size=8).map("".join))
def test_what_is_accepted_reads_the_same_under_yaml_1_1(text: str) -> None:
    """Any plain scalar the strict reader accepts means the same to PyYAML's YAML 1.1 reader
    (which is what `yq`, older tools and the previous loader used), and libyaml and PyYAML's
    own scanner agree on it."""
    document = f"k: {text}\n"
    try:
        expected = yaml.safe_load(document)
    except yaml.YAMLError:
        return  # not a plain scalar YAML can read at all
    if not isinstance(expected, dict) or list(expected) != ["k"]:
        return  # the text was itself YAML structure (`a: b`, `- x`, `# comment`)
    try:
        fast = load_documents(document)
        slow = load_documents(document, pure_python=True)
    except yaml.YAMLError:
        return
    assert [p.message for p in fast.problems] == [p.message for p in slow.problems]
    assert fast.documents[0].value == slow.documents[0].value
    if fast.problems:
        assert f"`{text.strip()}` is ambiguous" in fast.problems[0].message
        return
    ours = fast.documents[0].value["k"]
    assert ours == expected["k"] and type(ours) is type(expected["k"]), (text, ours, expected)
    if isinstance(ours, str):
        assert ambiguity(ours) is None


@pytest.mark.parametrize("document", ["organization.yaml", "org.yaml"])
def test_a_description_must_be_text(tmp_path: Path, document: str) -> None:
    root = write_policy_dir(tmp_path / "policies", org_policy(["repo"]))
    path = root / "acme" / document
    path.write_text(path.read_text().replace("kind: ", "description: [a, b]\nkind: ", 1))
    assert "'description' must be text, not a list" in load_errors(root)
