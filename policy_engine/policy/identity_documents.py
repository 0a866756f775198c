"""Parsing and checking `kind: IdentityMapping` documents (see policy_engine.policy.identities).

Each problem is a LoadIssue with its file and line: unknown or missing fields, a namespace
that is not a valid name or is declared twice in an organization, an application that is not
in the catalog, an external ID or person ID that a request could never carry as a subject ID
(the request validation's rules: printable, no whitespace, at most `max_id_length`
characters). Duplicate external IDs are duplicate YAML keys, which the strict YAML reader
refuses with their line. An empty `identities` map is fine (a namespace whose people have not
linked their IDs yet).
"""

from __future__ import annotations

import sys
from types import MappingProxyType

from policy_engine.config import RequestLimits
from policy_engine.engine.validation import IDENTIFIER_PATTERN
from policy_engine.policy.identities import IdentityMappings, IdentityNamespace
from policy_engine.policy.model import Catalog, IdentityMapping, Position
from policy_engine.policy.parse import DocumentParser, LoadIssue, _as_written
from policy_engine.policy.yamlpos import PositionedDict

KIND_IDENTITY_MAPPING = "IdentityMapping"
_KEYS = frozenset({"kind", "namespace", "description", "applications", "identities"})
# Request IDs are bounded by limits.max_id_length (256 unless configured lower or higher): an
# ID longer than the default could never be matched by a request under default limits.
_MAX_ID_LENGTH = RequestLimits().max_id_length


def _id_problem(value: object) -> str | None:
    """Why `value` cannot be a subject ID in a request, or None."""
    if not isinstance(value, str) or not value:
        return f"must be a non-empty string{_as_written(value)}"
    if len(value) > _MAX_ID_LENGTH:
        return f"is longer than {_MAX_ID_LENGTH} characters"
    if not IDENTIFIER_PATTERN.fullmatch(value):
        return "holds whitespace or control characters, which subject IDs never do"
    return None


def parse_identity_mapping(parser: DocumentParser, doc: PositionedDict) -> IdentityMapping | None:
    """The document as written, or None (with issues added to the parser) when it is broken."""
    before = len(parser.issues)
    parser._check_keys(doc, _KEYS, KIND_IDENTITY_MAPPING)
    namespace = parser._name(doc, "namespace")
    description = doc.get("description", "")
    if not isinstance(description, str):
        parser.problem(
            doc.line_of("description"), f"'description' must be text{_as_written(description)}"
        )
    applications = parser._id_list(doc, "applications", allow_globs=False)
    if applications is None and "applications" not in doc:
        parser.problem(doc.line, "missing required field 'applications'")
    identities: dict[str, str] = {}
    raw = doc.get("identities", PositionedDict())
    if not isinstance(raw, PositionedDict):
        parser.problem(
            doc.line_of("identities"),
            "'identities' must map external user IDs to the people's IdP user IDs",
        )
    else:
        for external, person in raw.items():
            line = raw.line_of(str(external))
            problem = _id_problem(external)
            if problem is not None:
                parser.problem(line, f"identities: external user ID {external!r} {problem}")
                continue
            problem = _id_problem(person)
            if problem is not None:
                parser.problem(line, f"identities: {external!r} maps to a user ID that {problem}")
                continue
            identities[sys.intern(external)] = sys.intern(person)
    if len(parser.issues) != before or applications is None:
        return None
    return IdentityMapping(
        namespace=namespace,
        description=description,
        applications=applications,
        identities=MappingProxyType(identities),
        position=Position(parser.file, doc.line),
        applications_line=doc.value_lines.get("applications", doc.line),
    )


def compile_identity_mappings(
    documents: list[IdentityMapping], catalog: Catalog, issues: list[LoadIssue]
) -> IdentityMappings:
    """The organization's mappings, checked against its catalog and each other: a namespace
    declared twice or an application outside the catalog is an issue (file:line)."""
    seen: dict[str, IdentityMapping] = {}
    namespaces: list[IdentityNamespace] = []
    for document in documents:
        first = seen.get(document.namespace)
        if first is not None:
            issues.append(
                LoadIssue(
                    document.position.file,
                    document.position.line,
                    f"duplicate IdentityMapping namespace {document.namespace!r} "
                    f"(first at {first.position})",
                )
            )
            continue
        seen[document.namespace] = document
        for application in document.applications:
            if application not in catalog.applications:
                issues.append(
                    LoadIssue(
                        document.position.file,
                        document.applications_line,
                        f"IdentityMapping {document.namespace!r}: application {application!r} "
                        "is not in the organization's catalog",
                    )
                )
        namespaces.append(
            IdentityNamespace(
                document.namespace, frozenset(document.applications), document.identities
            )
        )
    return IdentityMappings.of(namespaces)
