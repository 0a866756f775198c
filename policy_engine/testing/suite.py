"""Reads policy test suites: `*.test.yaml`/`*.test.yml` files in an organization's folder.

A suite is one YAML document (strict YAML, as policy files) of this shape:

    kind: TestSuite
    name: acme-github                 # unique in the organization
    organization: acme                # optional; must match the folder
    time: "2026-03-02T15:00:00Z"      # optional default instant for every case
    fixtures:
      principals:   {NAME: {id, kind: user|service_account|external_user, namespace,
                            attributes}}  # namespace: an external_user's IdentityMapping
      applications: {NAME: {id, attributes}}
      integrations: {NAME: {id, attributes}}
      keys:         {NAME: {private_key_file, kid, algorithm}}   # to sign case tokens
    cases:
      - name: alice-reviews-on-github
        subject: alice                # a principal fixture, a mapping, or a plain ID
        application: pr-reviewer      # an application fixture, a mapping, or a plain ID
        integration: github           # likewise
        scope: repo
        context: {connection, client_ip, session_id, attributes}
        time: "..."                   # overrides the suite's
        token: {key: NAME, claims: {...}} | "a raw JWT"
        quota_used: {QUOTA: N}        # ALLOWs quota QUOTA already counted for this
                                      # request's bucket in the window of the case's time
        expect: {decision: allow|deny, code, layer, policy, rule}

A suite's cases share one in-process quota store whose clock is each case's time, in order:
a case's ALLOW counts in the quotas it matches, and `quota_used` tops a bucket up first.

Every problem is collected with file:line (LoadIssue); nothing is guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Effect, Layer
from policy_engine.domain.request import SubjectKind
from policy_engine.errors import PolicyEngineError
from policy_engine.policy.parse import NAME_PATTERN, DocumentParser, LoadIssue
from policy_engine.policy.source import SourceError, join_inside, read_bounded
from policy_engine.policy.yamlpos import PositionedDict, error_line, load_documents

KIND_SUITE = "TestSuite"
MAX_KEY_FILE_BYTES = 64 * 1024
_NO_ATTRIBUTES: MappingProxyType[str, Any] = MappingProxyType({})


def _none() -> MappingProxyType[str, Any]:
    return _NO_ATTRIBUTES


_SUITE_KEYS = frozenset(
    {"kind", "name", "organization", "description", "time", "fixtures", "cases"}
)
_FIXTURE_KEYS = frozenset({"principals", "applications", "integrations", "keys"})
_PRINCIPAL_KEYS = frozenset({"id", "kind", "namespace", "attributes"})
_RESOURCE_KEYS = frozenset({"id", "attributes"})
_KEY_KEYS = frozenset({"private_key_file", "kid", "algorithm"})
_CASE_KEYS = frozenset(
    {
        "name",
        "description",
        "subject",
        "application",
        "integration",
        "scope",
        "context",
        "time",
        "token",
        "quota_used",
        "expect",
    }
)
# The most ALLOWs a case may say a quota already counted (they are counted for it, at once).
MAX_QUOTA_USED = 100_000
_CONTEXT_KEYS = frozenset({"connection", "client_ip", "session_id", "attributes"})
_TOKEN_KEYS = frozenset({"key", "claims"})
_EXPECT_KEYS = frozenset({"decision", "code", "layer", "policy", "rule"})
_DECISIONS = {"allow": Effect.ALLOW, "deny": Effect.DENY}
_ALGORITHM_BY_KEY = {"Ed25519": "EdDSA", "RSA": "RS256", "P-256": "ES256", "P-384": "ES384"}
# What each kind of key may sign with (RFC 7518 section 3.1, RFC 8037).
_ALGORITHMS_OF_KEY = {
    "Ed25519": ("EdDSA",),
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "P-256": ("ES256",),
    "P-384": ("ES384",),
}
_CONNECTIONS = ("active", "absent", "unknown")
# RFC 3339 date-time: seconds and an offset are required, so no case time is read in an
# assumed zone (fromisoformat alone also takes a bare date, a naive time or basic format).
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    kind: str = SubjectKind.USER.value
    attributes: MappingProxyType[str, Any] = field(default_factory=_none)
    namespace: str = ""  # an external_user's IdentityMapping namespace ("": the only one)


@dataclass(frozen=True, slots=True)
class Resource:
    """An application or an integration: an ID and the attributes the broker sends."""

    id: str
    attributes: MappingProxyType[str, Any] = field(default_factory=_none)


@dataclass(frozen=True, slots=True)
class FixtureKey:
    """A private key a suite signs case tokens with; its public JWK verifies them."""

    name: str
    algorithm: str  # a JWS alg: EdDSA, ES256, ES384 or RS256
    kid: str
    private_key: Any  # a cryptography private key object
    public_jwk: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """A token to send: `raw` as written, or one signed with fixture key `key` over `claims`
    (merged over defaults: sub, iat, exp, iss and aud; see runner.signed_token)."""

    raw: str = ""
    key: str = ""
    claims: MappingProxyType[str, Any] = field(default_factory=_none)


@dataclass(frozen=True, slots=True)
class Expectation:
    decision: Effect
    code: ErrorCode | None = None
    layer: Layer | None = None
    policy: str | None = None
    rule: str | None = None

    def describe(self) -> str:
        parts = [self.decision.value]
        parts += [
            f"{name}={value}"
            for name, value in (
                ("code", self.code.value if self.code else None),
                ("layer", self.layer.value if self.layer else None),
                ("policy", self.policy),
                ("rule", self.rule),
            )
            if value is not None
        ]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    line: int
    subject: Principal
    application: Resource
    integration: Resource
    scope: str
    context: MappingProxyType[str, Any]
    time: datetime | None
    token: TokenSpec | None
    expect: Expectation
    # Quota name -> ALLOWs it already counted for this request's bucket in the case's window.
    quota_used: MappingProxyType[str, int] = field(default_factory=_none)


@dataclass(frozen=True, slots=True)
class Suite:
    path: Path  # as found below the policy directory (`acme/github.test.yaml`)
    name: str
    organization: str
    cases: tuple[Case, ...]
    keys: MappingProxyType[str, FixtureKey] = field(default_factory=_none)


class SuiteError(PolicyEngineError):
    """One or more suites are invalid; `issues` lists every problem with file:line."""

    def __init__(self, issues: list[LoadIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


def parse_suite(
    directory: Path, relative: str, data: bytes, issues: list[LoadIssue]
) -> Suite | None:
    """The suite in `data` (the file `relative`, `/`-separated, below the policy `directory`),
    or None with its problems appended to `issues`."""
    path = directory / relative
    try:
        loaded = load_documents(data.decode("utf-8"), what="test suites")
    except UnicodeDecodeError:
        issues.append(LoadIssue(path, 1, "not UTF-8 text"))
        return None
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        issues.append(LoadIssue(path, error_line(exc), f"invalid YAML: {problem}"))
        return None
    issues.extend(LoadIssue(path, p.line, p.message) for p in loaded.problems)
    if len(loaded.documents) != 1 or not isinstance(loaded.documents[0].value, PositionedDict):
        issues.append(LoadIssue(path, 1, "a test suite is exactly one YAML mapping"))
        return None
    before = len(issues)
    suite = _SuiteParser(path, issues, directory, relative).suite(loaded.documents[0].value)
    return suite if len(issues) == before and not loaded.problems else None


class _SuiteParser(DocumentParser):
    def __init__(self, file: Path, issues: list[LoadIssue], directory: Path, relative: str) -> None:
        super().__init__(file, issues)
        self.directory = directory
        self.relative = relative

    def suite(self, doc: PositionedDict) -> Suite | None:
        self._check_keys(doc, _SUITE_KEYS, "a test suite")
        if doc.get("kind") != KIND_SUITE:
            self.problem(doc.line_of("kind"), f"kind must be {KIND_SUITE!r}")
            return None
        name = self._name(doc, "name")
        folder = self.relative.split("/", 1)[0] if "/" in self.relative else ""
        organization = self._string(doc, "organization", required=False, default=folder)
        if not folder:
            self.problem(doc.line, "a test suite belongs in its organization's folder")
        elif organization != folder:
            self.problem(
                doc.line_of("organization"),
                f"organization {organization!r} does not match the folder {folder!r}",
            )
        self._string(doc, "description", required=False)
        default_time = self._time(doc, "time")
        fixtures = self._mapping(doc, "fixtures", "a suite's fixtures")
        if fixtures is not None:
            self._check_keys(fixtures, _FIXTURE_KEYS, "fixtures")
        principals = self._fixtures(fixtures, "principals", self._principal)
        applications = self._fixtures(fixtures, "applications", self._resource)
        integrations = self._fixtures(fixtures, "integrations", self._resource)
        keys = self._fixtures(fixtures, "keys", self._key)
        raw_cases = doc.get("cases")
        cases: list[Case] = []
        if not isinstance(raw_cases, list) or not raw_cases:
            self.problem(doc.line_of("cases"), "'cases' must be a non-empty list of cases")
            raw_cases = []
        seen: dict[str, int] = {}
        for raw in raw_cases:
            if not isinstance(raw, PositionedDict):
                self.problem(doc.line_of("cases"), "each case must be a mapping")
                continue
            case = self._case(raw, principals, applications, integrations, keys, default_time)
            if case is None:
                continue
            if case.name in seen:
                self.problem(case.line, f"case {case.name!r} is also on line {seen[case.name]}")
            seen[case.name] = case.line
            cases.append(case)
        return Suite(Path(self.relative), name, organization, tuple(cases), MappingProxyType(keys))

    # -- fields --------------------------------------------------------------------------

    def _mapping(self, doc: PositionedDict, key: str, what: str) -> PositionedDict | None:
        raw = doc.get(key)
        if raw is None:
            return None
        if not isinstance(raw, PositionedDict):
            self.problem(doc.line_of(key), f"{what} must be a mapping")
            return None
        return raw

    def _attributes(self, doc: PositionedDict, key: str) -> MappingProxyType[str, Any]:
        raw = self._mapping(doc, key, f"{key!r}")
        return MappingProxyType(dict(raw)) if raw else _NO_ATTRIBUTES

    def _time(self, doc: PositionedDict, key: str) -> datetime | None:
        raw = doc.get(key)
        if raw is None:
            return None
        try:
            if not isinstance(raw, str) or not RFC3339.fullmatch(raw):
                raise ValueError(raw)
            return datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
        except ValueError:
            self.problem(doc.line_of(key), f"{key} {raw!r} is not an RFC 3339 timestamp")
            return None

    def _fixtures(self, fixtures: PositionedDict | None, key: str, parse: Any) -> dict[str, Any]:
        raw = self._mapping(fixtures, key, f"fixtures.{key}") if fixtures else None
        found: dict[str, Any] = {}
        for name, value in (raw or {}).items():
            line = raw.line_of(name) if raw else 0
            if not isinstance(value, PositionedDict):
                self.problem(line, f"fixture {key}.{name} must be a mapping")
                continue
            parsed = parse(value, str(name))
            if parsed is not None:
                found[str(name)] = parsed
        return found

    def _principal(self, doc: PositionedDict, fixture: str = "") -> Principal | None:
        self._check_keys(doc, _PRINCIPAL_KEYS, "a subject")
        kind = self._string(doc, "kind", required=False, default=SubjectKind.USER.value)
        if kind not in {k.value for k in SubjectKind}:
            choices = " | ".join(k.value for k in SubjectKind)
            self.problem(doc.line_of("kind"), f"kind {kind!r} is not one of {choices}")
        ident = self._string(doc, "id", required=True)
        namespace = self._string(doc, "namespace", required=False)
        if namespace and kind != SubjectKind.EXTERNAL_USER.value:
            self.problem(doc.line_of("namespace"), "only an external_user has a namespace")
        if not ident:
            return None
        return Principal(ident, kind, self._attributes(doc, "attributes"), namespace)

    def _resource(self, doc: PositionedDict, fixture: str = "") -> Resource | None:
        self._check_keys(doc, _RESOURCE_KEYS, "an application or integration")
        ident = self._string(doc, "id", required=True)
        return Resource(ident, self._attributes(doc, "attributes")) if ident else None

    def _key(self, doc: PositionedDict, fixture: str) -> FixtureKey | None:
        from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm, RSAAlgorithm

        self._check_keys(doc, _KEY_KEYS, "a fixture key")
        file = self._string(doc, "private_key_file", required=True)
        kid = self._string(doc, "kid", required=False, default=fixture)
        if not file:
            return None
        folder = self.relative.rsplit("/", 1)[0] if "/" in self.relative else ""
        inside = join_inside(folder, file) if folder else None
        if inside is None:
            self.problem(
                doc.line_of("private_key_file"), f"{file!r} is not inside the suite's folder"
            )
            return None
        try:
            data = read_bounded(self.directory / inside, MAX_KEY_FILE_BYTES).data
            key = _private_key(data)
        except (SourceError, ValueError, TypeError) as exc:
            self.problem(doc.line_of("private_key_file"), f"{file}: {exc}")
            return None
        public = key.public_key()
        curve = getattr(getattr(public, "curve", None), "name", "")
        kind = {"secp256r1": "P-256", "secp384r1": "P-384"}.get(curve, type(public).__name__)
        kind = "Ed25519" if "Ed25519" in kind else "RSA" if "RSA" in kind else kind
        algorithm = self._string(
            doc, "algorithm", required=False, default=_ALGORITHM_BY_KEY.get(kind, "")
        )
        if kind not in _ALGORITHM_BY_KEY:
            self.problem(
                doc.line_of("private_key_file"),
                f"{file}: an Ed25519, P-256, P-384 or RSA private key is needed",
            )
            return None
        if algorithm not in _ALGORITHMS_OF_KEY[kind]:
            choices = " | ".join(_ALGORITHMS_OF_KEY[kind])
            self.problem(
                doc.line_of("algorithm"),
                f"algorithm {algorithm!r} does not fit this {kind} key (one of {choices})",
            )
            return None
        codecs: dict[str, type[Algorithm]] = {"Ed25519": OKPAlgorithm, "RSA": RSAAlgorithm}
        codec = codecs.get(kind, ECAlgorithm)
        jwk = dict(codec.to_jwk(public, as_dict=True))
        jwk.update(kid=kid, use="sig", alg=algorithm)
        return FixtureKey(fixture, algorithm, kid, key, jwk)

    def _reference(
        self, doc: PositionedDict, key: str, fixtures: dict[str, Any], parse: Any, plain: Any
    ) -> Any:
        raw = doc.get(key)
        if isinstance(raw, str) and raw.strip():
            return fixtures.get(raw) or plain(raw)
        if isinstance(raw, PositionedDict):
            return parse(raw)
        self.problem(
            doc.line_of(key),
            f"{key!r} must name a fixture, be an ID, or be a mapping"
            + ("" if key in doc else " (missing)"),
        )
        return None

    def _case(
        self,
        doc: PositionedDict,
        principals: dict[str, Principal],
        applications: dict[str, Resource],
        integrations: dict[str, Resource],
        keys: dict[str, FixtureKey],
        default_time: datetime | None,
    ) -> Case | None:
        before = len(self.issues)
        self._check_keys(doc, _CASE_KEYS, "a case")
        name = self._string(doc, "name", required=True)
        if name and not NAME_PATTERN.fullmatch(name):
            self.problem(
                doc.line_of("name"), f"case name {name!r} must match {NAME_PATTERN.pattern}"
            )
        self._string(doc, "description", required=False)
        subject = self._reference(doc, "subject", principals, self._principal, Principal)
        application = self._reference(doc, "application", applications, self._resource, Resource)
        integration = self._reference(doc, "integration", integrations, self._resource, Resource)
        scope = self._string(doc, "scope", required=True)
        context = self._context(doc)
        time = self._time(doc, "time") or default_time
        token = self._token(doc, keys)
        quota_used = self._quota_used(doc)
        expect = self._expect(doc)
        if len(self.issues) != before or expect is None:
            return None
        return Case(
            name,
            doc.line,
            subject,
            application,
            integration,
            scope,
            context,
            time,
            token,
            expect,
            quota_used,
        )

    def _quota_used(self, doc: PositionedDict) -> MappingProxyType[str, int]:
        """`quota_used`: quota names (checked against the policies when the case runs) to
        0..MAX_QUOTA_USED ALLOWs."""
        raw = self._mapping(doc, "quota_used", "'quota_used' (quota name: ALLOWs counted)")
        if raw is None:
            return _NO_ATTRIBUTES
        used: dict[str, int] = {}
        for name, count in raw.items():
            line = raw.line_of(str(name))
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
                self.problem(line, f"quota_used: {name!r} is not a quota name")
            elif (
                isinstance(count, bool)
                or not isinstance(count, int)
                or not 0 <= count <= MAX_QUOTA_USED
            ):
                self.problem(
                    line, f"quota_used.{name} must be a whole number from 0 to {MAX_QUOTA_USED:,}"
                )
            else:
                used[name] = count
        return MappingProxyType(used)

    def _context(self, doc: PositionedDict) -> MappingProxyType[str, Any]:
        raw = self._mapping(doc, "context", "'context'")
        if raw is None:
            return _NO_ATTRIBUTES
        self._check_keys(raw, _CONTEXT_KEYS, "a case's context")
        context: dict[str, Any] = dict(self._attributes(raw, "attributes"))
        for key in ("connection", "client_ip", "session_id"):
            if key in raw:
                context[key] = self._string(raw, key, required=True)
        if context.get("connection", "unknown") not in _CONNECTIONS:
            self.problem(
                raw.line_of("connection"),
                f"connection {context['connection']!r} is not one of {' | '.join(_CONNECTIONS)}",
            )
        return MappingProxyType(context)

    def _token(self, doc: PositionedDict, keys: dict[str, FixtureKey]) -> TokenSpec | None:
        raw = doc.get("token")
        if raw is None:
            return None
        if isinstance(raw, str):
            return TokenSpec(raw=raw)
        if not isinstance(raw, PositionedDict):
            self.problem(doc.line_of("token"), "'token' must be a JWT or {key, claims}")
            return None
        self._check_keys(raw, _TOKEN_KEYS, "a case's token")
        key = self._string(raw, "key", required=True)
        if key and key not in keys:
            self.problem(raw.line_of("key"), f"no fixture key {key!r} (fixtures.keys)")
        return TokenSpec(key=key, claims=self._attributes(raw, "claims"))

    def _expect(self, doc: PositionedDict) -> Expectation | None:
        raw = self._mapping(doc, "expect", "'expect'")
        if raw is None:
            self.problem(doc.line_of("expect"), "'expect' is required: {decision: allow|deny}")
            return None
        self._check_keys(raw, _EXPECT_KEYS, "a case's expect")
        decision = self._choice(raw, "decision", _decision, "allow | deny", default=None)
        code = self._choice(raw, "code", ErrorCode, "a kontext_... code", default=False)
        layer = self._choice(
            raw, "layer", Layer, " | ".join(layer.value for layer in Layer), default=False
        )
        policy = self._string(raw, "policy", required=False) or None
        rule = self._string(raw, "rule", required=False) or None
        if decision is Effect.ALLOW and code:
            self.problem(raw.line_of("code"), "an allow has no code: expect a code with deny")
        if decision is None:
            return None
        return Expectation(decision, code or None, layer or None, policy, rule)


def _decision(raw: str) -> Effect:
    if raw not in _DECISIONS:
        raise ValueError(raw)
    return _DECISIONS[raw]


def _private_key(data: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(data, password=None)
