"""Re-decide audit decision records against candidate policies and count what would change.

Each record is decided again as `pdp eval` decides a tuple (the broker's message, decoded as
the server decodes it) with the recorded inputs and the recorded decision time as the clock.
A record whose inputs the log does not hold exactly is never guessed at: it is counted under
a reason (see `unreplayable_reason`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm

from policy_engine.audit.record import REDACTED
from policy_engine.audit.sinks.file import _STAMP, _stamp_key
from policy_engine.audit.verify import iter_lines
from policy_engine.auth.keys import StaticKeySet, parse_jwks
from policy_engine.cli.main import UsageError, dry_run, request_message
from policy_engine.client import RequestValueError
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect, reason_to_dict
from policy_engine.policy import CompiledPolicySet

ALLOW_TO_DENY = "ALLOW->DENY"
DENY_TO_ALLOW = "DENY->ALLOW"
CODE_CHANGED = "code_changed"
LAYER_CHANGED = "layer_changed"
RULE_CHANGED = "rule_changed"
UNCHANGED = "unchanged"
# In order of severity: a record counts under the first kind that applies.
CHANGE_KINDS = (ALLOW_TO_DENY, DENY_TO_ALLOW, CODE_CHANGED, LAYER_CHANGED, RULE_CHANGED, UNCHANGED)
GROUP_BY = ("organization", "application", "integration", "rule")
EXAMPLES = 3  # decision IDs kept per group
REPLAYABLE_VERSIONS = frozenset({1, 2})
_REDACTED_BYTES = REDACTED.encode()
REPLAY_KID = "pdp-replay"  # the key replay signs recorded token claims with
MEMO_SIZE = 65_536  # decisions kept for records with the same inputs
# Context keys that `request_message` reads as fields: an attribute so named cannot be replayed.
_CONTEXT_FIELDS = frozenset({"connection", "client_ip", "session_id", "time"})
# Codes the server answers without the engine deciding: replaying them says nothing.
_NOT_DECIDED = {
    ErrorCode.VALIDATION_ERROR.value: "invalid_request_not_recorded",
    ErrorCode.SERVER_ERROR.value: "server_error",
    ErrorCode.RATE_LIMITED.value: "rate_limited",
}
_ROTATED = re.compile(rf"(?P<base>.+)\.(?P<stamp>{_STAMP.pattern})")


class Unreplayable(Exception):
    """A record that cannot be re-decided exactly; `reason` names why (snake_case)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def order_audit_files(paths: Sequence[Path]) -> list[Path]:
    """`paths` oldest first: each log's rotated files (`NAME.<stamp>`) by stamp, then NAME."""

    def key(path: Path) -> tuple[str, str, int, tuple[str, int]]:
        rotated = _ROTATED.fullmatch(path.name)
        if rotated:
            return str(path.parent), rotated["base"], 0, _stamp_key(rotated["stamp"])
        return str(path.parent), path.name, 1, ("", 0)

    return sorted(paths, key=key)


def _holds_redacted(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_holds_redacted(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_redacted(v) for v in value)
    return value == REDACTED


def unreplayable_reason(record: Mapping[str, Any], *, may_redact: bool = True) -> str | None:
    """Why a decision record cannot be replayed exactly, or None when it can. `may_redact`
    False: the caller knows the record's text holds no `[redacted]` (skips that walk).

    Reasons: unknown_schema_version, truncated_fields, invalid_request_not_recorded,
    server_error, rate_limited, token_claims_not_recorded (a version 1 record holds the token
    only as a hash), token_refused (the engine refused the token: its claims are not kept),
    redacted_attribute (a credential-named attribute's or claim's value was kept out of the
    log), context_attribute_name_clash, malformed_record.
    """
    try:
        if record.get("schema_version") not in REPLAYABLE_VERSIONS:
            return "unknown_schema_version"
        if record.get("truncated"):
            return "truncated_fields"
        for reason in record["reasons"]:
            not_decided = _NOT_DECIDED.get(reason["code"])
            if not_decided:
                return not_decided
        if record["subject"]["token_sha256"] is not None:
            if "token_claims" not in record["subject"]:
                return "token_claims_not_recorded"
            claims = record["subject"]["token_claims"]
            if claims is None:
                return "token_refused"
            if not isinstance(claims, dict):
                return "malformed_record"
            if may_redact and _holds_redacted(claims):
                return "redacted_attribute"
        parts = (record["subject"], record["application"], record["integration"])
        context = record["context"]["attributes"]
        if may_redact and (
            any(_holds_redacted(part["attributes"]) for part in parts) or _holds_redacted(context)
        ):
            return "redacted_attribute"
        if _CONTEXT_FIELDS.intersection(context):
            return "context_attribute_name_clash"
    except (KeyError, TypeError, AttributeError):
        return "malformed_record"
    return None


def _time(raw: str) -> datetime:
    parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def replay_record(record: Mapping[str, Any], policies: CompiledPolicySet) -> Decision:
    """The decision `policies` give the record's tuple at the record's decision time.

    Raises Unreplayable (with `unreplayable_reason`'s names, or unrepresentable_value).
    """
    reason = unreplayable_reason(record)
    if reason:
        raise Unreplayable(reason)
    return TokenReplay(policies).decide(record)


class TokenReplay:
    """Recorded token claims replayed as a token: signed with a key made for this replay,
    which the candidate's organizations that verify tokens trust instead of their own (the
    claims were verified when the decision was made). Issuer, audience, times and subject
    binding are checked by the candidate's own rules at the recorded time."""

    def __init__(self, policies: CompiledPolicySet) -> None:
        self._key = ed25519.Ed25519PrivateKey.generate()
        jwk = json.loads(OKPAlgorithm.to_jwk(self._key.public_key()))
        keys = StaticKeySet(
            parse_jwks(json.dumps({"keys": [{**jwk, "kid": REPLAY_KID, "alg": "EdDSA"}]}))
        )
        organizations = {
            name: dataclasses.replace(
                org,
                tokens=dataclasses.replace(org.tokens, keys=keys, algorithms=("EdDSA",)),
            )
            if org.tokens.keys is not None
            else org
            for name, org in policies.organizations.items()
        }
        self.policies = dataclasses.replace(policies, organizations=MappingProxyType(organizations))

    def token(self, claims: Mapping[str, Any]) -> str:
        """A token carrying exactly `claims`, signed with this replay's key."""
        return jwt.encode(dict(claims), self._key, algorithm="EdDSA", headers={"kid": REPLAY_KID})

    def decide(self, record: Mapping[str, Any]) -> Decision:
        """`replay_record` for a record `unreplayable_reason` has passed."""
        claims = record["subject"].get("token_claims")
        try:
            token = self.token(claims) if claims is not None else ""
        except (TypeError, ValueError):  # PyJWT refuses some claim types (e.g. a numeric iss)
            raise Unreplayable("unrepresentable_value") from None
        return _decide(record, self.policies, token)


def _decide(record: Mapping[str, Any], policies: CompiledPolicySet, token: str) -> Decision:
    try:
        subject, context = record["subject"], record["context"]
        message = request_message(
            record["organization"],
            subject["id"],
            record["application"]["id"],
            record["integration"]["id"],
            record["scope"],
            subject_kind=subject["kind"],
            subject_attributes=subject["attributes"],
            access_token=token,
            application_attributes=record["application"]["attributes"],
            integration_attributes=record["integration"]["attributes"],
            context={
                **context["attributes"],
                "connection": context["connection"],
                "client_ip": context["client_ip"],
                "session_id": context["session_id"],
            },
            time=_time(context["time"]) if context["time"] is not None else None,
            explain=False,
        )
        return dry_run(message, policies, now=_time(record["time"]))
    except RequestValueError:
        raise Unreplayable("unrepresentable_value") from None
    except (KeyError, TypeError, AttributeError, ValueError, UsageError):
        raise Unreplayable("malformed_record") from None


def _rule_of(effect: str, reasons: Sequence[Mapping[str, Any]], matched: Iterable[Any]) -> str:
    """`policy/rule` that decided: the first denying reason, else the first matched allow."""
    if effect == Effect.DENY.value:
        for reason in reasons:
            if reason.get("rule"):
                return f"{reason.get('policy')}/{reason['rule']}"
        return f"(no rule: {reasons[0].get('code')})" if reasons else "(no rule)"
    for rule in matched:
        if rule["effect"] == Effect.ALLOW.value:
            return f"{rule['policy']}/{rule['rule']}"
    return "(no rule)"


def _shape(reasons: Iterable[Mapping[str, Any]], key: str) -> list[str]:
    return sorted(str(r.get(key)) for r in reasons)


def compare(record: Mapping[str, Any], decision: Decision) -> tuple[str, str]:
    """(change kind, deciding rule as `old -> new`, or the rule when it is the same)."""
    old, new = record["decision"], decision.effect.value
    old_reasons = record["reasons"]
    new_reasons = [reason_to_dict(r) for r in decision.reasons]
    new_matched = [
        {"policy": m.policy, "rule": m.rule, "effect": m.effect.value}
        for m in decision.matched_rules
    ]
    old_rule = _rule_of(old, old_reasons, record.get("matched_rules") or ())
    new_rule = _rule_of(new, new_reasons, new_matched)
    rule = old_rule if old_rule == new_rule else f"{old_rule} -> {new_rule}"
    if old != new:
        return (ALLOW_TO_DENY if old == Effect.ALLOW.value else DENY_TO_ALLOW), rule
    for key, kind in (("code", CODE_CHANGED), ("layer", LAYER_CHANGED)):
        if _shape(old_reasons, key) != _shape(new_reasons, key):
            return kind, rule
    if old_rule != new_rule:
        return RULE_CHANGED, rule
    return UNCHANGED, rule


@dataclass
class _Group:
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


@dataclass
class Replay:
    """What replaying records against one policy set found, added to record by record."""

    policies: CompiledPolicySet
    counts: Counter[str] = field(default_factory=Counter)
    # kind -> dimension (GROUP_BY) -> value -> group; unchanged records are only counted.
    groups: dict[str, dict[str, dict[str, _Group]]] = field(default_factory=dict)
    unreplayable: dict[str, _Group] = field(default_factory=dict)
    other_records: int = 0  # checkpoints, dropped-records notes: not decisions
    _memo: dict[str, Decision] = field(default_factory=dict, repr=False)
    _tokens: TokenReplay = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tokens = TokenReplay(self.policies)

    @property
    def decisions(self) -> int:
        """Decision records seen, replayed or not."""
        return sum(self.counts.values()) + sum(g.count for g in self.unreplayable.values())

    @property
    def new_allows(self) -> int:
        return self.counts[DENY_TO_ALLOW]

    def cannot(self, reason: str, example: str) -> None:
        self.unreplayable.setdefault(reason, _Group()).add(example)

    def add(self, record: Any, where: str, *, may_redact: bool = True) -> None:
        """Replay one parsed record; `where` ("file:line") names it when it has no ID.
        `may_redact` False: its text holds no `[redacted]`."""
        if not isinstance(record, dict):
            self.cannot("malformed_record", where)
            return
        if record.get("type") != "decision":
            self.other_records += 1
            return
        example = str(record.get("decision_id") or where)
        reason = unreplayable_reason(record, may_redact=may_redact)
        if reason:
            self.cannot(reason, example)
            return
        try:
            decision = self._decision(record)
            kind, rule = compare(record, decision)
        except Unreplayable as exc:
            self.cannot(exc.reason, example)
            return
        except (KeyError, TypeError, AttributeError):
            self.cannot("malformed_record", example)
            return
        self.counts[kind] += 1
        if kind == UNCHANGED:
            return
        values = (
            record["organization"],
            record["application"]["id"],
            record["integration"]["id"],
            rule,
        )
        by_dimension = self.groups.setdefault(kind, {})
        for dimension, value in zip(GROUP_BY, values, strict=True):
            by_dimension.setdefault(dimension, {}).setdefault(str(value), _Group()).add(example)

    def _decision(self, record: Mapping[str, Any]) -> Decision:
        """The candidate's decision, reused for records with the same inputs when it did not
        read the clock (as the server's cache does): logs repeat tuples, mostly."""
        # repr, not JSON: records are canonical (sorted keys), and repr is several times cheaper.
        key = repr(
            (
                record["organization"],
                record["subject"],
                record["application"],
                record["integration"],
                record["scope"],
                record["context"],
            )
        )
        decision = self._memo.get(key)
        if decision is None:
            decision = self._tokens.decide(record)
            if not decision.time_dependent and decision.valid_until is None:
                if len(self._memo) >= MEMO_SIZE:
                    self._memo.clear()  # bounded memory; a log's hot tuples come back fast
                self._memo[key] = decision
        return decision

    def add_line(self, raw: bytes | str, where: str) -> None:
        if not raw.strip():
            return
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            self.cannot("unreadable_line", where)
            return
        # Without the marker's text or a \u escape (that could spell it), no value is redacted.
        text = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
        self.add(record, where, may_redact=_REDACTED_BYTES in text or b"\\u" in text)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON: decisions, counts (every kind), changes (kind -> dimension ->
        value -> {count, examples}), unreplayable (reason -> {count, examples}),
        other_records, policy_revision."""
        return {
            "policy_revision": self.policies.revision,
            "decisions": self.decisions,
            "counts": {kind: self.counts[kind] for kind in CHANGE_KINDS},
            "changes": {
                kind: {
                    dimension: {value: g.to_dict() for value, g in sorted(values.items())}
                    for dimension, values in self.groups[kind].items()
                }
                for kind in CHANGE_KINDS
                if kind in self.groups
            },
            "unreplayable": {r: g.to_dict() for r, g in sorted(self.unreplayable.items())},
            "other_records": self.other_records,
        }

    def render(self) -> str:
        """The report for people: counts, then each change kind grouped, then what could not
        be replayed."""
        cannot = sum(g.count for g in self.unreplayable.values())
        lines = [
            f"replayed {self.decisions} decision records against policy revision "
            f"{self.policies.revision}"
        ]
        lines += [f"  {kind:<14} {self.counts[kind]}" for kind in CHANGE_KINDS]
        lines.append(f"  {'cannot replay':<14} {cannot}")
        for kind in CHANGE_KINDS:
            if kind not in self.groups:
                continue
            lines.append(f"{kind} ({self.counts[kind]}):")
            for dimension in GROUP_BY:
                lines.append(f"  by {dimension}:")
                groups = self.groups[kind][dimension]
                for value, group in sorted(groups.items(), key=lambda item: -item[1].count):
                    examples = ", ".join(group.examples)
                    lines.append(f"    {value}: {group.count}  e.g. {examples}")
        if self.unreplayable:
            lines.append(f"cannot replay ({cannot}):")
            for reason, group in sorted(self.unreplayable.items()):
                lines.append(f"  {reason}: {group.count}  e.g. {', '.join(group.examples)}")
        return "\n".join(lines)


class Progress:
    """A one-line progress bar on `stream` (a terminal), by bytes read out of `total`."""

    WIDTH = 30
    EVERY = 4096  # records between redraws

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream, self.total, self.done, self.records = stream, max(total, 1), 0, 0

    def step(self, size: int) -> None:
        self.done += size
        self.records += 1
        if self.records % self.EVERY == 0:
            self.draw()

    def draw(self) -> None:
        share = min(self.done / self.total, 1.0)
        filled = round(share * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r[{bar}] {share:4.0%} {self.records} records")
        self.stream.flush()

    def close(self) -> None:
        self.draw()
        self.stream.write("\n")
        self.stream.flush()


def replay_files(
    paths: Sequence[Path],
    policies: CompiledPolicySet,
    *,
    progress: Callable[[int], None] | None = None,
) -> Replay:
    """Replay every record of `paths` (ordered by `order_audit_files`). `progress` is called
    with each line's size in bytes. Raises OSError for a file that cannot be read."""
    replay = Replay(policies)
    for raw, where, _ in iter_lines(order_audit_files(paths)):
        replay.add_line(raw, where)
        if progress is not None:
            progress(len(raw))
    return replay


def terminal_progress(total: Callable[[], int]) -> Progress | None:
    """A progress bar on stderr out of `total()` when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    return Progress(sys.stderr, total())


def replay_redis(
    url: str,
    stream: str,
    policies: CompiledPolicySet,
    *,
    start: str = "-",
    end: str = "+",
    page: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> Replay:
    """Replay the entries of a Redis Stream from ID `start` to `end` (inclusive, XRANGE
    syntax; `-` and `+` for its ends). An entry without the writer's `record` field counts as
    `foreign_entry`. `progress` is called with 1 per entry. Raises redis.RedisError when the
    server cannot be read (a bad ID is a redis.ResponseError)."""
    import redis

    from policy_engine.audit.sinks.redis import RECORD_FIELD

    replay = Replay(policies)
    field_name = RECORD_FIELD.encode()
    client = redis.Redis.from_url(url)
    try:
        low = start
        while True:
            entries = client.xrange(stream, min=low, max=end, count=page)
            for entry_id, fields in entries:
                where = f"{stream}@{entry_id.decode()}"
                raw = fields.get(field_name)
                if raw is None:
                    replay.cannot("foreign_entry", where)
                else:
                    replay.add_line(raw, where)
                if progress is not None:
                    progress(1)
            if len(entries) < page:
                return replay
            low = "(" + entries[-1][0].decode()
    finally:
        client.close()


def stream_length(url: str, stream: str) -> int:
    """XLEN of the stream (0 when it does not exist): the progress bar's total."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.xlen(stream))
    finally:
        client.close()
