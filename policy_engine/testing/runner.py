"""Runs policy test suites through the path `pdp eval` takes, and measures rule coverage.

Each case's request is built by `pdp eval`'s own builder (`request_message`, the broker's
`check_request`), serialized, parsed and converted as the server does (`dry_run`), and decided
with the explain trace on: every rule whose target applies is evaluated, so the trace says
for each one whether its condition matched, did not match, or failed to evaluate.

An ALLOW is then counted in the quotas it matches as the server counts it (`DryRunQuotas`):
a suite's cases share one in-process counter store whose clock is each case's time, so a
case can show a quota exhausted (`quota_used` tops its bucket up first) and a later one, at
a time in the next window, the quota freed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from policy_engine.auth.keys import StaticKeySet, parse_jwks
from policy_engine.auth.tokens import UNVERIFIED
from policy_engine.client import RequestValueError
from policy_engine.domain.decision import Decision, Effect, Layer, RuleResult
from policy_engine.domain.request import SubjectKind
from policy_engine.policy import CompiledPolicySet, LoadIssue
from policy_engine.policy.compiled import CompiledOrganization
from policy_engine.policy.identities import Resolved
from policy_engine.policy.source import SourceError, is_suite_file, read_bounded, tree_files
from policy_engine.quota.dry_run import DryRunQuotas
from policy_engine.testing.suite import Case, Suite, SuiteError, parse_suite

# A signed case token is valid for this long from the case's time unless its claims say.
TOKEN_LIFETIME = timedelta(hours=1)
# The `aud` and `iss` a suite's fixture-key tokens carry, and are checked for, when the
# organization under test has no `tokens:` (so no audience or issuer of its own).
SUITE_AUDIENCE = "pdp-test"
SUITE_ISSUER = "https://pdp-test.invalid"
MAX_SUITE_BYTES = 4 * 1024 * 1024

RuleKey = tuple[str, Layer, str, str]  # organization, layer, policy, rule


@dataclass(frozen=True, slots=True)
class CaseResult:
    suite: Suite
    case: Case
    passed: bool
    decision: Decision | None
    problems: tuple[str, ...] = ()  # why it failed: each a mismatch or an error

    @property
    def full_name(self) -> str:
        """`organization/suite/case`: what --run matches and reports name."""
        return f"{self.suite.organization}/{self.suite.name}/{self.case.name}"


@dataclass(slots=True)
class RuleCoverage:
    matched: int = 0
    not_matched: int = 0
    error: int = 0


@dataclass(slots=True)
class Coverage:
    """Per (organization, layer, policy, rule): how often cases made it match, not match or
    fail to evaluate. A rule whose target never applied to any case has all three at 0."""

    rules: dict[RuleKey, RuleCoverage] = field(default_factory=dict)

    def record(self, organization: str, decision: Decision) -> None:
        for layer in decision.trace:
            for rule in layer.rules:
                counts = self.rules.setdefault(
                    (organization, layer.layer, rule.policy, rule.rule), RuleCoverage()
                )
                if rule.result is RuleResult.MATCHED:
                    counts.matched += 1
                elif rule.result is RuleResult.NOT_MATCHED:
                    counts.not_matched += 1
                else:
                    counts.error += 1

    def percent(self, organization: str | None = None) -> float:
        """The share of rules (of `organization`, or of all) matched at least once, 0-100;
        100 for no rules."""
        chosen = [c for k, c in self.rules.items() if organization in (None, k[0])]
        if not chosen:
            return 100.0
        return 100.0 * sum(1 for c in chosen if c.matched) / len(chosen)

    def organizations(self) -> list[str]:
        return sorted({key[0] for key in self.rules})


@dataclass(frozen=True, slots=True)
class Outcome:
    results: tuple[CaseResult, ...]
    coverage: Coverage

    @property
    def failed(self) -> tuple[CaseResult, ...]:
        return tuple(r for r in self.results if not r.passed)


def find_suites(directory: Path) -> list[Suite]:
    """Every suite below `directory` (`*.test.yaml`/`*.test.yml`, not hidden), parsed.

    Raises SuiteError listing every problem of every suite, with file:line; names a suite
    name used twice in an organization."""
    issues: list[LoadIssue] = []
    suites: list[Suite] = []
    for relative in tree_files(directory):
        parts = relative.split("/")
        if not is_suite_file(parts[-1]) or any(p.startswith(".") for p in parts):
            continue
        try:
            data = read_bounded(directory / relative, MAX_SUITE_BYTES).data
        except SourceError as exc:
            issues.append(LoadIssue(directory / relative, 0, str(exc)))
            continue
        suite = parse_suite(directory, relative, data, issues)
        if suite is not None:
            suites.append(suite)
    seen: dict[tuple[str, str], Path] = {}
    for suite in suites:
        other = seen.setdefault((suite.organization, suite.name), suite.path)
        if other != suite.path:
            issues.append(
                LoadIssue(directory / suite.path, 1, f"suite name {suite.name!r} is also {other}")
            )
    if issues:
        raise SuiteError(issues)
    return suites


def run_suites(
    policies: CompiledPolicySet,
    suites: Sequence[Suite],
    *,
    select: re.Pattern[str] | None = None,
    now: datetime | None = None,
) -> Outcome:
    """Runs the cases of `suites` (those whose `organization/suite/case` name `select`
    searches) against `policies`. Coverage lists every rule of every organization a suite
    tests, whether or not a case reached it. `now`: the instant for cases with no time."""
    from policy_engine.cli.main import with_key_set

    now = now or datetime.now(UTC)
    coverage = Coverage()
    results: list[CaseResult] = []
    for suite in suites:
        organization = policies.organizations.get(suite.organization)
        if organization is not None:
            for key in _rules_of(organization):
                coverage.rules.setdefault(key, RuleCoverage())
        suite_policies = policies
        if suite.keys:
            jwks = json.dumps({"keys": [key.public_jwk for key in suite.keys.values()]})
            keys = StaticKeySet(parse_jwks(jwks, f"{suite.path} fixtures.keys"))
            # An organization without `tokens:` names no issuer and no audience; its suite's
            # tokens are then minted with, and checked against, the suite's own.
            bare = organization is not None and organization.tokens.audience is None
            suite_policies = with_key_set(
                policies,
                suite.organization,
                keys,
                audience=SUITE_AUDIENCE if bare else None,
                issuer=SUITE_ISSUER if bare else None,
            )
        quotas = DryRunQuotas()
        for case in suite.cases:
            name = f"{suite.organization}/{suite.name}/{case.name}"
            if select is not None and not select.search(name):
                continue
            result = run_case(suite_policies, suite, case, now, quotas)
            if result.decision is not None:
                coverage.record(suite.organization, result.decision)
            results.append(result)
    return Outcome(tuple(results), coverage)


def run_case(
    policies: CompiledPolicySet,
    suite: Suite,
    case: Case,
    now: datetime,
    quotas: DryRunQuotas | None = None,
) -> CaseResult:
    """One case decided as `pdp eval --explain` decides it, its ALLOW counted in `quotas`
    (a store of its own when None), and compared with its expectation."""
    from policy_engine.cli.main import UsageError, dry_run, request_message

    at = case.time or now
    organization = policies.organizations.get(suite.organization)
    try:
        token = _token(suite, case, organization, at)
        message = request_message(
            suite.organization,
            case.subject.id,
            case.application.id,
            case.integration.id,
            case.scope,
            subject_kind=case.subject.kind,
            subject_attributes=dict(case.subject.attributes),
            access_token=token,
            application_attributes=dict(case.application.attributes),
            integration_attributes=dict(case.integration.attributes),
            context=dict(case.context),
            time=case.time,
            explain=True,
            subject_namespace=case.subject.namespace,
        )
        decision = dry_run(message, policies, now=at)
    except (RequestValueError, UsageError, ValueError, TypeError) as exc:
        return CaseResult(suite, case, False, None, (f"the request cannot be built: {exc}",))
    request = (case.subject.id, case.application.id, case.integration.id, case.scope)
    decision, problems = (quotas or DryRunQuotas()).count(
        organization, request, decision, at, case.quota_used
    )
    if problems:
        return CaseResult(suite, case, False, decision, tuple(f"quota_used: {p}" for p in problems))
    return CaseResult(suite, case, *_compare(case, decision))


def _compare(case: Case, decision: Decision) -> tuple[bool, Decision, tuple[str, ...]]:
    expect = case.expect
    problems: list[str] = []
    if decision.effect is not expect.decision:
        problems.append(f"decision: expected {expect.decision.value}, got {decision.effect.value}")
    wanted = {
        "code": expect.code.value if expect.code else None,
        "layer": expect.layer.value if expect.layer else None,
        "policy": expect.policy,
        "rule": expect.rule,
    }
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if wanted and not problems:
        # A deny is explained by its reasons, an allow by the rules that matched.
        found: list[dict[str, str]] = (
            [
                {"code": r.code.value, "layer": r.layer.value, "policy": r.policy, "rule": r.rule}
                for r in decision.reasons
            ]
            if decision.effect is Effect.DENY
            else [
                {"layer": m.layer.value, "policy": m.policy, "rule": m.rule}
                for m in decision.matched_rules
            ]
        )
        if not any(all(item.get(k) == v for k, v in wanted.items()) for item in found):
            what = "reason" if decision.effect is Effect.DENY else "matched allow rule"
            shown = "; ".join(" ".join(f"{k}={v}" for k, v in item.items()) for item in found)
            problems.append(
                f"no {what} with {' '.join(f'{k}={v}' for k, v in wanted.items())}"
                f" (got: {shown or 'none'})"
            )
    return not problems, decision, tuple(problems)


def _token(
    suite: Suite, case: Case, organization: CompiledOrganization | None, at: datetime
) -> str:
    """The case's access token: as written, or signed with its fixture key over its claims
    merged over sub (the subject ID; for an external user, the person its mapping gives, when
    it has one), iat (the case time), exp (+1 h), the organization's issuer and audience when
    it sets them (for an organization without `tokens:`, SUITE_ISSUER and SUITE_AUDIENCE),
    the organization's name under its `organization_claim` when it binds one, the case's
    application under the claim binding tokens to applications (`client_id` unless
    `tokens.application_claim` says otherwise: a token the case's application was issued),
    and, for an external user, its ID under the organization's `external_subject_claim`. A
    claim the case gives overrides any of these; one given as null is left out (`client_id:
    null`: a token naming no application)."""
    import jwt

    spec = case.token
    if spec is None:
        return ""
    if spec.raw:
        return spec.raw
    key = suite.keys[spec.key]
    subject = case.subject
    claims: dict[str, Any] = {
        "sub": subject.id,
        "iat": int(at.timestamp()),
        "exp": int((at + TOKEN_LIFETIME).timestamp()),
    }
    tokens = organization.tokens if organization is not None else UNVERIFIED
    if organization is not None and subject.kind == SubjectKind.EXTERNAL_USER.value:
        resolved = organization.identities.resolve(
            case.application.id, subject.namespace, subject.id
        )
        if isinstance(resolved, Resolved):
            claims["sub"] = resolved.person
        if tokens.external_subject_claim:
            claims[tokens.external_subject_claim] = subject.id
    if tokens.issuer:
        claims["iss"] = tokens.issuer
    if tokens.audience:
        claims["aud"] = tokens.audience
    if tokens.application_claim:
        claims[tokens.application_claim] = case.application.id
    if tokens.organization_claim:
        claims[tokens.organization_claim] = tokens.organization
    claims.update(spec.claims)
    claims = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})


def _rules_of(organization: CompiledOrganization) -> Iterable[RuleKey]:
    """Every rule of the organization that some request could reach (a rule is listed once
    however many integrations it targets)."""
    seen: set[RuleKey] = set()
    for layer, index in organization.layers.items():
        for bucket in index.by_integration.values():
            for rules in (bucket.denies.rules, bucket.allows.rules):
                for rule in rules:
                    key = (organization.name, layer, rule.policy, rule.name)
                    if key not in seen:
                        seen.add(key)
                        yield key


def summary_counts(outcome: Outcome) -> Counter[str]:
    return Counter("passed" if r.passed else "failed" for r in outcome.results)
