"""Turns YAML documents into the policy model, collecting every problem with its file:line."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_engine.auth.discovery import DISCOVERY_MODES, MAX_JWKS_HOSTS, jwks_host_problem
from policy_engine.auth.tokens import (
    APPLICATION_CLAIMS,
    DEFAULT_ALGORITHMS,
    DEFAULT_APPLICATION_CLAIM,
)
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import POLICY_LAYERS, Effect, Layer
from policy_engine.policy.model import (
    QUOTA_PER_PARTS,
    RULE_CODES,
    TARGET_DIMENSIONS,
    Catalog,
    OrganizationConfig,
    Policy,
    Position,
    QuotaDefinition,
    Rule,
    Target,
    TokenSettings,
)
from policy_engine.policy.yamlpos import PositionedDict

# Matched with fullmatch: `$` alone also matches before a final newline ("repo\n").
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# Target patterns: IDs and scopes as requests may carry them, plus the glob characters.
TARGET_PATTERN = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,256}$")

# Distinct targets kept built (see _shared_target): about one per user policy, plus the few
# rule targets repeated across thousands of them.
TARGET_CACHE_SIZE = 32 * 1024

SUPPORTED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")
KIND_ORGANIZATION = "Organization"
KIND_POLICY = "Policy"
KIND_QUOTA = "Quota"

# Quota bounds: a limit past a billion is no limit; windows from a second to a month (a
# longer window would keep a counter (or, sliding, a log) for longer than anyone reasons about).
QUOTA_MAX_LIMIT = 1_000_000_000
QUOTA_MIN_WINDOW_MS = 1_000
QUOTA_MAX_WINDOW_MS = 31 * 86_400_000
QUOTA_WINDOW = re.compile(r"^([1-9][0-9]{0,9})([smhd])$")
QUOTA_UNITS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


@dataclass(frozen=True, slots=True)
class LoadIssue:
    file: Path
    line: int
    message: str
    policy: str = ""
    rule: str = ""

    def __str__(self) -> str:
        where = ""
        if self.policy:
            where = f" [policy {self.policy}" + (f", rule {self.rule}" if self.rule else "") + "]"
        return f"{self.file}:{self.line}:{where} {self.message}"


class DocumentParser:
    """Parses one file's documents; problems go to `issues` instead of stopping at the first."""

    def __init__(self, file: Path, issues: list[LoadIssue]) -> None:
        self.file = file
        self.issues = issues

    def problem(self, line: int, message: str, policy: str = "", rule: str = "") -> None:
        self.issues.append(LoadIssue(self.file, line, message, policy, rule))

    # -- generic field readers -------------------------------------------------------------

    def _check_keys(
        self,
        doc: PositionedDict,
        allowed: AbstractSet[str],
        what: str,
        policy: str = "",
        rule: str = "",
    ) -> None:
        for key, value in doc.items():
            if key not in allowed:
                self.problem(
                    doc.line_of(str(key)), f"unknown field {key!r} in {what}", policy, rule
                )
            elif value is None:
                # Absent means "no constraint" for targets and conditions: a field written
                # with no value (`scopes: ~`, `condition:`) must not quietly widen a rule.
                self.problem(
                    doc.line_of(str(key)),
                    f"{key!r} in {what} has no value (null): give it one or remove the field",
                    policy,
                    rule,
                )

    def _string(
        self,
        doc: PositionedDict,
        key: str,
        *,
        required: bool,
        policy: str = "",
        rule: str = "",
        default: str = "",
    ) -> str:
        value = doc.get(key)
        if value is None:
            if required:
                self.problem(doc.line, f"missing required field {key!r}", policy, rule)
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(
                doc.line_of(key),
                f"{key!r} must be a non-empty string{_as_written(value)}",
                policy,
                rule,
            )
            return default
        return value

    def _name(self, doc: PositionedDict, key: str, policy: str = "") -> str:
        name = self._string(doc, key, required=True, policy=policy)
        if name and not NAME_PATTERN.fullmatch(name):
            self.problem(
                doc.line_of(key), f"{key} {name!r} must match {NAME_PATTERN.pattern}", policy
            )
        return name

    def _choice(
        self,
        doc: PositionedDict,
        key: str,
        parse: Callable[[str], Any],
        choices: str,
        *,
        default: Any,
        policy: str = "",
        rule: str = "",
    ) -> Any:
        raw = doc.get(key)
        if raw is None:
            if default is None:
                self.problem(
                    doc.line, f"missing required field {key!r} (one of {choices})", policy, rule
                )
            return default
        try:
            if not isinstance(raw, str):
                raise ValueError(raw)
            return parse(raw)
        except ValueError:
            self.problem(
                doc.line_of(key),
                f"{key} {_shown(raw)} is not one of {choices} (keywords are spelled exactly so)",
                policy,
                rule,
            )
            return default

    def _id_list(
        self,
        doc: PositionedDict,
        key: str,
        policy: str = "",
        rule: str = "",
        allow_globs: bool = True,
    ) -> tuple[str, ...] | None:
        raw = doc.get(key)
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            self.problem(
                doc.line_of(key), f"{key!r} must be a non-empty list of strings", policy, rule
            )
            return None
        values: list[str] = []
        for item in raw:
            if not isinstance(item, str) or not TARGET_PATTERN.fullmatch(item):
                self.problem(
                    doc.value_lines.get(key, doc.line),
                    f"{key}: {_shown(item)} is not a valid ID or pattern{_as_written(item)}",
                    policy,
                    rule,
                )
            elif not allow_globs and ("*" in item or "?" in item):
                self.problem(
                    doc.value_lines.get(key, doc.line),
                    f"{key}: {item!r}: globs are not allowed here",
                    policy,
                    rule,
                )
            else:
                # The same IDs and scopes recur across thousands of files: one string each.
                values.append(sys.intern(item))
        return tuple(values)

    def _target(self, doc: PositionedDict, key: str, policy: str = "", rule: str = "") -> Target:
        raw = doc.get(key)
        if raw is None:
            return EVERYWHERE
        if not isinstance(raw, PositionedDict):
            self.problem(
                doc.line_of(key), f"{key!r} must be a mapping of {TARGET_DIMENSIONS}", policy, rule
            )
            return EVERYWHERE
        self._check_keys(raw, _TARGET_KEYS, key, policy, rule)
        values = [self._id_list(raw, dim, policy, rule) for dim in TARGET_DIMENSIONS]
        return _shared_target(*(EVERYWHERE_VALUES if v is None else v for v in values))

    def _position(self, doc: PositionedDict, key: str | None = None) -> Position:
        return Position(self.file, doc.line if key is None else doc.line_of(key))

    # -- documents -----------------------------------------------------------------------

    def organization(self, doc: PositionedDict, folder_org: str) -> OrganizationConfig | None:
        self._check_keys(
            doc,
            {"kind", "organization", "description", "defaults", "catalog", "tokens"},
            "Organization",
        )
        name = (
            self._string(doc, "organization", required=False, default=folder_org)
            if "organization" in doc
            else folder_org
        )
        if name != folder_org:
            self.problem(
                doc.line_of("organization"),
                f"organization {name!r} does not match its folder {folder_org!r}",
            )
        description = doc.get("description", "")
        if not isinstance(description, str):
            self.problem(
                doc.line_of("description"), f"'description' must be text{_as_written(description)}"
            )
        defaults = {layer: Effect.DENY for layer in POLICY_LAYERS}
        raw_defaults = doc.get("defaults")
        if raw_defaults is not None:
            if isinstance(raw_defaults, PositionedDict):
                self._check_keys(raw_defaults, {layer.value for layer in POLICY_LAYERS}, "defaults")
                for layer in POLICY_LAYERS:
                    defaults[layer] = self._choice(
                        raw_defaults, layer.value, _effect, "allow, deny", default=Effect.DENY
                    )
            else:
                self.problem(
                    doc.line_of("defaults"),
                    "'defaults' must map org/user/application to allow or deny",
                )
        catalog = doc.get("catalog")
        if not isinstance(catalog, PositionedDict):
            self.problem(
                doc.line_of("catalog"),
                "missing 'catalog' with the organization's integrations and applications",
            )
            return None
        self._check_keys(catalog, {"integrations", "applications"}, "catalog")
        integrations = self._id_list(catalog, "integrations", allow_globs=False)
        applications = self._id_list(catalog, "applications", allow_globs=False)
        if integrations is None or applications is None:
            self.problem(catalog.line, "catalog needs non-empty 'integrations' and 'applications'")
            return None
        tokens = self.tokens(doc["tokens"], doc.line_of("tokens")) if "tokens" in doc else None
        return OrganizationConfig(
            name=folder_org,
            defaults=defaults,
            catalog=Catalog(frozenset(integrations), frozenset(applications)),
            position=self._position(doc),
            tokens=tokens,
        )

    def tokens(self, raw: Any, line: int) -> TokenSettings | None:
        if not isinstance(raw, PositionedDict):
            self.problem(line, "'tokens' must be a mapping")
            return None
        self._check_keys(raw, set(TokenSettings.__dataclass_fields__) - {"line"}, "tokens")
        optional = {
            key: self._string(raw, key, required=False) or None
            for key in ("issuer", "audience", "jwks_file", "jwks_url", "external_subject_claim")
        }
        named_keys = optional["jwks_file"] or optional["jwks_url"]
        # RFC 9068 section 4, RFC 8725 section 3.9: without it, a token the same issuer (or
        # the same keys) minted for any other service would be accepted here. Reported, and
        # the rest still read so that every problem of the section is listed at once.
        no_audience = optional["audience"] is None
        if no_audience and "audience" not in raw:
            self.problem(
                raw.line,
                "tokens need an 'audience': the 'aud' value that tokens for this PDP carry "
                "(RFC 9068 section 4); without one, tokens minted for any other service "
                "would be accepted",
            )
        if named_keys and optional["issuer"] is None and "issuer" not in raw:
            # RFC 9068 section 4: `iss` must match exactly. Keys alone do not name an issuer:
            # a multi-tenant IdP signs every tenant's tokens with the same keys.
            self.problem(
                raw.line,
                "tokens need an 'issuer': the 'iss' value of the tokens these keys verify "
                "(RFC 9068 section 4); without one, a token from any issuer sharing the keys "
                "(another tenant of the same IdP) would be accepted",
            )
            no_audience = True  # refused below, after the other fields are read
        if optional["jwks_file"] and optional["jwks_url"]:
            self.problem(raw.line, "tokens name one of 'jwks_file' or 'jwks_url', not both")
            return None
        if not named_keys and not optional["issuer"]:
            self.problem(
                raw.line,
                "tokens need 'jwks_file', 'jwks_url', or an 'issuer' whose keys are discovered",
            )
            return None
        # Only the issuer named: its keys are found through its metadata (RFC 8414, OIDC).
        discovery = self._choice(
            raw, "discovery", _discovery_mode, ", ".join(DISCOVERY_MODES), default="auto"
        )
        if named_keys and "discovery" in raw:
            self.problem(
                raw.line_of("discovery"),
                "'discovery' applies only to tokens naming no 'jwks_file' or 'jwks_url'",
            )
            return None
        algorithms = raw.get("algorithms", list(DEFAULT_ALGORITHMS))
        if not (
            isinstance(algorithms, list)
            and algorithms
            and all(a in SUPPORTED_ALGORITHMS for a in algorithms)
        ):
            self.problem(
                raw.line_of("algorithms"),
                f"'algorithms' must list some of {', '.join(SUPPORTED_ALGORITHMS)}",
            )
            return None
        required, leeway = raw.get("required", False), raw.get("leeway_seconds", 30)
        if not isinstance(required, bool):
            self.problem(
                raw.line_of("required"), f"'required' must be true or false{_got(required)}"
            )
            return None
        if isinstance(leeway, bool) or not isinstance(leeway, int) or not 0 <= leeway <= 300:
            self.problem(raw.line_of("leeway_seconds"), "'leeway_seconds' must be 0 to 300")
            return None
        # Which claim names the application a token was issued to (RFC 9068 section 2.2
        # client_id, OIDC Core section 2 azp); `none` turns the binding off.
        application_claim = self._choice(
            raw,
            "application_claim",
            _application_claim,
            ", ".join(APPLICATION_CLAIMS),
            default=DEFAULT_APPLICATION_CLAIM,
        )
        organization_claim = self._string(raw, "organization_claim", required=False) or None
        if organization_claim is not None and organization_claim != organization_claim.strip():
            self.problem(
                raw.line_of("organization_claim"),
                "'organization_claim' is a claim name, without surrounding spaces",
            )
            return None
        jwks_hosts = self._jwks_hosts(raw)
        if jwks_hosts is None:
            return None
        if jwks_hosts and named_keys:
            self.problem(
                raw.line_of("jwks_hosts"),
                "'jwks_hosts' applies only to tokens naming no 'jwks_file' or 'jwks_url' "
                "(keys discovered from the issuer's metadata)",
            )
            return None
        if no_audience or optional["issuer"] is None:
            return None
        return TokenSettings(
            required=required,
            application_claim=application_claim,
            organization_claim=organization_claim,
            jwks_hosts=jwks_hosts,
            discovery=discovery,
            algorithms=tuple(algorithms),
            leeway_seconds=leeway,
            line=raw.line,
            **optional,
        )

    def _jwks_hosts(self, raw: PositionedDict) -> tuple[str, ...] | None:
        """`tokens.jwks_hosts`: () when absent, None (a problem recorded) when invalid."""
        hosts = raw.get("jwks_hosts")
        if hosts is None:
            return ()
        line = raw.line_of("jwks_hosts")
        if not isinstance(hosts, list) or not hosts or len(hosts) > MAX_JWKS_HOSTS:
            self.problem(
                line, f"'jwks_hosts' must list 1 to {MAX_JWKS_HOSTS} hosts{_as_written(hosts)}"
            )
            return None
        for entry in hosts:
            problem = (
                jwks_host_problem(entry)
                if isinstance(entry, str)
                else f"{_shown(entry)} is not a string"
            )
            if problem is not None:
                self.problem(line, f"jwks_hosts: {problem}")
                return None
        return tuple(hosts)

    def policy(self, doc: PositionedDict) -> Policy | None:
        name = self._name(doc, "name")
        self._check_keys(
            doc,
            _POLICY_KEYS,
            "Policy",
            name,
        )
        layer = self._choice(
            doc, "layer", _layer, "org, user, application", default=None, policy=name
        )
        target = self._target(doc, "target", name)
        owned_by = _OWNER_DIMENSION.get(layer)
        raw_target = doc.get("target")
        if owned_by and not (isinstance(raw_target, dict) and owned_by in raw_target):
            self.problem(
                doc.line_of("target"),
                f"a {layer} policy must name its {owned_by} in target.{owned_by}",
                name,
            )
        cache = doc.get("cache", True)
        if not isinstance(cache, bool):
            self.problem(doc.line_of("cache"), f"'cache' must be true or false{_got(cache)}", name)
            cache = True
        description = doc.get("description", "")
        if not isinstance(description, str):
            self.problem(
                doc.line_of("description"),
                f"'description' must be text{_as_written(description)}",
                name,
            )
        raw_rules = doc.get("rules")
        if not isinstance(raw_rules, list) or not raw_rules:
            self.problem(doc.line_of("rules"), "'rules' must be a non-empty list", name)
            return None
        rules: list[Rule] = []
        seen: set[str] = set()
        for raw_rule in raw_rules:
            if not isinstance(raw_rule, PositionedDict):
                self.problem(doc.line_of("rules"), "each rule must be a mapping", name)
                continue
            rule = self.rule(raw_rule, name)
            if rule is None:
                continue
            if rule.name in seen:
                self.problem(rule.position.line, f"duplicate rule name {rule.name!r}", name)
            seen.add(rule.name)
            rules.append(rule)
        # Keep the valid rules even when others are broken, so their CEL is checked too: the
        # set as a whole is refused anyway because the problems were recorded.
        if layer is None or not name:
            return None
        return Policy(
            name=name,
            layer=layer,
            description=description if isinstance(description, str) else "",
            target=target,
            rules=tuple(rules),
            position=self._position(doc),
            cache=cache,
        )

    def quota(self, doc: PositionedDict) -> QuotaDefinition | None:
        """A `kind: Quota` document; None (with every problem recorded) when it is invalid."""
        name = self._name(doc, "name")
        where = f"quota {name}" if name else "quota"
        self._check_keys(doc, _QUOTA_KEYS, "Quota")
        description = doc.get("description", "")
        if not isinstance(description, str):
            self.problem(
                doc.line_of("description"),
                f"{where}: 'description' must be text{_as_written(description)}",
            )
        before = len(self.issues)
        target = self._target(doc, "target")  # its problems name the file and line
        limit = doc.get("limit")
        if limit is None:
            self.problem(doc.line, f"{where}: missing required field 'limit'")
        elif (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= QUOTA_MAX_LIMIT
        ):
            self.problem(
                doc.line_of("limit"),
                f"{where}: 'limit' must be a whole number from 1 to {QUOTA_MAX_LIMIT:,}"
                f"{_got(limit)}",
            )
            limit = None
        window_ms = self._window(doc, where)
        algorithm = self._choice(
            doc, "algorithm", _keyword(_ALGORITHMS), "fixed, sliding", default="fixed"
        )
        when_unavailable = self._choice(
            doc, "when_unavailable", _keyword(_WHEN_UNAVAILABLE), "deny, allow", default="deny"
        )
        per = self._per(doc, where)
        if (
            not name
            or limit is None
            or window_ms is None
            or per is None
            or len(self.issues) != before
        ):
            return None
        return QuotaDefinition(
            name=sys.intern(name),
            description=description if isinstance(description, str) else "",
            target=target,
            limit=limit,
            window_ms=window_ms,
            algorithm=algorithm,
            per=per,
            when_unavailable=when_unavailable,
            position=self._position(doc),
        )

    def _window(self, doc: PositionedDict, where: str) -> int | None:
        """`window` (`<n>s|m|h|d`, 1 s to 31 d) in milliseconds; None when absent or bad."""
        raw = doc.get("window")
        if raw is None:
            self.problem(doc.line, f"{where}: missing required field 'window' (e.g. 1h)")
            return None
        match = QUOTA_WINDOW.fullmatch(raw) if isinstance(raw, str) else None
        window_ms = (
            int(match.group(1)) * QUOTA_UNITS_MS[match.group(2)] if match is not None else None
        )
        if window_ms is None or not QUOTA_MIN_WINDOW_MS <= window_ms <= QUOTA_MAX_WINDOW_MS:
            self.problem(
                doc.line_of("window"),
                f"{where}: 'window' must be a whole number of s, m, h or d from 1s to 31d "
                f"(e.g. 90s, 15m, 1h, 7d), not {_shown(raw)}",
            )
            return None
        return window_ms

    def _per(self, doc: PositionedDict, where: str) -> tuple[str, ...] | None:
        """`per`: distinct parts of QUOTA_PER_PARTS; absent or [] is the whole organization."""
        raw = doc.get("per", [])
        if not isinstance(raw, list):
            self.problem(
                doc.line_of("per"),
                f"{where}: 'per' must be a list of {', '.join(QUOTA_PER_PARTS)}{_got(raw)}",
            )
            return None
        parts: list[str] = []
        for item in raw:
            if item == "organization":
                problem = "'organization' is always part of a quota's key: leave it out"
            elif not isinstance(item, str) or item not in QUOTA_PER_PARTS:
                problem = f"{_shown(item)} is not one of {', '.join(QUOTA_PER_PARTS)}"
            elif item in parts:
                problem = f"{item!r} is listed twice"
            else:
                parts.append(item)
                continue
            self.problem(doc.line_of("per"), f"{where}: per: {problem}")
            return None
        return tuple(parts)

    def rule(self, doc: PositionedDict, policy: str) -> Rule | None:
        name = self._name(doc, "name", policy)
        self._check_keys(doc, _RULE_KEYS, "rule", policy, name)
        effect = self._choice(
            doc, "effect", _effect, "allow, deny", default=None, policy=policy, rule=name
        )
        condition = doc.get("condition")
        if condition is not None and (not isinstance(condition, str) or not condition.strip()):
            self.problem(
                doc.line_of("condition"),
                f"'condition' must be a CEL expression string{_as_written(condition)}",
                policy,
                name,
            )
            return None
        code = self._choice(
            doc,
            "code",
            _code,
            _RULE_CODE_CHOICES,
            default=ErrorCode.POLICY_DENIED,
            policy=policy,
            rule=name,
        )
        if code not in RULE_CODES:
            self.problem(
                doc.line_of("code"), f"code {code.value!r} is reserved for the engine", policy, name
            )
        if effect is Effect.ALLOW and "code" in doc:
            self.problem(doc.line_of("code"), "only deny rules carry a code", policy, name)
        message = doc.get("message", "")
        if not isinstance(message, str):
            self.problem(
                doc.line_of("message"),
                f"'message' must be a string{_as_written(message)}",
                policy,
                name,
            )
            message = ""
        if effect is None or not name:
            return None
        # A block scalar's text starts on the line after its `|` or `>` indicator.
        first_line = doc.value_lines.get("condition", doc.line)
        if doc.block_scalar.get("condition"):
            first_line += 1
        # Rule names, conditions and messages repeat across thousands of generated or
        # templated files: one string each (interned strings are freed with their last user).
        return Rule(
            name=sys.intern(name),
            effect=effect,
            condition=None if condition is None else sys.intern(condition),
            target=self._target(doc, "target", policy, name),
            message=sys.intern(message),
            code=code,
            position=self._position(doc),
            condition_position=Position(self.file, first_line),
        )


EVERYWHERE = Target()  # no target: every dimension `*`
EVERYWHERE_VALUES = EVERYWHERE.subjects


@functools.lru_cache(maxsize=TARGET_CACHE_SIZE)
def _shared_target(
    subjects: tuple[str, ...],
    applications: tuple[str, ...],
    integrations: tuple[str, ...],
    scopes: tuple[str, ...],
) -> Target:
    """One immutable Target (and one tuple per dimension) per distinct target: the same rule
    targets recur across thousands of files, each then held once."""
    return Target(subjects, applications, integrations, scopes)


# Fields each document kind allows; built once, as every rule of every file is checked.
_TARGET_KEYS = frozenset(TARGET_DIMENSIONS)
_POLICY_KEYS = frozenset({"kind", "name", "layer", "description", "target", "rules", "cache"})
_RULE_KEYS = frozenset({"name", "effect", "condition", "target", "message", "code"})
_QUOTA_KEYS = frozenset(
    {"kind", "name", "description", "target", "limit", "window", "algorithm", "per",
     "when_unavailable"}
)  # fmt: skip
_ALGORITHMS = ("fixed", "sliding")
_WHEN_UNAVAILABLE = ("deny", "allow")
_RULE_CODE_CHOICES = ", ".join(sorted(c.value for c in RULE_CODES))


# Who owns a layer's policies decides which target dimension each must name explicitly.
_OWNER_DIMENSION = {Layer.USER: "subjects", Layer.APPLICATION: "applications"}


# Keywords are matched exactly as documented: one spelling each, no case folding.
EFFECT_KEYWORDS: dict[str, Effect] = {"allow": Effect.ALLOW, "deny": Effect.DENY}
LAYER_KEYWORDS: dict[str, Layer] = {layer.value: layer for layer in POLICY_LAYERS}


def _code(raw: str) -> ErrorCode:
    return ErrorCode(raw)


def _effect(raw: str) -> Effect:
    return EFFECT_KEYWORDS[raw] if raw in EFFECT_KEYWORDS else _refuse(raw)


def _layer(raw: str) -> Layer:
    return LAYER_KEYWORDS[raw] if raw in LAYER_KEYWORDS else _refuse(raw)


def _keyword(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A `_choice` parser accepting exactly `choices`."""
    return lambda raw: raw if raw in choices else _refuse(raw)


def _application_claim(raw: str) -> str:
    return raw if raw in APPLICATION_CLAIMS else _refuse(raw)


def _refuse(raw: str) -> Any:
    raise ValueError(raw)


def _shown(value: Any) -> str:
    """A value as the operator wrote it: the strict YAML reader types only `true`, `false`,
    `null` and plain decimal integers, whose text is exactly this."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return repr(value)
    return "a list" if isinstance(value, list) else "a mapping"


def _as_written(value: Any) -> str:
    """For a field that wants text: how a plain scalar was read, and how to write it as text."""
    if isinstance(value, bool | int) or value is None:
        kind = "a boolean" if isinstance(value, bool) else "null" if value is None else "a number"
        text = _shown(value)
        return f" (`{text}` is read as {kind}: write '{text}' in quotes)"
    if isinstance(value, list | dict):
        return f", not {_shown(value)}"
    return ""


def _discovery_mode(value: str) -> str:
    if value not in DISCOVERY_MODES:
        raise ValueError(value)
    return value


def _got(value: Any) -> str:
    return f", not {_shown(value)}"
