"""`pdp`: serve decisions, validate a policy directory, dry-run one tuple, check settings.

Exit codes (`pdp test` has its own: see policy_engine.testing.cli): 0 when the command did
its job (for `eval`, whether it allowed or denied);
1 when policies are invalid, a server could not start or stop cleanly, or (`status`) a
component of the asked server is not ready; 2 for bad flags, settings or input, or a server
that cannot be asked; 3 when `replay --fail-on-new-allows` finds a DENY that would become
ALLOW; 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from google.protobuf.message import DecodeError

from policy_engine.api import pdp_pb2
from policy_engine.audit.cli import add_audit_commands
from policy_engine.auth.keys import KeySetError, KeySource, StaticKeySet
from policy_engine.cli.early import EXIT_INTERRUPTED, sighup_received
from policy_engine.cli.status import add_status_command
from policy_engine.client import RequestValueError, check_request
from policy_engine.config import (
    ConfigError,
    RequestLimits,
    Settings,
    load_settings,
    load_settings_apart,
    settings_dict,
    shared_port_problems,
)
from policy_engine.domain.decision import Decision, Effect
from policy_engine.domain.request import ConnectionState, SubjectKind
from policy_engine.engine import decide
from policy_engine.engine.serialize import decision_to_dict
from policy_engine.errors import PolicyEngineError
from policy_engine.lifecycle import StartFailed
from policy_engine.logs import setup_logging
from policy_engine.policy import CompiledPolicySet, LoadIssue, PolicyLoadError, load_policy_set
from policy_engine.policy.bundle import (
    BUNDLE_FILE,
    BundleError,
    read_tree,
    sign_bundle,
    verify_bundle,
)
from policy_engine.policy.loader import load_policy_source
from policy_engine.quota.dry_run import DryRunQuotas
from policy_engine.server.convert import RequestConverter
from policy_engine.strict_json import unique_keys
from policy_engine.testing.cli import add_test_command
from policy_engine.testing.suite import MAX_QUOTA_USED

DEFAULTS = Settings()
EXIT_OK = 0
EXIT_INVALID_POLICIES = 1
EXIT_USAGE = 2
EXIT_NEW_ALLOWS = 3  # `pdp replay --fail-on-new-allows`: some DENY would become ALLOW
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a pipe's writer that was cut off
EXIT_START_FAILED = 1  # as a worker that failed: the server did not run


class UsageError(PolicyEngineError):
    """Bad flags or values; reported on stderr with exit code 2."""


def _parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; a VALUE that parses as JSON is taken as JSON, otherwise as a string.

    Raises UsageError for a KEY given twice, or JSON with a duplicate key, a number of more
    digits than Python converts, or nesting too deep to parse: never a guess, never a traceback.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {pair!r}")
        if key in values:
            raise UsageError(f"{flag} {key} is given twice")
        try:
            values[key] = json.loads(raw, object_pairs_hook=unique_keys)
        except json.JSONDecodeError:
            values[key] = raw
        except (ValueError, RecursionError) as exc:
            problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise UsageError(f"{flag} {key}: the JSON value cannot be read: {problem}") from None
    return values


def _parse_time(raw: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"--context time={raw!r} is not an RFC 3339 timestamp") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# Which flag sets which part of the request, to name it in errors (first matching prefix).
_FLAGS_BY_FIELD = (
    ("subject.attributes", "--subject-attr"),
    ("application.attributes", "--application-attr"),
    ("integration.attributes", "--integration-attr"),
    ("subject.access_token", "--token"),
    ("subject.kind", "--subject-kind"),
    ("subject.namespace", "--subject-namespace"),
    ("subject.id", "--subject"),
    ("application.id", "--application"),
    ("integration.id", "--integration"),
    ("organization", "--org"),
    ("scope", "--scope"),
    ("context", "--context"),
)

_CONNECTED = {
    ConnectionState.ACTIVE: True,
    ConnectionState.ABSENT: False,
    ConnectionState.UNKNOWN: None,
}


def build_message(args: argparse.Namespace) -> pdp_pb2.CheckRequest:
    """The CheckRequest a broker would send for these flags, built by the broker's client.

    Raises UsageError naming the flag and the request path of a value the wire cannot carry
    exactly (an integer beyond +-(2^53 - 1), NaN, infinities, invalid Unicode).
    """
    context = _parse_pairs(args.context, "--context")
    time_raw = context.pop("time", None)
    try:
        return request_message(
            args.org,
            args.subject,
            args.application,
            args.integration,
            args.scope,
            subject_kind=args.subject_kind,
            subject_attributes=_parse_pairs(args.subject_attr, "--subject-attr"),
            access_token=args.token or "",
            subject_namespace=args.subject_namespace or "",
            application_attributes=_parse_pairs(args.application_attr, "--application-attr"),
            integration_attributes=_parse_pairs(args.integration_attr, "--integration-attr"),
            context=context,
            time=_parse_time(str(time_raw)) if time_raw is not None else None,
            explain=args.explain,
        )
    except RequestValueError as exc:
        flag = next(f for field, f in _FLAGS_BY_FIELD if exc.path.startswith(field))
        raise UsageError(f"{flag}: {exc}") from None
    except ValueError as exc:  # the connection state
        raise UsageError(f"--context {exc}") from None


def request_message(
    org: str,
    subject: str,
    application: str,
    integration: str,
    scope: str,
    *,
    subject_kind: str,
    subject_attributes: dict[str, Any],
    access_token: str,
    application_attributes: dict[str, Any],
    integration_attributes: dict[str, Any],
    context: dict[str, Any],
    time: datetime | None,
    explain: bool,
    subject_namespace: str = "",
) -> pdp_pb2.CheckRequest:
    """The CheckRequest for one tuple, as `pdp eval` and `pdp test` build it (and `pdp
    replay` rebuilds it). `subject_namespace`: an external user ID's namespace. `context` (not
    modified) knows `connection` (active | absent | unknown, or a bool), `client_ip` and
    `session_id`; any other key becomes `context.attributes`.

    Raises RequestValueError (see check_request), or ValueError for a connection state that
    is none of those.
    """
    context = dict(context)
    connection_raw = context.pop("connection", ConnectionState.UNKNOWN.value)
    if isinstance(connection_raw, bool):
        connection_raw = "active" if connection_raw else "absent"
    try:
        connection = ConnectionState(str(connection_raw).lower())
    except ValueError:
        choices = ", ".join(c.value for c in ConnectionState)
        raise ValueError(f"connection must be one of {choices}") from None
    return check_request(
        org,
        subject,
        application,
        integration,
        scope,
        subject_kind=subject_kind,
        subject_attributes=subject_attributes,
        access_token=access_token,
        subject_namespace=subject_namespace,
        application_attributes=application_attributes,
        integration_attributes=integration_attributes,
        connected=_CONNECTED[connection],
        client_ip=str(context.pop("client_ip", "")),
        session_id=str(context.pop("session_id", "")),
        time=time,
        context_attributes=context,
        explain=explain,
    )


def dry_run(
    message: pdp_pb2.CheckRequest,
    policies: CompiledPolicySet,
    *,
    now: datetime,
    limits: RequestLimits = DEFAULTS.limits,
) -> Decision:
    """The decision the server would give `message`: its bytes decoded as the server decodes
    them (protobuf parse, then `RequestConverter`), so both see identical values.

    Raises UsageError when the bytes do not parse (the server answers INVALID_ARGUMENT).
    """
    try:
        wire = pdp_pb2.CheckRequest.FromString(message.SerializeToString())
    except DecodeError as exc:
        raise UsageError(f"the request would not parse on the server: {exc}") from None
    request, problems = RequestConverter(limits).convert(wire)
    if problems:  # as the servicer: values the domain cannot express deny the request
        return Decision(Effect.DENY, problems, policies.revision, cacheable=False)
    return decide(policies, request, now=now, limits=limits)


def format_decision(decision: Decision) -> str:
    lines = [f"decision: {decision.effect.value}   (policy revision {decision.revision})"]
    if decision.mapped_subject_id:
        lines.append(f"  decided as {decision.mapped_subject_id!r} (the external user ID's person)")
    for reason in decision.reasons:
        lines.append(
            f"  reason: {reason.code.value} [{reason.http_status}] layer={reason.layer} "
            f"policy={reason.policy} rule={reason.rule}"
        )
        lines.append(f"          {reason.message}")
    if decision.trace:
        lines.append("explain:")
        for layer in decision.trace:
            how = "by default" if layer.by_default else "by rule"
            lines.append(f"  {layer.layer.value:<12} {layer.effect.value} ({how})")
            for rule in layer.rules:
                detail = f": {rule.detail}" if rule.detail else ""
                lines.append(
                    f"    - {rule.policy}/{rule.rule} [{rule.effect.value.lower()}] "
                    f"{rule.result.value}{detail}"
                )
    return "\n".join(lines)


def _read_key(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from exc


def _with_jwks(
    policies: CompiledPolicySet,
    org: str,
    jwks_file: str,
    audience: str | None = None,
    issuer: str | None = None,
) -> CompiledPolicySet:
    """Dry runs verify tokens with the operator's JWKS file instead of the keys the server
    fetches for the organization (jwks_url or discovery), checked for the organization's own
    issuer and audience, as the server checks them.

    Raises UsageError for an organization whose keys are its own jwks_file (read as the server
    reads it: other keys would verify tokens the server refuses).

    Raises UsageError for an organization without `tokens:`: the server verifies none of its
    tokens and shows policies none of their claims (auth.tokens), so a dry run that verified
    them could answer ALLOW on claims where the server answers DENY; and for an `audience` or
    `issuer` (--audience, --issuer) other than the organization's, for the same reason."""
    organization = policies.organizations.get(org)
    if organization is not None and organization.tokens.keys is None:
        raise UsageError(
            f"--jwks: organization {org!r} has no 'tokens:' section, so the server verifies "
            "none of its subject tokens and shows policies none of their claims "
            "(subject.claims and subject.actors are empty); a dry run verifying them would "
            "not decide as the server does. Leave out --jwks (tokens are then read as the "
            "server reads them), or give the organization a 'tokens:' section"
        )
    if isinstance(organization.tokens.keys if organization else None, StaticKeySet):
        # Its keys are a jwks_file, read by this dry run exactly as the server reads it: other
        # keys would verify tokens the server refuses.
        raise UsageError(
            f"--jwks: organization {org!r} verifies its tokens with its own jwks_file, which "
            "this dry run reads as the server does; leave out --jwks (it stands in only for "
            "keys the server fetches: jwks_url or discovery)"
        )
    if organization is not None:
        for flag, given, own in (
            ("--audience", audience, organization.tokens.audience),
            ("--issuer", issuer, organization.tokens.issuer),
        ):
            if given is not None and given != own:
                raise UsageError(
                    f"{flag} {given!r} is not organization {org!r}'s own ({own!r}): the server "
                    "checks its tokens for that one, and a dry run checking another could "
                    "allow a token the server refuses"
                )
    try:
        keys = StaticKeySet.from_file(Path(jwks_file))
    except KeySetError as exc:
        raise UsageError(f"--jwks: {exc}") from exc
    return with_key_set(policies, org, keys, audience=audience, issuer=issuer)


def with_key_set(
    policies: CompiledPolicySet,
    org: str,
    keys: KeySource,
    *,
    audience: str | None = None,
    issuer: str | None = None,
) -> CompiledPolicySet:
    """`policies` with organization `org`'s subject tokens verified by `keys`, and `audience`
    and `issuer` when given (its other token settings kept); unchanged when `org` is not
    loaded. Without an issuer and an audience from either, every token is refused
    (auth.tokens)."""
    organization = policies.organizations.get(org)
    if organization is None:
        return policies
    tokens = dataclasses.replace(organization.tokens, keys=keys)
    if audience is not None:
        tokens = dataclasses.replace(tokens, audience=audience)
    if issuer is not None:
        tokens = dataclasses.replace(tokens, issuer=issuer)
    patched = dataclasses.replace(organization, tokens=tokens)
    return dataclasses.replace(
        policies, organizations=MappingProxyType({**policies.organizations, org: patched})
    )


def cmd_eval(args: argparse.Namespace) -> int:
    message = build_message(args)
    policies = load_policy_set(Path(args.policies))
    if (args.audience is not None or args.issuer is not None) and not args.jwks:
        raise UsageError("--audience and --issuer apply only with --jwks")
    for flag, value in (("--audience", args.audience), ("--issuer", args.issuer)):
        # A blank one would accept tokens whose claim is blank too: for no one in particular.
        if value is not None and (not value.strip() or value != value.strip()):
            raise UsageError(f"{flag} must be a non-empty value without surrounding spaces")
    if args.jwks:
        policies = _with_jwks(policies, args.org, args.jwks, args.audience, args.issuer)
    now = datetime.now(UTC)
    decision = dry_run(message, policies, now=now)
    # Counted as the server counts it, in counters of this run's own, topped up first.
    request = (args.subject, args.application, args.integration, args.scope)
    decision, problems = DryRunQuotas().count(
        policies.organizations.get(args.org), request, decision, now, _quota_used(args.quota_used)
    )
    if problems:
        raise UsageError("--quota-used: " + "; ".join(problems))
    if args.json:
        print(json.dumps(decision_to_dict(decision), indent=2))
    else:
        print(format_decision(decision))
    return EXIT_OK


def _quota_used(values: Sequence[str]) -> dict[str, int]:
    """`--quota-used NAME=N` flags as {quota name: ALLOWs already counted}; UsageError for
    anything but a name and a whole number from 0 to MAX_QUOTA_USED."""
    used: dict[str, int] = {}
    for value in values:
        name, _, count = value.partition("=")
        # ASCII digits only: str.isdigit() also takes "²" and "٣", which int() refuses or
        # reads as another number.
        if not (count.isascii() and count.isdigit()) or not 0 <= int(count) <= MAX_QUOTA_USED:
            raise UsageError(
                f"--quota-used {value!r}: expected NAME=N, N a whole number from 0 to "
                f"{MAX_QUOTA_USED:,}"
            )
        used[name] = int(count)
    return used


def cmd_validate(args: argparse.Namespace) -> int:
    key = _read_key(args.public_key, "--public-key")
    policies = load_policy_set(Path(args.directory), bundle_public_key=key)
    summary = ", ".join(
        f"{org.name} ({org.policy_count} policies, {org.rule_count} rules)"
        for org in policies.organizations.values()
    )
    print(f"OK: {policies.file_count} files, revision {policies.revision}: {summary}")
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-decide the audit records against --policies; print what would change."""
    import redis

    from policy_engine.replay.replay import (
        jwks_flags,
        load_candidate,
        order_audit_files,
        printable,
        replay_files,
        replay_redis,
        stream_length,
        terminal_progress,
        with_jwks_files,
    )

    if bool(args.audit) == bool(args.redis_url):
        raise UsageError("give either --audit FILE... or --redis-url URL --stream NAME")
    if args.redis_url and not args.stream:
        raise UsageError("--redis-url needs --stream NAME")
    jwks_files = jwks_flags(args.jwks)
    policies = with_jwks_files(load_candidate(Path(args.policies)), jwks_files)
    progress = None
    try:
        if args.audit:
            paths = order_audit_files([Path(p) for p in args.audit])
            progress = terminal_progress(lambda: sum(p.stat().st_size for p in paths))
            step = progress.step if progress else None
            report = replay_files(paths, policies, progress=step)
        else:
            progress = terminal_progress(lambda: stream_length(args.redis_url, args.stream))
            step = progress.step if progress else None
            report = replay_redis(
                args.redis_url,
                args.stream,
                policies,
                start=args.start,
                end=args.end,
                progress=step,
            )
    except OSError as exc:
        raise UsageError(f"--audit {printable(str(exc.filename))}: {exc.strerror or exc}") from None
    except (redis.RedisError, ValueError) as exc:  # ValueError: a URL redis-py cannot use
        raise UsageError(f"--redis-url: {exc}") from None
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render())
    if args.fail_on_new_allows and report.new_allows:
        return EXIT_NEW_ALLOWS
    return EXIT_OK


def add_replay_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="re-decide audited decisions against candidate policies; report what changes",
        description="Each decision record is decided again with its recorded inputs and "
        "decision time. Records that cannot be replayed exactly are counted by reason.",
    )
    replay.add_argument("--audit", nargs="+", metavar="FILE", help="audit files (rotated too)")
    replay.add_argument("--redis-url", help="read the records from a Redis Stream instead")
    replay.add_argument("--stream", help="the Redis Stream's name (with --redis-url)")
    replay.add_argument("--from", dest="start", default="-", metavar="ID", help="first entry ID")
    replay.add_argument("--to", dest="end", default="+", metavar="ID", help="last entry ID")
    replay.add_argument("--policies", required=True, help="candidate policy directory")
    replay.add_argument("--json", action="store_true", help="print one JSON object")
    replay.add_argument(
        "--jwks",
        action="append",
        default=[],
        metavar="ORG=FILE",
        help="the JWKS that ORG's jwks_url (or discovered keys) served: its token records "
        "are then replayed, not counted as token_keys_unknown (repeatable)",
    )
    replay.add_argument(
        "--fail-on-new-allows",
        action="store_true",
        help=f"exit {EXIT_NEW_ALLOWS} if any DENY would become ALLOW",
    )
    replay.set_defaults(handler=cmd_replay)


# The settings that flags of `serve` and `config check` set, to name the flag in errors.
SETTINGS_FLAGS = {
    "address": "--address",
    "policy_dir": "--policies",
    "workers": "--workers",
    "threads": "--threads",
    "cache.redis_url": "--redis-url",
}


def _settings_from_args(args: argparse.Namespace, *, apart: bool = False) -> Settings:
    """Settings as `pdp serve` reads them: defaults, --config FILE, PDP_* environment, then
    the flags given. Raises ConfigError naming every setting that cannot be used. `apart`:
    validated in a child process, so this one never imports pydantic (see config.py)."""
    return (load_settings_apart if apart else load_settings)(
        config_file=Path(args.config) if args.config else None,
        overrides={
            "address": args.address,
            "policy_dir": args.policies,
            "workers": args.workers,
            "threads": args.threads,
            "cache": {"redis_url": args.redis_url} if args.redis_url is not None else None,
        },
        flag_names=SETTINGS_FLAGS,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from policy_engine.server.app import serve

    settings = _settings_from_args(args, apart=True)  # the server never holds pydantic
    setup_logging(settings.log_level, settings.log_format)
    serve(settings, early_sighup=sighup_received)
    return EXIT_OK


def _print_config_errors(exc: ConfigError) -> None:
    """Every line of `exc` (one bad setting each) on stderr, under a count."""
    lines = str(exc).splitlines()
    print(f"pdp: invalid configuration: {len(lines)} error(s)", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)


def startup_checks(settings: Settings) -> list[str]:
    """What `pdp serve` refuses at startup once its settings have loaded, in its order and
    with its own messages: the Redis signing and verify key files (with a Redis level), the
    port `workers` > 1 share, the bundle public key file, the TLS certificate, key and client
    CA files, the caller JWKS file (`caller_auth.jwks_file`), the audit signing key file
    (audit on), that the tracing extra is installed (tracing on). Not run: whether a port is
    free (it may not be when the server starts). Every problem found, one per entry."""
    from policy_engine.cache.signing import load_signing_keys, redis_level_on
    from policy_engine.server.app import bundle_public_key
    from policy_engine.server.security import server_credentials

    problems: list[str] = []
    checks: list[Callable[[], object]] = [
        lambda: bundle_public_key(settings),
        lambda: server_credentials(settings.tls),
    ]
    if settings.caller_auth.jwks_file:
        checks.append(lambda: _caller_keys(settings))
    if settings.audit.enabled and settings.audit.signing_key_file:
        checks.append(lambda: _audit_signing_key(settings.audit.signing_key_file))
    if settings.tracing.enabled:
        from policy_engine.tracing import tracing_from_settings

        checks.append(lambda: tracing_from_settings(settings))  # builds, exports nothing
    if redis_level_on(settings.cache):
        try:
            load_signing_keys(settings.cache)
        except ConfigError as exc:
            problems.append(str(exc))
    problems += shared_port_problems(settings)
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def _caller_keys(settings: Settings) -> None:
    """Raises ConfigError when the server could not build its bearer check: the caller JWKS
    file unreadable or not a usable JWKS (RFC 7517 section 5)."""
    from policy_engine.auth.keys import KeySetError
    from policy_engine.server.security import BearerVerifier

    try:
        BearerVerifier(settings.caller_auth)
    except KeySetError as exc:
        raise ConfigError(f"setting caller_auth.jwks_file: {exc}") from exc


def _audit_signing_key(path: str) -> None:
    """Raises ConfigError as the audit writer does when its signing key cannot be used."""
    from policy_engine.audit.keys import KeyFileError, load_private_key

    try:
        load_private_key(Path(path))
    except KeyFileError as exc:
        raise ConfigError(f"setting audit.signing_key_file: {exc}") from exc


def cmd_config_check(args: argparse.Namespace) -> int:
    """Print the effective settings (secrets masked) and exit 0, or every error and exit 2:
    the settings' own rules, then what the server checks next (`startup_checks`)."""
    try:
        settings = _settings_from_args(args)
        problems = startup_checks(settings)
        if problems:
            raise ConfigError("\n".join(problems))
    except ConfigError as exc:
        _print_config_errors(exc)
        return EXIT_USAGE
    shown = settings_dict(settings)
    if args.format == "json":
        print(json.dumps(shown, indent=2))
    else:
        print(yaml.safe_dump(shown, sort_keys=False, default_flow_style=False), end="")
    return EXIT_OK


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that override settings, shared by `serve` and `config check`."""
    parser.add_argument("--address", help=f"host:port (default {DEFAULTS.address})")
    parser.add_argument("--policies", help="policy directory (default policies)")
    parser.add_argument("--config", help="YAML config file (see README)")
    parser.add_argument("--workers", type=int, help="processes sharing the port (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        help="retired: calls run on the event loop (accepted, ignored with a warning)",
    )
    parser.add_argument(
        "--redis-url",
        help="share decisions through this Redis (redis://, rediss://; default: in-process only)",
    )


def add_config_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = commands.add_parser("config", help="check the server's settings")
    actions = config.add_subparsers(dest="config_command", required=True)
    check = actions.add_parser(
        "check",
        help="print the effective settings (secrets masked), or every error (exit 2)",
        description="Settings are read as `pdp serve` reads them: defaults, --config FILE, "
        "PDP_* environment variables, then these flags.",
    )
    _add_settings_flags(check)
    check.add_argument("--format", choices=("yaml", "json"), default="yaml")
    check.set_defaults(handler=cmd_config_check)


def cmd_bundle_sign(args: argparse.Namespace) -> int:
    """Signs every file the loader could read (hidden ones too), read once: the bytes that are
    validated are the bytes that are signed."""
    directory = Path(args.directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    snapshot, unreadable = read_tree(directory)
    if unreadable:
        issues = [problem.partition(": ") for problem in unreadable]
        raise PolicyLoadError([LoadIssue(directory / name, 0, why) for name, _, why in issues])
    load_policy_source(snapshot)  # never sign a set that would not load
    try:
        written = sign_bundle(directory, _read_key(args.key, "--key") or b"", snapshot)
    except BundleError as exc:
        raise UsageError(str(exc)) from exc
    print(f"signed {len(snapshot.files)} files: {written}")
    return EXIT_OK


def cmd_bundle_keygen(args: argparse.Namespace) -> int:
    """Writes an Ed25519 pair in PEM for `pdp bundle sign --key` and `--public-key`: the same
    pair `pdp audit keygen` makes (private key mode 0600, created atomically)."""
    from policy_engine.audit.keys import KeyFileError, generate_keypair

    try:
        kid = generate_keypair(Path(args.out_private), Path(args.out_public), force=args.force)
    except (KeyFileError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {args.out_private} (private, mode 0600) and {args.out_public}; key id {kid}")
    return EXIT_OK


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    problems = verify_bundle(
        Path(args.directory), _read_key(args.public_key, "--public-key") or b""
    )
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    print("OK: the files are exactly as signed" if not problems else "signature check FAILED")
    return EXIT_INVALID_POLICIES if problems else EXIT_OK


def add_bundle_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = commands.add_parser("bundle", help="make keys for, sign and verify policy directories")
    actions = bundle.add_subparsers(dest="bundle_command", required=True)
    keygen = actions.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    keygen.add_argument("--out-private", required=True, metavar="FILE")
    keygen.add_argument("--out-public", required=True, metavar="FILE")
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    keygen.set_defaults(handler=cmd_bundle_keygen)
    sign = actions.add_parser("sign", help=f"write DIR/{BUNDLE_FILE} over every file in DIR")
    sign.add_argument("directory")
    sign.add_argument("--key", required=True, help="PEM private key (Ed25519, P-256 or RSA)")
    sign.set_defaults(handler=cmd_bundle_sign)
    verify = actions.add_parser("verify", help="check DIR against its signature")
    verify.add_argument("directory")
    verify.add_argument("--public-key", required=True)
    verify.set_defaults(handler=cmd_bundle_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve decisions over gRPC")
    _add_settings_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    validate = commands.add_parser("validate", help="check a policy directory; list every error")
    validate.add_argument("directory")
    validate.add_argument("--public-key", help="also require a valid bundle signature")
    validate.set_defaults(handler=cmd_validate)

    evaluate = commands.add_parser("eval", help="dry-run one tuple against a policy directory")
    evaluate.add_argument("--policies", required=True)
    evaluate.add_argument("--org", required=True)
    evaluate.add_argument("--subject", required=True)
    evaluate.add_argument(
        "--subject-kind", default=SubjectKind.USER.value, choices=[k.value for k in SubjectKind]
    )
    evaluate.add_argument(
        "--subject-namespace",
        metavar="NAMESPACE",
        help="an external_user's IdentityMapping namespace (default: the application's only one)",
    )
    evaluate.add_argument("--application", required=True)
    evaluate.add_argument("--integration", required=True)
    evaluate.add_argument("--scope", required=True)
    for flag in ("--subject-attr", "--application-attr", "--integration-attr", "--context"):
        evaluate.add_argument(flag, action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--token", help="the subject's access token (JWT)")
    evaluate.add_argument("--jwks", help="verify --token with this JWKS file")
    evaluate.add_argument(
        "--audience",
        help="with --jwks: the 'aud' the token must carry; only the organization's own "
        "tokens.audience, which is also the default (the server checks for that one)",
    )
    evaluate.add_argument(
        "--issuer",
        help="with --jwks: the 'iss' the token must carry; only the organization's own "
        "tokens.issuer, which is also the default",
    )
    evaluate.add_argument(
        "--quota-used",
        action="append",
        default=[],
        metavar="QUOTA=N",
        help="count the ALLOW as if quota QUOTA already counted N for this tuple in its window",
    )
    evaluate.add_argument("--explain", action="store_true", help="show every layer and rule")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=cmd_eval)

    add_test_command(commands)
    add_replay_command(commands)
    add_audit_commands(commands)
    add_bundle_commands(commands)
    add_config_commands(commands)
    add_status_command(commands, DEFAULTS.address)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except PolicyLoadError as exc:
        print(f"invalid policies: {len(exc.issues)} error(s)", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID_POLICIES
    except ConfigError as exc:
        if "\n" in str(exc):  # several bad settings: as `pdp config check` lists them
            _print_config_errors(exc)
        else:
            print(f"pdp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"pdp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartFailed as exc:  # the cause's traceback is in the log at debug level
        print(f"pdp: error: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (`pdp test --json | head`): no traceback, and none at exit either
        # when Python flushes stdout into the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    # Run as `python -m policy_engine.cli.main`, this file is `__main__`: a second copy of
    # the module beside the `policy_engine.cli.main` that the commands' own modules (replay,
    # status) import. Their UsageError is that module's class, which this copy's `except
    # UsageError` does not catch: a traceback and exit 1 instead of `pdp: error:` and exit 2.
    from policy_engine.cli.main import main as package_main

    sys.exit(package_main())
