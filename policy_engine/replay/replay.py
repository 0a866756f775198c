"""Re-decide audit decision records against candidate policies and count what would change.

Each record is decided again as `pdp eval` decides a tuple (the broker's message, decoded as
the server decodes it) with the recorded inputs and the recorded decision time as the clock.
A record whose inputs the log does not hold exactly is never guessed at: it is counted under
a reason (see `unreplayable_reason`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import re
import stat
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
from policy_engine.auth.fetch import MAX_JWKS_BYTES, JwksFetchError
from policy_engine.auth.keys import KeySetError, RemoteKeySets, StaticKeySet, parse_jwks
from policy_engine.auth.tokens import TokenRules
from policy_engine.cli.main import DEFAULTS, UsageError, dry_run, request_message
from policy_engine.client import MAX_SAFE_INTEGER, RequestValueError
from policy_engine.domain.codes import ErrorCode
from policy_engine.domain.decision import Decision, Effect
from policy_engine.domain.request import (
    CheckRequest,
    ConnectionState,
    RequestContext,
    Resource,
    Subject,
    SubjectKind,
)
from policy_engine.engine.engine import decide
from policy_engine.engine.validation import session_id_valid
from policy_engine.errors import PolicyEngineError
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.replay.reads import organizations_reading_session_id

ALLOW_TO_DENY = "ALLOW->DENY"
DENY_TO_ALLOW = "DENY->ALLOW"
CODE_CHANGED = "code_changed"
LAYER_CHANGED = "layer_changed"
RULE_CHANGED = "rule_changed"
# Same effect, codes, layers and rule, but an external user ID decided as another person
# (a version 3 record's subject.mapped_id against the candidate's identity mapping).
PERSON_CHANGED = "mapped_person_changed"
UNCHANGED = "unchanged"
# In order of severity: a record counts under the first kind that applies.
CHANGE_KINDS = (
    ALLOW_TO_DENY, DENY_TO_ALLOW, CODE_CHANGED, LAYER_CHANGED, RULE_CHANGED, PERSON_CHANGED,
    UNCHANGED,
)  # fmt: skip
GROUP_BY = ("organization", "application", "integration", "rule")
EXAMPLES = 3  # decision IDs kept per group
REPLAYABLE_VERSIONS = frozenset({1, 2, 3, 4, 5})
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
_SHA256 = re.compile("[0-9a-f]{64}")
_TOKEN_KEY_MEMBERS = frozenset({"alg", "kid", "key_set"})


class Unreplayable(PolicyEngineError):
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
    log), context_attribute_name_clash, malformed_record. What depends on the candidate's
    token settings is `token_key_reason`'s.
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
    tokens = TokenReplay(policies)
    reason = tokens.unreplayable(record)
    if reason:
        raise Unreplayable(reason)
    return tokens.decide(record)


def token_key_reason(record: Mapping[str, Any], rules: TokenRules) -> str | None:
    """Why the candidate's token settings `rules` (of the record's organization) might verify
    the record's accepted token otherwise than it was verified, or None when they verify it
    alike or verify no signature at all (then, as when the decision was made without keys,
    the claims are checked for structure and time only). The token itself is not in the log,
    so replay cannot verify it again; it compares what the record says verified it
    (`subject.token_key`, version 5) with what would:

    - token_keys_unknown: the candidate fetches its keys (a JWKS URL, or discovery), which
      replay cannot know offline (unless the operator gives them: `with_jwks_files`);
    - token_key_not_recorded: the record predates token key recording (version 4 or older)
      and the candidate verifies with a JWKS file: which key verified it is unknown;
    - token_algorithm_not_accepted: the candidate's `algorithms` no longer allow its `alg`;
    - token_key_changed: the candidate's JWKS file has no usable key for its (`kid`, `alg`),
      or its key set's fingerprint is not the one that verified it (a rotated or added key,
      or a token accepted unverified);
    - malformed_record: a `token_key` that is not the writer's shape.

    Expects a record `unreplayable_reason` passed whose `token_claims` is an object.
    """
    keys = rules.keys
    if keys is None:
        return None
    if not isinstance(keys, StaticKeySet):
        return "token_keys_unknown"
    subject = record["subject"]
    if "token_key" not in subject:
        return "token_key_not_recorded" if record["schema_version"] < 5 else "malformed_record"
    key = subject["token_key"]
    if type(key) is not dict or key.keys() != _TOKEN_KEY_MEMBERS:
        return "malformed_record"
    alg, kid, key_set = key["alg"], key["kid"], key["key_set"]
    if not (
        (alg is None or type(alg) is str)
        and (kid is None or type(kid) is str)
        and (key_set is None or (type(key_set) is str and _SHA256.fullmatch(key_set)))
    ):
        return "malformed_record"
    if alg is None or alg not in rules.algorithms:
        return "token_algorithm_not_accepted"
    if key_set != keys.fingerprint.hex() or not keys.keys_for(kid, alg):
        return "token_key_changed"
    return None


def printable(text: str) -> str:
    """`text` with each character that is not printable (str.isprintable: control
    characters such as ESC, line and paragraph separators) written as its Python escape
    (`\\x1b`, `\\u2028`, `\\udcff`): names and IDs from records, flags and file names reach
    a terminal, where a raw escape sequence would be obeyed (retitle, recolour, rewrite the
    lines above), and a lone surrogate (a `\\ud800` escape in a record, a file name that is not
    UTF-8) cannot be encoded for standard output at all."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def jwks_flags(values: Sequence[str]) -> dict[str, Path]:
    """`--jwks ORG=FILE` values as {organization: file}. Raises UsageError for a value
    without `=`, an empty name or file, or an organization named twice."""
    files: dict[str, Path] = {}
    for value in values:
        name, equals, file = value.partition("=")
        if not equals or not name or not file:
            raise UsageError(f"--jwks {value!r}: expected ORG=FILE")
        if name in files:
            raise UsageError(f"--jwks {printable(name)}: given twice")
        files[name] = Path(file)
    return files


async def _no_fetch(url: str, timeout: float) -> bytes:
    raise JwksFetchError(f"pdp replay fetches nothing ({url})")


def load_candidate(directory: Path) -> CompiledPolicySet:
    """The candidate policy set in `directory`, loaded without touching the network: an
    organization's `jwks_url` or issuer discovery gets an empty key set whose first fetch is
    never started (its token records count as `token_keys_unknown`, or are replayed against
    `--jwks` files: `with_jwks_files`). A one-off load would fetch, and wait up to 5 s per
    set for an identity provider that answers nothing replay uses.

    Raises PolicyLoadError as `load_policy_set` does."""
    offline = RemoteKeySets(fetch=_no_fetch)
    offline.stop(0.0)  # stopped before it started: no event loop, so no fetch ever starts
    return load_policy_set(directory, remote_keys=offline)


class _JwksFileError(Exception):
    """A `--jwks` file that is not a regular file of at most `MAX_JWKS_BYTES`."""


def _read_jwks_file(path: Path) -> bytes:
    """The bytes of the regular file `path`, at most `MAX_JWKS_BYTES` (1 MiB: what the server
    reads of a JWKS it fetches, so no larger one can have verified a record).

    Opened without blocking and checked before reading: a FIFO would wait for a writer
    forever, and a device such as /dev/zero never ends. Raises OSError (missing, a symlink
    loop, unreadable) and _JwksFileError (not a regular file, too large).
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise _JwksFileError("not a regular file")
        data = handle.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise _JwksFileError(
            f"larger than {MAX_JWKS_BYTES} bytes (1 MiB, the most the server reads of a JWKS)"
        )
    return data


def with_jwks_files(policies: CompiledPolicySet, files: Mapping[str, Path]) -> CompiledPolicySet:
    """`policies` with each named organization's fetched token keys (a `jwks_url`, or keys
    discovered from its issuer: replay fetches nothing) replaced by the JWKS (RFC 7517
    section 5) in its file, which the operator says is what that source served when the
    records were made. A record's token is then replayed exactly when that key set is the one
    that verified it (`token_key_reason`: the same fingerprint, a key for its `kid` and
    `alg`), instead of being counted as `token_keys_unknown`.

    Raises UsageError for an organization the candidate does not have, one that does not
    fetch its keys (it verifies with its own `jwks_file`, or verifies no signature), and a
    file that cannot be read or is not a JWKS with a usable signature key.
    """
    organizations = dict(policies.organizations)
    for name, path in files.items():
        organization = organizations.get(name)
        if organization is None:
            known = ", ".join(sorted(organizations)) or "none"
            raise UsageError(
                f"--jwks {printable(name)}: no such organization in --policies (has: {known})"
            )
        keys = organization.tokens.keys
        if keys is None or isinstance(keys, StaticKeySet):
            how = "verifies no token signature" if keys is None else "has its own jwks_file"
            raise UsageError(
                f"--jwks {name}: the candidate's organization {name!r} {how}; --jwks is for "
                "one whose keys come from a jwks_url or from discovery"
            )
        flag = printable(f"--jwks {name}={path}")
        try:
            static = StaticKeySet(parse_jwks(_read_jwks_file(path), source=printable(str(path))))
        except OSError as exc:
            raise UsageError(f"{flag}: {exc.strerror or exc}") from None
        except _JwksFileError as exc:
            raise UsageError(f"{flag}: {exc}") from None
        except KeySetError as exc:
            raise UsageError(f"{flag}: {printable(str(exc))}") from None
        tokens = dataclasses.replace(organization.tokens, keys=static)
        organizations[name] = dataclasses.replace(organization, tokens=tokens)
    return dataclasses.replace(policies, organizations=MappingProxyType(organizations))


# --- the direct path -------------------------------------------------------------------------
#
# `pdp eval`'s path builds a protobuf CheckRequest, serializes and parses it and converts it as
# the server does: most of a replay's time on records it cannot reuse. The direct path builds
# the same domain request from the record's values at once, and declines (None: the caller
# takes the protobuf path) whenever the round trip could make anything else of them: a value
# the wire cannot carry (refused there), a non-string where the wire has a string (converted
# there), a map or list the converter would cut short, a key no version 2 record has.
# Attribute maps keep the record's key order; the server's protobuf maps iterate in an order
# that changes from process to process, so no decision may depend on it.

_LIMITS = DEFAULTS.limits  # what `dry_run` decides with
# The converter keeps maps and lists to these bounds (RequestConverter.__init__); beyond them
# its values differ from the record's, so the direct path declines.
_MAX_DEPTH = max(_LIMITS.max_attribute_depth, 0) + 2
_MAX_ENTRIES = max(_LIMITS.max_attributes, 0) + 1
_INT64_LOW, _INT64_HIGH = -(2.0**63), 2.0**63  # integral doubles the converter makes ints
_KINDS = {kind.value: kind for kind in SubjectKind}
_CONNECTIONS = {state.value: state for state in ConnectionState}
# The keys of a version 1 or 2 decision record (schema audit-record.v2.json): a key beyond
# these may be an input the direct path does not know, so it declines.
_RECORD_KEYS = frozenset(
    {"schema_version", "type", "stream", "seq", "prev_hash", "hash", "time", "decision_id",
     "organization", "subject", "application", "integration", "scope", "context", "decision",
     "reasons", "matched_rules", "policy_revision", "cache_level", "latency_ms", "request_id",
     "instance", "truncated", "trace_id", "span_id"}
)  # fmt: skip
# Version 4 adds trace_id and span_id: per-record fields, as decision_id (never an input).
# Version 3 adds the external user's namespace (an input) and the person it mapped to (an
# outcome the candidate's own mapping decides again). Version 5 adds subject.token_key (how
# the token was verified: `token_key_reason` reads it, the decision does not).
_SUBJECT_KEYS = frozenset(
    {"id", "kind", "namespace", "mapped_id", "token_sha256", "token_claims", "token_key",
     "attributes"}
)  # fmt: skip
_RESOURCE_KEYS = frozenset({"id", "attributes"})
_CONTEXT_KEYS = frozenset({"connection", "client_ip", "session_id", "time", "attributes"})


class _Declined(Exception):
    """A value the direct path leaves to the protobuf round trip."""


def _wire_value(value: Any, depth: int) -> Any:
    """`value` as the server reads it after the round trip: numbers travel as doubles, so an
    integral one comes back an int and any other a float; containers at `depth` (the top map
    is 1). Raises _Declined for anything the round trip refuses or changes otherwise."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return value
        raise _Declined
    if kind is float:
        if not math.isfinite(value):
            raise _Declined
        return int(value) if value.is_integer() and _INT64_LOW <= value < _INT64_HIGH else value
    if kind is dict:
        return _wire_map(value, depth + 1)
    if kind is list:
        if depth + 1 > _MAX_DEPTH or len(value) > _MAX_ENTRIES:
            raise _Declined
        # Strings, the most common values, are taken inline: a call for each costs more.
        return [item if type(item) is str else _wire_value(item, depth + 1) for item in value]
    raise _Declined


def _wire_map(value: Any, depth: int) -> dict[str, Any]:
    if type(value) is not dict or depth > _MAX_DEPTH or len(value) > _MAX_ENTRIES:
        raise _Declined
    return {
        key: item if type(item) is str else _wire_value(item, depth) for key, item in value.items()
    }


def _text(value: Any) -> str:
    if type(value) is not str:
        raise _Declined
    return value


class _Built:
    """Domain values built from record parts, by the part object itself (its identity):
    `_record_of` gives the records of a log the same object for the same part text, so a
    subject or resource seen before is not converted again. An entry holds its part, so no
    other object can take the part's id while it is kept. Bounded like the other memos."""

    def __init__(self) -> None:
        self._values: dict[int, tuple[Any, Any]] = {}

    def get(self, part: Any, build: Callable[[Any], Any]) -> Any:
        """`build(part)`, or what it gave for this very object before (raises what it
        raises, and keeps nothing then)."""
        entry = self._values.get(id(part))
        if entry is not None and entry[0] is part:
            return entry[1]
        value = build(part)
        if len(self._values) >= PART_MEMO_SIZE:
            self._values.clear()
        self._values[id(part)] = (part, value)
        return value


def _resource(part: Any) -> Resource:
    if not part.keys() <= _RESOURCE_KEYS:
        raise _Declined
    return Resource(_text(part["id"]), _wire_map(part["attributes"], 1))


def direct_request(
    record: Mapping[str, Any], token: str, built: _Built | None = None
) -> CheckRequest | None:
    """The domain request `pdp eval`'s protobuf round trip gives the record's inputs (with
    `token` as the subject's access token), built directly; None when the round trip might
    give another or refuse it. The record's strings must hold no lone surrogate (the caller
    knows its text had no `\\u` escape and was valid UTF-8). `built`: where to keep (and
    find) the subject and resources built, for a caller whose token is the same whenever
    the subject part is."""

    def make_subject(subject: Any) -> Subject:
        if not subject.keys() <= _SUBJECT_KEYS:
            raise _Declined
        return Subject(
            id=_text(subject["id"]),
            kind=_KINDS[_text(subject["kind"])],
            attributes=_wire_map(subject["attributes"], 1),
            access_token=token,
            namespace=_text(subject.get("namespace", "")),
        )

    once = built.get if built is not None else (lambda part, build: build(part))
    try:
        subject, context = record["subject"], record["context"]
        application, integration = record["application"], record["integration"]
        if not (record.keys() <= _RECORD_KEYS and context.keys() <= _CONTEXT_KEYS):
            return None
        when = context["time"]
        if when is not None:
            # The wire's Timestamp is an instant in UTC: years 1 to 9999 there.
            when = _time(_text(when)).astimezone(UTC)
        return CheckRequest(
            organization=_text(record["organization"]),
            subject=once(subject, make_subject),
            application=once(application, _resource),
            integration=once(integration, _resource),
            scope=_text(record["scope"]),
            context=RequestContext(
                connection=_CONNECTIONS[_text(context["connection"])],
                client_ip=_text(context["client_ip"]),
                time=when,
                session_id=_text(context["session_id"]),
                attributes=_wire_map(context["attributes"], 1),
            ),
        )
    except (_Declined, KeyError, TypeError, AttributeError, ValueError, OverflowError):
        return None


class TokenReplay:
    """Recorded token claims replayed as a token: signed with a key made for this replay,
    which the candidate's organizations that verify tokens trust instead of their own (the
    claims were verified when the decision was made). Issuer, audience, times and subject
    binding are checked by the candidate's own rules at the recorded time. Only records whose
    token the candidate would verify as it was verified may be decided so: `unreplayable`
    says which may not (`token_key_reason`), and callers ask it first."""

    def __init__(self, policies: CompiledPolicySet) -> None:
        self._candidate = policies.organizations  # with their own token settings
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
        # repr(claims) -> token: a session's records repeat its claims, and signing costs more
        # than deciding. Ed25519 signatures are deterministic, so a reused token is the same.
        self._tokens: dict[str, str] = {}
        # The token is a function of the subject part (its claims): subjects built with it
        # may be kept by that part.
        self._built = _Built()

    def unreplayable(self, record: Mapping[str, Any]) -> str | None:
        """`token_key_reason` for a record `unreplayable_reason` passed, under its candidate
        organization's token settings; None without accepted claims or such organization."""
        try:
            if record["subject"].get("token_claims") is None:
                return None
            organization = self._candidate.get(record["organization"])
            if organization is None:
                return None
            return token_key_reason(record, organization.tokens)
        except (KeyError, TypeError, AttributeError):
            return "malformed_record"

    def token(self, claims: Mapping[str, Any]) -> str:
        """A token carrying exactly `claims`, signed with this replay's key."""
        key = repr(claims)
        token = self._tokens.get(key)
        if token is None:
            token = jwt.encode(
                dict(claims), self._key, algorithm="EdDSA", headers={"kid": REPLAY_KID}
            )
            if len(self._tokens) >= MEMO_SIZE:
                self._tokens.clear()
            self._tokens[key] = token
        return token

    def decide(self, record: Mapping[str, Any], *, exact_text: bool = False) -> Decision:
        """`replay_record` for a record `unreplayable_reason` has passed.

        `exact_text` True: the record's strings came from valid UTF-8 without a `\\u` escape
        (they hold no lone surrogate), so the record may take the direct path
        (`direct_request`); otherwise, or when that path declines, the request makes the
        protobuf round trip `pdp eval` makes. Both give the same decision (tests check it).
        """
        claims = record["subject"].get("token_claims")
        try:
            token = self.token(claims) if claims is not None else ""
        except (TypeError, ValueError):  # PyJWT refuses some claim types (e.g. a numeric iss)
            raise Unreplayable("unrepresentable_value") from None
        request = direct_request(record, token, self._built) if exact_text else None
        if request is None:
            return _decide(record, self.policies, token)
        try:
            return decide(self.policies, request, now=_time(record["time"]), limits=_LIMITS)
        except (KeyError, TypeError, AttributeError, ValueError):  # as `_decide` counts them
            raise Unreplayable("malformed_record") from None


def _decide(record: Mapping[str, Any], policies: CompiledPolicySet, token: str) -> Decision:
    """The faithful path: the request `pdp eval` builds, decoded as the server decodes it."""
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
            subject_namespace=subject.get("namespace", ""),
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
    return sorted([str(r.get(key)) for r in reasons])


Summary = tuple[str, list[str], list[str], str, str]
"""What `compare` reads of a decision: effect, sorted reason codes, sorted reason layers,
deciding rule (`policy/rule`), and the person an external user ID was decided as ("")."""


def summarize(decision: Decision) -> Summary:
    """The decision as `compare` sees it (computed once per decision replay reuses): what
    `_shape` and `_rule_of` read of its reasons and matched rules as the audit record writes
    them (`reason_to_dict`), read from the objects (building those dicts costs more)."""
    reasons = decision.reasons
    effect = decision.effect.value
    if decision.effect is Effect.DENY:
        rule = next((f"{r.policy}/{r.rule}" for r in reasons if r.rule), None)
        if rule is None:
            rule = f"(no rule: {reasons[0].code.value})" if reasons else "(no rule)"
    else:
        allows = (m for m in decision.matched_rules if m.effect is Effect.ALLOW)
        rule = next((f"{m.policy}/{m.rule}" for m in allows), "(no rule)")
    return (
        effect,
        sorted([r.code.value for r in reasons]),
        sorted([r.layer.value for r in reasons]),
        rule,
        decision.mapped_subject_id,
    )


def compare(record: Mapping[str, Any], decision: Decision) -> tuple[str, str]:
    """(change kind, deciding rule as `old -> new`, or the rule when it is the same)."""
    return compare_summary(record, summarize(decision))


def compare_summary(record: Mapping[str, Any], summary: Summary) -> tuple[str, str]:
    """`compare` with the new decision's `summarize` already made."""
    new, codes, layers, new_rule, person = summary
    old = record["decision"]
    old_reasons = record["reasons"]
    old_rule = _rule_of(old, old_reasons, record.get("matched_rules") or ())
    rule = old_rule if old_rule == new_rule else f"{old_rule} -> {new_rule}"
    if old != new:
        return (ALLOW_TO_DENY if old == Effect.ALLOW.value else DENY_TO_ALLOW), rule
    if _shape(old_reasons, "code") != codes:
        return CODE_CHANGED, rule
    if _shape(old_reasons, "layer") != layers:
        return LAYER_CHANGED, rule
    if old_rule != new_rule:
        return RULE_CHANGED, rule
    subject = record["subject"]
    if "mapped_id" in subject:  # version 3 and later
        mapped = subject["mapped_id"]
        if mapped is not None and type(mapped) is not str:
            raise TypeError("subject.mapped_id is not a string")  # counted as malformed
        if (mapped or "") != person:
            return PERSON_CHANGED, rule
    return UNCHANGED, rule


Where = str | tuple[Path, int]
"""Where a record was read: "file:line", a Redis entry's name, or (file, line number) (named
only when needed: formatting every line's name costs more than deciding a reused tuple)."""


def _name(where: Where) -> str:
    return where if isinstance(where, str) else f"{where[0]}:{where[1]}"


def _utf8(raw: bytes | str) -> str | None:
    """`raw` as text when it is valid UTF-8 (no lone surrogate), else None."""
    try:
        if isinstance(raw, bytes):
            return raw.decode()
        raw.encode()
    except UnicodeError:
        return None
    return raw


Outcome = tuple[str, ...]
"""What one decision record counts as: (_CANNOT, reason), (UNCHANGED,), or (change kind,
organization, application, integration, rule)."""
_CANNOT = "cannot"

# --- reusing whole lines ----------------------------------------------------------------------
#
# Most of a replay's time on a record whose inputs it has decided before goes to parsing its
# JSON. A line as the audit writer writes it (canonical JSON: sorted keys, no spaces; its hash
# last) is matched instead against the shape below, which takes its per-record fields
# (decision ID, hashes, times, latency, request ID, instance, sequence) as plain scalars and
# keeps the text of everything else (inputs, recorded decision, reasons, matched rules, schema
# version) as the key of what an earlier line with the same text counted as. A line seen for
# the first time is read from those parts, each parsed alone, when each is one whole JSON
# value: the line is then that object (JSON's grammar reads a whole value followed by
# `,"key":` one way only), and so is any later line matching with the same parts. Each part is
# matched up to the first following key text and never retried (atomic groups): linear time,
# and a line whose values contain such text fails to match (or to be stored) and is parsed.
_STRING = r'"[^"\\\x00-\x1f]*"'  # a JSON string without escapes
# Numbers json.loads reads (it refuses integers of more than 4,300 digits): a line with a
# longer one is left to it, and counted as unreadable as before.
_NUMBER = r"-?(?:0|[1-9][0-9]{0,99})(?:\.[0-9]{1,100})?(?:[eE][+-]?[0-9]{1,3})?"
_INTEGER = r"(?:0|[1-9][0-9]{0,99})"


def _upto(name: str, key: str) -> str:
    """A part named `name` up to the first `,"key":` (taken whole, never retried: commas
    not before that text are consumed one run at a time, which is linear and fast)."""
    after = re.escape(f',"{key}":')
    return rf"(?>(?P<{name}>[^,]*(?:,(?!{after[1:]})[^,]*)*){after})"


_LINE = re.compile(
    r'\{"application":' + _upto("application", "cache_level") + _STRING
    + r',"context":' + _upto("context", "decision") + r"(?P<decision>" + _STRING + ")"
    + r',"decision_id":"(?P<decision_id>[^"\\\x00-\x1f]*)"'
    + r',"instance":' + _STRING
    + r',"integration":' + _upto("integration", "latency_ms") + _NUMBER
    + r',"matched_rules":' + _upto("matched_rules", "organization")
    + r"(?P<organization>" + _STRING + ")"
    + r',"policy_revision":' + _STRING + r',"prev_hash":' + _STRING
    + r',"reasons":' + _upto("reasons", "request_id") + _STRING
    + r',"schema_version":(?P<schema_version>' + _INTEGER + ")"
    + r',"scope":(?P<scope>' + _STRING + ")"
    + r',"seq":' + _INTEGER + r'(?:,"span_id":' + _STRING + r')?,"stream":' + _STRING
    + r',"subject":' + _upto("subject", "time") + r'"(?P<time>[^"\\\x00-\x1f]*)"'
    + r'(?:,"trace_id":' + _STRING + r")?"
    + r',"type":"decision","hash":' + _STRING + r"\}[ \t\n\r]*",
)  # fmt: skip
_LINE_VALUES = ("application", "context", "integration", "matched_rules", "reasons", "subject")
_LINE_KEY = (*_LINE_VALUES, "decision", "organization", "schema_version", "scope")
# The parts that are a decision's inputs (every one that `direct_request` reads).
_INPUTS = ("organization", "subject", "application", "integration", "scope", "context")
_ORGANIZATION, _CONTEXT = _LINE_KEY.index("organization"), _LINE_KEY.index("context")
_inputs_of = operator.itemgetter(*(_LINE_KEY.index(name) for name in _INPUTS))
LINE_MEMO_SIZE = 65_536  # lines' keys kept (each about as long as its line)
ALIAS_MEMO_SIZE = 65_536  # lines' own keys kept beside their session-free key (see `_alias`)
PART_MEMO_SIZE = 16_384  # lines' parts kept, read (see `_record_of`)


# The scanner `json.loads` runs (C, where CPython has it), called directly: `json.loads`'s
# wrappers cost as much as scanning a small part, and a line has six.
_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]


def _whole_value(text: str) -> Any:
    """`text` read as one JSON value with nothing around it (not even spaces, which the
    writer never puts there). Raises StopIteration when no value starts it, ValueError when
    one is malformed or text follows it, RecursionError when it nests too deep."""
    value, end = _SCAN(text, 0)
    if end != len(text):
        raise ValueError("text after the value")
    return value


def _record_of(
    match: re.Match[str], parts: dict[str, Any], texts: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """The decision record of a line `_LINE` matched, from its parts (what replay reads of
    it), or None when a part is not one whole JSON value (the parts are then not the line's
    values: the caller reads the line whole). `texts`: `match.group(*_LINE_KEY)`, when the
    caller took them already (each group taken again is a new copy, hashed again).

    `parts` maps a part's text to its value, read and kept here: a log repeats its subjects,
    resources, reasons and matched rules far more than whole lines, so most of a new line's
    parts were read before. Records so share their values: replay never changes a record.
    """
    if texts is None:
        texts = match.group(*_LINE_KEY)
    record = {}
    try:
        for name, text in zip(_LINE_VALUES, texts, strict=False):
            if name == "context":  # a session's, or a request's own: seldom seen again
                record[name] = _whole_value(text)
                continue
            value = parts.get(text, parts)  # (parts itself is never a value: "missing")
            if value is parts:
                value = _whole_value(text)
                if len(parts) >= PART_MEMO_SIZE:
                    parts.clear()
                parts[text] = value
            record[name] = value
    except (ValueError, RecursionError, StopIteration):
        return None
    decision, organization, version, scope = texts[len(_LINE_VALUES) :]
    record["type"] = "decision"
    record["schema_version"] = int(version)
    record["decision_id"] = match["decision_id"]
    record["time"] = match["time"]
    # Strings without escapes: their text between the quotes.
    record["decision"], record["organization"], record["scope"] = (
        decision[1:-1],
        organization[1:-1],
        scope[1:-1],
    )
    return record


LineKey = tuple[str | tuple[str, str], ...]
"""A line's parts' texts (`_LINE_KEY` or `_INPUTS`), the context's maybe as `_without_session`
gives it (a tuple: never equal to a part's text)."""
# The end of a context part as the writer writes it (sorted keys): its session ID and time.
_SESSION_MEMBER = ',"session_id":"'
_NULL_TIME_END = '","time":null}'
_TIME_END = re.compile(r'","time":(?P<time>"[^"\\\x00-\x1f]*")\}')


def _without_session(context: str) -> tuple[str, str] | None:
    """A context part's text without its session ID, as (the text before the member, the
    time's text), when it ends with `,"session_id":"S","time":T}` (S and T strings without
    quotes, backslashes or control characters, or T null) and S passes validation; else None.

    Why that leaves out exactly the session ID, for a part that is one JSON object (only
    such parts are replayed, and stored): no quote of that end is escaped (none follows a
    backslash), so its strings are what they look like; the last `}` closes the object, so
    `"time"` is a key of the object itself, and `"session_id"`, a key before it at the same
    level, is its last session ID member (the one `json.loads` keeps). Two parts with the
    same (text before, time) are one object but for that session ID, both valid: the
    engine reads it only to validate it (then passes), and the organization's conditions do
    not read it (`organizations_reading_session_id`), so they are decided alike. The value
    whose validity that rests on is the string itself: the direct path takes it as it is,
    and `pdp eval`'s path passes a string through unchanged.
    """
    start = context.rfind(_SESSION_MEMBER)
    if start < 0:
        return None
    begin = start + len(_SESSION_MEMBER)
    end = context.find('"', begin)  # S's closing quote, if S holds no escape
    if end < 0:
        return None
    if len(context) == end + len(_NULL_TIME_END) and context.endswith(_NULL_TIME_END):
        time = "null"
    else:
        tail = _TIME_END.fullmatch(context, end)
        if tail is None:
            return None
        time = tail["time"]
    session = context[begin:end]
    if "\\" in session:
        return None
    # Printable ASCII but the space, within the length, is valid (and holds no control
    # character): the common case, without the validation call; the rest are asked.
    if not (
        session.isascii()
        and session.isprintable()
        and " " not in session
        and len(session) <= _LIMITS.max_id_length
    ) and not session_id_valid(session, _LIMITS):
        return None
    return context[:start], time


def _seconds(text: Any) -> float | None:
    """A record's `time` in POSIX seconds, or None when it does not read as a time (then
    deciding the record fails)."""
    try:
        return _time(text).timestamp()
    except (ValueError, TypeError, AttributeError, OverflowError):
        return None


Window = tuple[float, float]
"""The record times (POSIX seconds, from the first, up to the second) at which a decision
made for given inputs holds, so that records with the same inputs reuse it."""
_ALWAYS: Window = (-math.inf, math.inf)


def _window(decision: Decision, made_at: float | None, token: bool) -> Window | None:
    """When `decision`, made at record time `made_at` (with a subject token: `token`),
    holds: always when it read no clock and had no token; with a token, from `made_at` up to
    `valid_until`, the instant its token's verdict may flip (as the server's cache keeps
    it), or on when it never will (an expired token stays expired): never before `made_at`,
    when the token may not have been issued yet, or not expired. None (never reused) when
    it read the clock."""
    if decision.time_dependent:
        return None
    until = decision.valid_until
    if not token and until is None:
        return _ALWAYS
    end = math.inf if until is None else until.timestamp()
    return (made_at, end) if made_at is not None and made_at < end else None


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
    _memo: dict[LineKey | str, tuple[Summary, Window]] = field(default_factory=dict, repr=False)
    # A line's content but its per-record fields (see _LINE) -> what it counts as, and when.
    _lines: dict[LineKey, tuple[Outcome, Window]] = field(default_factory=dict, repr=False)
    _parts: dict[str, Any] = field(default_factory=dict, repr=False)  # see `_record_of`
    # A line's own key -> its entry of `_lines`, kept there without its session ID.
    _aliases: dict[LineKey, tuple[Outcome, Window]] = field(default_factory=dict, repr=False)
    _tokens: TokenReplay = field(init=False, repr=False)
    # The candidate's organizations a condition of which may read context.session_id: the
    # others' records are keyed without a valid session ID (see `_without_session`).
    _session_readers: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tokens = TokenReplay(self.policies)
        self._session_readers = organizations_reading_session_id(self.policies)

    @property
    def decisions(self) -> int:
        """Decision records seen, replayed or not."""
        return sum(self.counts.values()) + sum(g.count for g in self.unreplayable.values())

    @property
    def new_allows(self) -> int:
        return self.counts[DENY_TO_ALLOW]

    def cannot(self, reason: str, example: str) -> None:
        self.unreplayable.setdefault(reason, _Group()).add(example)

    def add(
        self, record: Any, where: Where, *, may_redact: bool = True, exact_text: bool = False
    ) -> None:
        """Replay one parsed record; `where` names it when it has no ID. `may_redact` False:
        its text holds no `[redacted]`. `exact_text` True: its text was valid UTF-8 without a
        `\\u` escape (see `TokenReplay.decide`)."""
        if not isinstance(record, dict):
            self.cannot("malformed_record", _name(where))
            return
        if record.get("type") != "decision":
            self.other_records += 1
            return
        outcome, _ = self._outcome(record, may_redact, exact_text)
        self._count(outcome, str(record.get("decision_id") or _name(where)))

    def _outcome(
        self,
        record: Mapping[str, Any],
        may_redact: bool,
        exact_text: bool,
        inputs: LineKey | None = None,
    ) -> tuple[Outcome, Window | None]:
        """(what the decision record counts as, the record times at which every record with
        the same content but its own time and per-record fields (IDs, hashes, latency)
        counts the same, or None).
        `inputs`: the JSON text of the record's inputs, when its line was read in parts (see
        `_summary`)."""
        reason = unreplayable_reason(record, may_redact=may_redact) or self._tokens.unreplayable(
            record
        )
        if reason:
            return (_CANNOT, reason), _ALWAYS
        try:
            summary, window = self._summary(record, exact_text, inputs)
            kind, rule = compare_summary(record, summary)
            if kind == UNCHANGED:
                return (kind,), window
            values = (record["organization"], record["application"]["id"])
            return (kind, *map(str, values), str(record["integration"]["id"]), rule), window
        except Unreplayable as exc:
            return (_CANNOT, exc.reason), None
        except (KeyError, TypeError, AttributeError):
            return (_CANNOT, "malformed_record"), None

    def _count(self, outcome: Outcome, example: str) -> None:
        kind = outcome[0]
        if kind == _CANNOT:
            self.cannot(outcome[1], example)
            return
        self.counts[kind] += 1
        if kind == UNCHANGED:
            return
        by_dimension = self.groups.setdefault(kind, {})
        for dimension, value in zip(GROUP_BY, outcome[1:], strict=True):
            by_dimension.setdefault(dimension, {}).setdefault(value, _Group()).add(example)

    def _summary(
        self, record: Mapping[str, Any], exact_text: bool, inputs: LineKey | None
    ) -> tuple[Summary, Window | None]:
        """The candidate's decision, summarized (`summarize`), and when it holds (`_window`);
        reused for records with the same inputs at those times (as the server's cache
        reuses it): logs repeat tuples, mostly. `inputs` (the inputs' JSON text,
        a tuple: never equal to a repr key, a str) is the key when given: the same text is
        the same values, and taking it costs nothing."""
        # repr, not JSON: records are canonical (sorted keys), and repr is several times cheaper.
        key: LineKey | str = inputs or repr(
            (
                record["organization"],
                record["subject"],
                record["application"],
                record["integration"],
                record["scope"],
                record["context"],
            )
        )
        entry = self._memo.get(key)
        if entry is not None:
            start, end = entry[1]
            if entry[1] is _ALWAYS:  # (the record's time is not even read, as it is not used)
                return entry
            at = _seconds(record["time"])
            if at is not None and start <= at < end:
                return entry
        decision = self._tokens.decide(record, exact_text=exact_text)
        summary = summarize(decision)
        token = record["subject"].get("token_claims") is not None  # as `decide` reads it
        window = _window(decision, _seconds(record["time"]), token)
        if window is not None:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()  # bounded memory; a log's hot tuples come back fast
            self._memo[key] = (summary, window)
        return summary, window

    def add_line(self, raw: bytes | str, where: Where) -> None:
        """Replay one line of a log (or one Redis entry's record); `where` names it."""
        if not raw.strip():
            return
        # Parsed from text that decoded strictly as UTF-8 and holds no \u escape, a record's
        # strings hold no lone surrogate, so it may take the direct path; any other line is
        # parsed and replayed as it always was (json.loads of bytes also reads a BOM, UTF-16).
        text = _utf8(raw)
        record: Any = None
        if text is not None:
            match = _LINE.fullmatch(text)
            if match is not None:
                self._add_match(match, text, where)
                return
            try:
                record = json.loads(text)
            except (ValueError, RecursionError):
                text = None
        if text is None:
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                self.cannot("unreadable_line", _name(where))
                return
            self.add(record, where, may_redact=True)
            return
        exact_text = "\\u" not in text
        # Without the marker's text or a \u escape (that could spell it), no value is redacted.
        may_redact = not exact_text or REDACTED in text
        self.add(record, where, may_redact=may_redact, exact_text=exact_text)

    def _add_match(self, match: re.Match[str], text: str, where: Where) -> None:
        """A line `_LINE` matched: counted as the last line with the same key when that one
        was stored, else read from its parts (when each is one whole JSON value) or whole.
        For an organization none of whose candidate conditions may read
        `context.session_id`, a line is also looked up, and kept, under a key that leaves out
        a session ID that passes validation (`_without_session`): its rules are the only
        ones that decide its records. The line's own key is looked up first (a session's
        lines repeat it, and it costs nothing to take), in `_lines` and `_aliases`."""
        texts = match.group(*_LINE_KEY)
        example = match["decision_id"] or _name(where)
        at = _seconds(match["time"])
        lines = self._lines
        entry = lines.get(texts) or self._aliases.get(texts)
        if entry is not None and at is not None and entry[1][0] <= at < entry[1][1]:
            self._count(entry[0], example)
            return
        inputs: LineKey = _inputs_of(texts)
        blind: LineKey | None = None
        # (The organization's text is a JSON string without escapes: its name in quotes.)
        if texts[_ORGANIZATION][1:-1] not in self._session_readers:
            context = _without_session(texts[_CONTEXT])
            if context is not None:
                blind = (*texts[:_CONTEXT], context, *texts[_CONTEXT + 1 :])
                inputs = (*inputs[:-1], context)  # (the context is the last input)
                entry = lines.get(blind)
                if entry is not None and at is not None and entry[1][0] <= at < entry[1][1]:
                    self._count(entry[0], example)
                    self._alias(texts, entry)
                    return
        record = _record_of(match, self._parts, texts)
        exact_text = "\\u" not in text
        may_redact = not exact_text or REDACTED in text
        if record is None:  # some part is not one whole value: read the line as a whole
            try:
                whole = json.loads(text)
            except (ValueError, RecursionError):
                self.cannot("unreadable_line", _name(where))
                return
            self.add(whole, where, may_redact=may_redact, exact_text=exact_text)
            return
        outcome, window = self._outcome(record, may_redact, exact_text, inputs)
        self._count(outcome, example)
        if window is not None and at is not None:
            entry = (outcome, window)
            if len(lines) >= LINE_MEMO_SIZE:
                lines.clear()  # bounded memory; a log's hot lines come back fast
            if blind is None:
                lines[texts] = entry
            else:
                lines[blind] = entry
                self._alias(texts, entry)

    def _alias(self, texts: LineKey, entry: tuple[Outcome, Window]) -> None:
        """Keep `entry`, of `_lines` under a key without the line's session ID, under the
        line's own key too: its session's next lines find it at once. Apart from `_lines`,
        so that one line takes one entry there, and ever new sessions crowd out nothing."""
        if len(self._aliases) >= ALIAS_MEMO_SIZE:
            self._aliases.clear()
        self._aliases[texts] = entry

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
        width = max(map(len, CHANGE_KINDS))
        lines += [f"  {kind:<{width}} {self.counts[kind]}" for kind in CHANGE_KINDS]
        lines.append(f"  {'cannot replay':<{width}} {cannot}")
        for kind in CHANGE_KINDS:
            if kind not in self.groups:
                continue
            lines.append(f"{kind} ({self.counts[kind]}):")
            for dimension in GROUP_BY:
                lines.append(f"  by {dimension}:")
                groups = self.groups[kind][dimension]
                for value, group in sorted(groups.items(), key=lambda item: -item[1].count):
                    examples = printable(", ".join(group.examples))
                    lines.append(f"    {printable(value)}: {group.count}  e.g. {examples}")
        if self.unreplayable:
            lines.append(f"cannot replay ({cannot}):")
            for reason, group in sorted(self.unreplayable.items()):
                examples = printable(", ".join(group.examples))
                lines.append(f"  {reason}: {group.count}  e.g. {examples}")
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
    for path in order_audit_files(paths):
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                replay.add_line(raw, (path, number))
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

    from policy_engine.audit.sinks.redis import RECORD_FIELD, stream_entries

    replay = Replay(policies)
    field_name = RECORD_FIELD.encode()
    client = redis.Redis.from_url(url)
    try:
        low = start
        while True:
            entries = stream_entries(client.xrange(stream, min=low, max=end, count=page))
            for entry_id, fields in entries:
                where = f"{stream}@{entry_id}"
                raw = fields.get(field_name)
                if raw is None:
                    replay.cannot("foreign_entry", where)
                else:
                    replay.add_line(raw, where)
                if progress is not None:
                    progress(1)
            if len(entries) < page:
                return replay
            low = "(" + entries[-1][0]
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
