"""The editor schemas (schemas/*.schema.json) agree with the loader.

Every shipped policy and organization file validates against the schema its first line names;
a document the schema refuses is refused by the loader (a table of violations, and documents
Hypothesis derives from valid ones by replacing, removing or adding fields); and documents the
loader accepts validate. The schema may be looser than the loader (it cannot see CEL, the
catalog, uniqueness or the folder name), never stricter.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from policy_engine.policy import PolicyLoadError, load_policy_set
from policy_engine.policy.model import RULE_CODES
from policy_engine.policy.parse import NAME_PATTERN, SUPPORTED_ALGORITHMS, TARGET_PATTERN
from policy_engine.policy.source import policy_files
from policy_engine.policy.yamlpos import load_documents
from tests.auth.material import ed_key, jwks
from tests.policy_builder import allow_all, user_policy

REPOSITORY = Path(__file__).resolve().parents[2]
SCHEMAS = REPOSITORY / "schemas"
SCHEMA_FOR_KIND = {
    "Organization": "organization.schema.json",
    "Policy": "policy.schema.json",
    "Quota": "quota.schema.json",
    "IdentityMapping": "identity-mapping.schema.json",
}
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)\n")

Document = dict[str, Any]


def _ecma_pattern(
    validator: jsonschema.protocols.Validator, pattern: str, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    """`pattern` as JSON Schema (ECMA-262) and editors read it: a final `$` ends the text.
    Python's `$` also matches before a final newline, which would pass 'repo' and a newline."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    if validator.is_type(instance, "string") and not re.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


EditorValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern}
)


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    """The validator of one schema file; `$ref`s between the files resolve by file name, as an
    editor resolves them relative to the schema's own location."""
    schemas = {path.name: json.loads(path.read_text()) for path in SCHEMAS.glob("*.schema.json")}
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    # Without their `$schema`, referenced files are checked by EditorValidator too (jsonschema
    # picks the standard validator class for a subschema that names its dialect).
    resources = [
        (file, DRAFT202012.create_resource({k: v for k, v in schema.items() if k != "$schema"}))
        for file, schema in schemas.items()
    ]
    return EditorValidator(schemas[name], registry=Registry().with_resources(resources))


def _schema_errors(document: Any, name: str = "document.schema.json") -> list[str]:
    return [error.message for error in _validator(name).iter_errors(document)]


# -- the shipped files ---------------------------------------------------------------------


def test_schemas_are_valid_draft_2020_12() -> None:
    names = sorted(path.name for path in SCHEMAS.glob("*.schema.json"))
    assert {"document.schema.json", *SCHEMA_FOR_KIND.values()} <= set(names)
    for name in names:
        _validator(name)


def test_the_schemas_spell_the_parsers_keywords_and_patterns() -> None:
    policy = json.loads((SCHEMAS / "policy.schema.json").read_text())
    organization = json.loads((SCHEMAS / "organization.schema.json").read_text())
    rule = policy["$defs"]["rule"]["properties"]
    assert sorted(rule["code"]["enum"]) == POLICY_SCHEMA_CODES
    assert policy["$defs"]["name"]["pattern"] == NAME_PATTERN.pattern
    assert organization["properties"]["organization"]["pattern"] == NAME_PATTERN.pattern
    assert policy["$defs"]["pattern"]["pattern"] == TARGET_PATTERN.pattern
    algorithms = organization["properties"]["tokens"]["properties"]["algorithms"]["items"]
    assert algorithms["enum"] == list(SUPPORTED_ALGORITHMS)


SHIPPED = policy_files(REPOSITORY / "policies")


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPOSITORY)) for p in SHIPPED])
def test_every_shipped_file_names_its_schema_and_validates(path: Path) -> None:
    text = path.read_text()
    modeline = MODELINE.match(text)
    assert modeline, f"{path} does not start with '# yaml-language-server: $schema=...'"
    schema = (path.parent / modeline.group(1)).resolve()
    assert schema.parent == SCHEMAS and schema.is_file(), f"{path}: {schema} is not a schema"
    documents = [document.value for document in load_documents(text).documents]
    kinds = {document["kind"] for document in documents}
    # One schema per file: a file mixing kinds names document.schema.json, which dispatches.
    assert schema.name == (
        SCHEMA_FOR_KIND[kinds.pop()] if len(kinds) == 1 else "document.schema.json"
    )
    for document in documents:
        assert _schema_errors(document, schema.name) == []
        assert _schema_errors(document) == []


# -- what the loader makes of a document ----------------------------------------------------

CATALOG = {"integrations": ["github", "linear", "slack"], "applications": ["app", "bot"]}
JWKS = jwks(ed_key())

ORGANIZATION: Document = {
    "kind": "Organization",
    "organization": "acme",
    "description": "Acme",
    "defaults": {"org": "deny", "user": "allow", "application": "deny"},
    "catalog": CATALOG,
    "tokens": {
        "required": False,
        "issuer": "https://idp.acme.test",
        "audience": "broker",
        "jwks_file": "jwks.json",
        "algorithms": ["EdDSA", "ES256"],
        "leeway_seconds": 30,
        "external_subject_claim": "external_id",
        "application_claim": "azp",
    },
}

ORG_POLICY: Document = {
    "kind": "Policy",
    "name": "developer-tools",
    "layer": "org",
    "description": "Engineering may use GitHub and Linear.",
    "target": {"integrations": ["github", "linear"], "scopes": "*"},
    "cache": True,
    "rules": [
        {
            "name": "engineering",
            "effect": "allow",
            "condition": '"engineering" in subject.attributes.groups',
        },
        {
            "name": "connect-first",
            "effect": "deny",
            "code": "kontext_integration_connection_required",
            "condition": "!context.connected",
            "message": "Connect first.",
            "target": {"scopes": ["repo:*", "delete_?"]},
        },
    ],
}
USER_POLICY: Document = {
    "kind": "Policy",
    "name": "alice",
    "layer": "user",
    "target": {"subjects": ["alice"], "applications": "app"},
    "rules": [{"name": "everything", "effect": "allow"}],
}
APPLICATION_POLICY: Document = {
    "kind": "Policy",
    "name": "bot",
    "layer": "application",
    "target": {"applications": ["bot"]},
    "rules": [{"name": "no-slack", "effect": "deny", "target": {"integrations": "slack"}}],
}
POLICIES = (ORG_POLICY, USER_POLICY, APPLICATION_POLICY)


class _QuotingDumper(yaml.SafeDumper):
    """Every string double-quoted, so no generated text is refused as an ambiguous plain
    scalar: the loader then judges the value, not its spelling."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_QuotingDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"')
)


def _loads(organization: Any, policy: Any) -> bool:
    """True when the loader accepts a folder holding these two documents (and a JWKS file)."""
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory) / "acme"
        folder.mkdir()
        (folder / "jwks.json").write_text(JWKS)
        for name, document in (("organization.yaml", organization), ("policy.yaml", policy)):
            (folder / name).write_text(yaml.dump(document, Dumper=_QuotingDumper))
        try:
            load_policy_set(Path(directory))
        except PolicyLoadError:
            return False
        return True


def _loads_policy(policy: Any) -> bool:
    return _loads(ORGANIZATION, policy)


def _loads_organization(organization: Any) -> bool:
    return _loads(organization, {"kind": "Policy", **allow_all("org")})


@pytest.mark.parametrize("policy", POLICIES, ids=[p["name"] for p in POLICIES])
def test_the_base_documents_load_and_validate(policy: Document) -> None:
    assert _loads_policy(policy)
    assert _schema_errors(policy) == [] and _schema_errors(ORGANIZATION) == []


def _with(base: Document, *changes: Callable[[Document], None]) -> Document:
    document = copy.deepcopy(base)
    for change in changes:
        change(document)
    return document


def _set(path: str, value: Any) -> Callable[[Document], None]:
    """Sets `path` (dot-separated keys and list indexes) to `value`; `...` removes it."""

    def change(document: Document) -> None:
        *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
        for part in parents:
            document = document[part]
        if value is ...:
            del document[last]
        else:
            document[last] = value

    return change


# Each a document the schema refuses, for one reason; the loader must refuse it too.
POLICY_VIOLATIONS: dict[str, Document] = {
    "unknown top-level key": _with(ORG_POLICY, _set("owner", "me")),
    "misspelt key": _with(ORG_POLICY, lambda d: d.update(rule=d.pop("rules"))),
    "unknown rule key": _with(ORG_POLICY, _set("rules.0.when", "true")),
    "unknown target key": _with(ORG_POLICY, _set("target.scope", ["repo"])),
    "unknown rule target key": _with(ORG_POLICY, _set("rules.1.target.integration", "github")),
    "missing kind": _with(ORG_POLICY, _set("kind", ...)),
    "missing name": _with(ORG_POLICY, _set("name", ...)),
    "missing layer": _with(ORG_POLICY, _set("layer", ...)),
    "missing rules": _with(ORG_POLICY, _set("rules", ...)),
    "missing rule name": _with(ORG_POLICY, _set("rules.0.name", ...)),
    "missing effect": _with(ORG_POLICY, _set("rules.0.effect", ...)),
    "kind lower case": _with(ORG_POLICY, _set("kind", "policy")),
    "layer upper case": _with(ORG_POLICY, _set("layer", "ORG")),
    "unknown layer": _with(ORG_POLICY, _set("layer", "team")),
    "effect capitalised": _with(ORG_POLICY, _set("rules.0.effect", "Allow")),
    "effect a boolean": _with(ORG_POLICY, _set("rules.0.effect", True)),
    "short code": _with(ORG_POLICY, _set("rules.1.code", "policy_denied")),
    "engine's code": _with(ORG_POLICY, _set("rules.1.code", "kontext_not_found")),
    "code on an allow rule": _with(ORG_POLICY, _set("rules.0.code", "kontext_policy_denied")),
    "name with a space": _with(ORG_POLICY, _set("name", "developer tools")),
    "name starting with a dash": _with(ORG_POLICY, _set("name", "-tools")),
    "name too long": _with(ORG_POLICY, _set("name", "n" * 129)),
    "name a number": _with(ORG_POLICY, _set("name", 7)),
    "rule name with a slash": _with(ORG_POLICY, _set("rules.0.name", "a/b")),
    "no rules": _with(ORG_POLICY, _set("rules", [])),
    "rules a mapping": _with(ORG_POLICY, _set("rules", {"name": "x", "effect": "allow"})),
    "rule a string": _with(ORG_POLICY, _set("rules.1", "deny")),
    "cache a string": _with(ORG_POLICY, _set("cache", "false")),
    "cache null": _with(ORG_POLICY, _set("cache", None)),
    "description a number": _with(ORG_POLICY, _set("description", 3)),
    "description null": _with(ORG_POLICY, _set("description", None)),
    "target a list": _with(ORG_POLICY, _set("target", ["github"])),
    "target null": _with(ORG_POLICY, _set("target", None)),
    "empty target list": _with(ORG_POLICY, _set("target.integrations", [])),
    "null target dimension": _with(ORG_POLICY, _set("target.integrations", None)),
    "target with a space": _with(ORG_POLICY, _set("target.scopes", ["repo read"])),
    "target with a quote": _with(ORG_POLICY, _set("rules.1.target.scopes", ['re"po'])),
    "target with a backslash": _with(ORG_POLICY, _set("target.scopes", ["re\\po"])),
    "rule name ending in a newline": _with(ORG_POLICY, _set("rules.0.name", "engineering\n")),
    "policy name ending in a newline": _with(ORG_POLICY, _set("name", "tools\n")),
    "scope ending in a newline": _with(ORG_POLICY, _set("rules.1.target.scopes", ["repo:*\n"])),
    "target non-ASCII": _with(ORG_POLICY, _set("target.scopes", ["répo"])),
    "target too long": _with(ORG_POLICY, _set("target.scopes", ["s" * 257])),
    "target item a number": _with(ORG_POLICY, _set("target.scopes", [1])),
    "target item a list": _with(ORG_POLICY, _set("target.scopes", [["repo"]])),
    "empty condition": _with(ORG_POLICY, _set("rules.0.condition", "")),
    "blank condition": _with(ORG_POLICY, _set("rules.0.condition", "  \n")),
    "condition a boolean": _with(ORG_POLICY, _set("rules.0.condition", True)),
    "condition null": _with(ORG_POLICY, _set("rules.0.condition", None)),
    "condition too long": _with(ORG_POLICY, _set("rules.0.condition", "true" + " " * 4093)),
    "message a list": _with(ORG_POLICY, _set("rules.1.message", ["no"])),
    "user policy without target": _with(USER_POLICY, _set("target", ...)),
    "user policy without subjects": _with(USER_POLICY, _set("target.subjects", ...)),
    "application policy without applications": _with(
        APPLICATION_POLICY, _set("target", {"integrations": ["slack"]})
    ),
    "document a list": [ORG_POLICY],  # type: ignore[dict-item]
}

ORGANIZATION_VIOLATIONS: dict[str, Document] = {
    "unknown top-level key": _with(ORGANIZATION, _set("name", "acme")),
    "kind capitalised wrong": _with(ORGANIZATION, _set("kind", "organization")),
    "missing catalog": _with(ORGANIZATION, _set("catalog", ...)),
    "catalog without applications": _with(ORGANIZATION, _set("catalog.applications", ...)),
    "unknown catalog key": _with(ORGANIZATION, _set("catalog.subjects", ["alice"])),
    "glob in the catalog": _with(ORGANIZATION, _set("catalog.integrations", ["git*"])),
    "empty catalog list": _with(ORGANIZATION, _set("catalog.applications", [])),
    "catalog ID ending in a newline": _with(ORGANIZATION, _set("catalog.applications", "app\n")),
    "catalog item a number": _with(ORGANIZATION, _set("catalog.applications", [1])),
    "organization a number": _with(ORGANIZATION, _set("organization", 1)),
    "organization empty": _with(ORGANIZATION, _set("organization", "")),
    "description a boolean": _with(ORGANIZATION, _set("description", False)),
    "defaults a string": _with(ORGANIZATION, _set("defaults", "deny")),
    "unknown default layer": _with(ORGANIZATION, _set("defaults.team", "deny")),
    "default capitalised": _with(ORGANIZATION, _set("defaults.org", "Deny")),
    "default a boolean": _with(ORGANIZATION, _set("defaults.user", True)),
    "default null": _with(ORGANIZATION, _set("defaults.user", None)),
    "tokens a list": _with(ORGANIZATION, _set("tokens", ["jwks.json"])),
    "unknown token key": _with(ORGANIZATION, _set("tokens.jwks", "jwks.json")),
    "no key source": _with(ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.issuer", ...)),
    "issuer alone not a URL": _with(
        ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.issuer", "acme-idp")
    ),
    "issuer alone with a query": _with(
        ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.issuer", "https://idp.test/?a")
    ),
    "issuer alone with a fragment": _with(
        ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.issuer", "https://idp.test#a")
    ),
    "issuer alone without a host": _with(
        ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.issuer", "https:///tenant")
    ),
    "discovery beside a jwks_file": _with(ORGANIZATION, _set("tokens.discovery", "openid")),
    "unknown discovery": _with(
        ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.discovery", "webfinger")
    ),
    "two key sources": _with(ORGANIZATION, _set("tokens.jwks_url", "https://idp.test/jwks")),
    "absolute jwks_file": _with(ORGANIZATION, _set("tokens.jwks_file", "/etc/jwks.json")),
    "backslash in jwks_file": _with(ORGANIZATION, _set("tokens.jwks_file", "keys\\jwks.json")),
    "jwks_url not http": _with(
        ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.jwks_url", "ftp://idp.test/k")
    ),
    "jwks_url without a host": _with(
        ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.jwks_url", "https:///jwks")
    ),
    "required a string": _with(ORGANIZATION, _set("tokens.required", "yes")),
    "empty issuer": _with(ORGANIZATION, _set("tokens.issuer", " ")),
    "issuer a number": _with(ORGANIZATION, _set("tokens.issuer", 1)),
    "unknown algorithm": _with(ORGANIZATION, _set("tokens.algorithms", ["HS256"])),
    "algorithm lower case": _with(ORGANIZATION, _set("tokens.algorithms", ["rs256"])),
    "algorithms a string": _with(ORGANIZATION, _set("tokens.algorithms", "RS256")),
    "no algorithms": _with(ORGANIZATION, _set("tokens.algorithms", [])),
    "leeway too large": _with(ORGANIZATION, _set("tokens.leeway_seconds", 301)),
    "leeway negative": _with(ORGANIZATION, _set("tokens.leeway_seconds", -1)),
    "leeway a boolean": _with(ORGANIZATION, _set("tokens.leeway_seconds", True)),
    "leeway text": _with(ORGANIZATION, _set("tokens.leeway_seconds", "30")),
    "unknown application claim": _with(ORGANIZATION, _set("tokens.application_claim", "aud")),
    "application claim capitalised": _with(
        ORGANIZATION, _set("tokens.application_claim", "Client_ID")
    ),
    "application claim a boolean": _with(ORGANIZATION, _set("tokens.application_claim", False)),
    "application claim null": _with(ORGANIZATION, _set("tokens.application_claim", None)),
    "no audience": _with(ORGANIZATION, _set("tokens.audience", ...)),
    "no issuer": _with(ORGANIZATION, _set("tokens.issuer", ...)),
    "no issuer beside a jwks_url": _with(
        ORGANIZATION,
        _set("tokens.issuer", ...),
        _set("tokens.jwks_file", ...),
        _set("tokens.jwks_url", "https://idp.acme.test/jwks"),
    ),
    "empty audience": _with(ORGANIZATION, _set("tokens.audience", " ")),
    "jwks_hosts beside a jwks_file": _with(ORGANIZATION, _set("tokens.jwks_hosts", ["k.test"])),
    **{
        f"jwks_hosts {name}": _with(
            ORGANIZATION,
            _set("tokens.jwks_file", ...),
            _set("tokens.issuer", "https://idp.acme.test"),
            _set("tokens.jwks_hosts", hosts),
        )
        for name, hosts in {
            "with a scheme": ["https://keys.idp.test"],
            "with a path": ["keys.idp.test/jwks"],
            "with port 0": ["keys.idp.test:0"],
            "with port 65536": ["keys.idp.test:65536"],
            "with a leading zero port": ["keys.idp.test:0443"],
            "with user information": ["user@keys.idp.test"],
            "empty": [],
            "a string": "keys.idp.test",
            "with a number": [443],
            "too many": [f"k{i}.idp.test" for i in range(17)],
        }.items()
    },
    "organization claim empty": _with(ORGANIZATION, _set("tokens.organization_claim", " ")),
    "organization claim a number": _with(ORGANIZATION, _set("tokens.organization_claim", 1)),
    "organization claim spaced": _with(ORGANIZATION, _set("tokens.organization_claim", " org")),
}

IDENTITY_MAPPING: Document = {
    "kind": "IdentityMapping",
    "namespace": "partner-portal",
    "description": "Partner portal accounts.",
    "applications": ["app", "bot"],
    "identities": {"partner-user-123": "alice", "auth0|42": "bob@acme.test"},
}

# Each an IdentityMapping the schema refuses, for one reason; the loader must refuse it too.
IDENTITY_MAPPING_VIOLATIONS: dict[str, Document] = {
    "unknown key": _with(IDENTITY_MAPPING, _set("issuer", "https://idp.test")),
    "kind misspelt": _with(IDENTITY_MAPPING, _set("kind", "IdentityMap")),
    "missing namespace": _with(IDENTITY_MAPPING, _set("namespace", ...)),
    "missing applications": _with(IDENTITY_MAPPING, _set("applications", ...)),
    "namespace with a space": _with(IDENTITY_MAPPING, _set("namespace", "partner portal")),
    "namespace a number": _with(IDENTITY_MAPPING, _set("namespace", 7)),
    "no applications": _with(IDENTITY_MAPPING, _set("applications", [])),
    "application glob": _with(IDENTITY_MAPPING, _set("applications", ["*"])),
    "application a number": _with(IDENTITY_MAPPING, _set("applications", [1])),
    "identities a list": _with(IDENTITY_MAPPING, _set("identities", ["alice"])),
    "identities null": _with(IDENTITY_MAPPING, _set("identities", None)),
    "person a number": _with(IDENTITY_MAPPING, _set("identities.partner-user-123", 5)),
    "person a list": _with(IDENTITY_MAPPING, _set("identities.partner-user-123", ["alice"])),
    "person empty": _with(IDENTITY_MAPPING, _set("identities.partner-user-123", "")),
    "person with a space": _with(IDENTITY_MAPPING, _set("identities.partner-user-123", "a b")),
    "person too long": _with(IDENTITY_MAPPING, _set("identities.partner-user-123", "a" * 257)),
    "external ID with a tab": _with(IDENTITY_MAPPING, _set("identities.a\tb", "alice")),
    "external ID with a newline": _with(IDENTITY_MAPPING, _set("identities.ab\n", "alice")),
    "external ID too long": _with(IDENTITY_MAPPING, _set("identities." + "x" * 257, "alice")),
    "description a number": _with(IDENTITY_MAPPING, _set("description", 3)),
}


def test_the_base_identity_mapping_loads_and_validates() -> None:
    assert _loads(ORGANIZATION, IDENTITY_MAPPING)
    assert _schema_errors(IDENTITY_MAPPING) == []
    assert _schema_errors(IDENTITY_MAPPING, "identity-mapping.schema.json") == []
    empty = _with(IDENTITY_MAPPING, _set("identities", {}))
    assert _loads(ORGANIZATION, empty) and _schema_errors(empty) == []
    assert _loads(ORGANIZATION, _with(IDENTITY_MAPPING, _set("identities", ...)))


@pytest.mark.parametrize("name", IDENTITY_MAPPING_VIOLATIONS)
def test_the_loader_refuses_identity_mappings_the_schema_refuses(name: str) -> None:
    mapping = IDENTITY_MAPPING_VIOLATIONS[name]
    assert _schema_errors(mapping), f"the schema accepts: {name}"
    assert not _loads(ORGANIZATION, mapping), f"the loader accepts: {name}"


@pytest.mark.parametrize("discovery", [None, "auto", "oauth", "openid"])
def test_an_issuer_alone_loads_and_validates(discovery: str | None) -> None:
    """Its keys are discovered from its metadata (here a refused port: none, at once)."""
    organization = _with(
        ORGANIZATION, _set("tokens.jwks_file", ...), _set("tokens.issuer", "http://127.0.0.1:1/a")
    )
    if discovery is not None:
        organization["tokens"]["discovery"] = discovery
    assert _schema_errors(organization) == [] and _loads_organization(organization)


def test_bound_tokens_and_allowed_jwks_hosts_load_and_validate() -> None:
    organization = _with(
        ORGANIZATION,
        _set("tokens.jwks_file", ...),
        _set("tokens.issuer", "http://127.0.0.1:1/a"),
        _set("tokens.organization_claim", "org_id"),
        _set("tokens.jwks_hosts", ["keys.idp.test", "keys.idp.test:8443", "[::1]:65535"]),
    )
    assert _schema_errors(organization) == [] and _loads_organization(organization)


@pytest.mark.parametrize("name", POLICY_VIOLATIONS)
def test_the_loader_refuses_policies_the_schema_refuses(name: str) -> None:
    policy = POLICY_VIOLATIONS[name]
    assert _schema_errors(policy), f"the schema accepts: {name}"
    assert _schema_errors(policy, "policy.schema.json")
    assert not _loads_policy(policy), f"the loader accepts: {name}"


@pytest.mark.parametrize("name", ORGANIZATION_VIOLATIONS)
def test_the_loader_refuses_organizations_the_schema_refuses(name: str) -> None:
    organization = ORGANIZATION_VIOLATIONS[name]
    assert _schema_errors(organization), f"the schema accepts: {name}"
    assert not _loads_organization(organization), f"the loader accepts: {name}"


# -- generated documents ---------------------------------------------------------------------


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


FIELD_NAMES = sorted(
    {key for d in (*POLICIES, ORGANIZATION) for key in _keys(d)}
    | {"subjects", "applications", "code", "unknown", "Name"}
)
TEXTS = [
    "",
    " ",
    "allow",
    "deny",
    "Allow",
    "org",
    "user",
    "application",
    "ORG",
    "Policy",
    "Organization",
    "*",
    "github",
    "slack",
    "app",
    "alice",
    "repo:*",
    "a b",
    'a"b',
    "é",
    "x" * 257,
    "kontext_policy_denied",
    "kontext_rate_limited",
    "kontext_not_found",
    "RS256",
    "HS256",
    "jwks.json",
    "../jwks.json",
    "ftp://idp.test/jwks",
    "true",
    "subject.id == 'alice'",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=400),
    st.sampled_from(TEXTS),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=3),
    ),
    max_leaves=6,
)


def _subtrees(value: Any) -> Iterator[Any]:
    yield value
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, dict | list):
            yield from _subtrees(item)
        else:
            yield item


# Values that are valid somewhere (moved elsewhere they may not be): most documents built
# from them are accepted, so the loader-accepts direction is exercised as much as the other.
VALID_PARTS = [part for d in (*POLICIES, ORGANIZATION) for part in _subtrees(d)]
REPLACEMENTS = st.one_of(st.sampled_from(VALID_PARTS).map(copy.deepcopy), VALUES)


def _slots(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key or index) of a document, the places a mutation may change."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        yield value, key
        if isinstance(item, dict | list):
            yield from _slots(item)


@st.composite
def _mutated(
    draw: st.DrawFn,
    bases: tuple[Document, ...],
    replacements: st.SearchStrategy[Any] = REPLACEMENTS,
    field_names: Sequence[str] = FIELD_NAMES,
) -> Document:
    """A valid document with one to three fields replaced (by `replacements`), removed, or
    added (under one of `field_names`)."""
    document = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        slots = list(_slots(document))
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        operation = draw(st.sampled_from(["replace", "remove", "add"]))
        if operation == "replace":
            container[key] = draw(replacements)
        elif operation == "remove":
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.sampled_from(field_names))] = draw(replacements)
        else:
            container.append(draw(replacements))
    return document


def _optional(draw: st.DrawFn, document: Document, key: str, values: st.SearchStrategy) -> None:
    if draw(st.booleans()):
        document[key] = draw(values)


def _one_or_list(values: list[str]) -> st.SearchStrategy[str | list[str]]:
    return st.one_of(st.sampled_from(values), st.lists(st.sampled_from(values), max_size=3))


# Exact IDs in targets must be in the catalog (CATALOG): these are in it, or globs, or scopes.
PATTERNS = ["*", "app", "bot", "github", "slack", "git*", "?lack", "b*"]
TARGETS = st.fixed_dictionaries(
    {},
    optional={
        dimension: _one_or_list(PATTERNS)
        for dimension in ("subjects", "applications", "integrations", "scopes")
    },
)
CONDITIONS = ["true", "context.connected", 'scope == "repo"', '"eng" in subject.attributes.groups']


@st.composite
def _rules(draw: st.DrawFn) -> Document:
    rule: Document = {
        "name": draw(st.sampled_from(["r", "rule-2", "a.b:c_d", "R" * 128])),
        "effect": draw(st.sampled_from(["allow", "deny"])),
    }
    _optional(draw, rule, "condition", st.sampled_from(CONDITIONS))
    _optional(draw, rule, "target", TARGETS)
    _optional(draw, rule, "message", st.sampled_from(["", "Not at Acme."]))
    _optional(draw, rule, "code", st.sampled_from(POLICY_SCHEMA_CODES))
    return rule


@st.composite
def _plausible_policy(draw: st.DrawFn) -> Document:
    """A policy built from values each valid for its field (together they may not be)."""
    policy: Document = {
        "kind": "Policy",
        "name": draw(st.sampled_from(["p", "team.policy:1", "P" * 128])),
        "layer": draw(st.sampled_from(["org", "user", "application"])),
        "rules": draw(st.lists(_rules(), min_size=1, max_size=3, unique_by=lambda r: r["name"])),
    }
    _optional(draw, policy, "description", st.sampled_from(["", "Who may do what."]))
    _optional(draw, policy, "target", TARGETS)
    _optional(draw, policy, "cache", st.booleans())
    return policy


@st.composite
def _plausible_organization(draw: st.DrawFn) -> Document:
    """An organization built from values each valid for its field."""
    ids = _one_or_list(["github", "slack", "app", "bot", "a:b", "x" * 256])
    organization: Document = {
        "kind": "Organization",
        "catalog": draw(
            st.fixed_dictionaries({}, optional={"integrations": ids, "applications": ids})
        ),
    }
    effects = st.sampled_from(["allow", "deny"])
    layers = {layer: effects for layer in ("org", "user", "application")}
    _optional(draw, organization, "organization", st.sampled_from(["acme", "globex"]))
    _optional(draw, organization, "description", st.sampled_from(["", "Acme"]))
    _optional(draw, organization, "defaults", st.fixed_dictionaries({}, optional=layers))
    texts = st.sampled_from(["https://idp.test", "broker", "sub"])
    tokens = {
        "required": st.booleans(),
        # Alone, an issuer is discovered: a refused port ends that fetch at once.
        "issuer": st.sampled_from(["https://127.0.0.1:1/idp", "broker", "https://127.0.0.1:1/?a"]),
        "discovery": st.sampled_from(["auto", "openid", "webfinger"]),
        "audience": texts,
        "external_subject_claim": texts,
        "jwks_file": st.sampled_from(["jwks.json", "./jwks.json", "keys/../jwks.json"]),
        "jwks_url": st.just("https://127.0.0.1:1/jwks"),
        "algorithms": st.lists(st.sampled_from(["RS256", "PS256", "EdDSA"]), max_size=2),
        "leeway_seconds": st.sampled_from([0, 30, 300]),
        "application_claim": st.sampled_from(["client_id", "azp", "none", "sub"]),
    }
    _optional(draw, organization, "tokens", st.fixed_dictionaries({}, optional=tokens))
    return organization


POLICY_SCHEMA_CODES = sorted(code.value for code in RULE_CODES)

GENERATED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@GENERATED
@given(st.one_of(_mutated(POLICIES), _plausible_policy()))
def test_a_generated_policy_the_loader_accepts_validates(policy: Document) -> None:
    if _loads_policy(policy):
        assert _schema_errors(policy) == []


@GENERATED
@given(st.one_of(_mutated((ORGANIZATION,)), _plausible_organization()))
def test_a_generated_organization_the_loader_accepts_validates(organization: Document) -> None:
    if _loads_organization(organization):
        assert _schema_errors(organization) == []


@pytest.mark.parametrize("templated", [False, True])
def test_the_test_builders_policies_validate(templated: bool) -> None:
    for layer in ("org", "user", "application"):
        assert _schema_errors({"kind": "Policy", **allow_all(layer)}) == []
    assert _schema_errors({"kind": "Policy", **user_policy(3, templated=templated)}) == []


def test_a_target_written_as_a_block_scalar_is_refused(tmp_path: Path) -> None:
    """`scopes: |` reads as 'delete_repo' and a newline, which no request carries: a deny
    rule targeted at it would never apply."""
    folder = tmp_path / "acme"
    folder.mkdir()
    (folder / "organization.yaml").write_text(yaml.dump(ORGANIZATION, Dumper=_QuotingDumper))
    (folder / "jwks.json").write_text(JWKS)
    (folder / "org.yaml").write_text(
        "kind: Policy\nname: no-deletion\nlayer: org\nrules:\n"
        "  - name: never\n    effect: deny\n    target:\n      scopes: |\n        delete_repo\n"
    )
    with pytest.raises(PolicyLoadError, match=r"org.yaml:8:.*'delete_repo\\n' is not a valid ID"):
        load_policy_set(tmp_path)
