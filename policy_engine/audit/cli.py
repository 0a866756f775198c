"""`pdp audit keygen | verify | tail`: the audit log's commands, added to the `pdp` parser.

Exit codes (`verify` gives the first that applies, see `policy_engine.audit.verify`):

* 0: the command did its job; for `verify`, OK: intact, complete, from each stream's start
  to its final checkpoint, with no record missing.
* 1: `verify` found tampering (TAMPERED).
* 2: bad flags, missing files, unusable keys, an unreachable Redis.
* 3: `verify`: INCOMPLETE: intact, but records are known to be missing (the writer's
  `dropped` records, a Redis Stream reset under the writer, a stream without its final
  checkpoint: writer killed or end cut).
* 4: `verify`: PARTIAL: intact and complete from where the input begins, but the beginning of
  a stream is not in it (older rotated files not given or deleted by file_keep, a Redis Stream
  trimmed by MAXLEN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from policy_engine.config import AuditSettings

if TYPE_CHECKING:
    from policy_engine.audit.verify import Report

# The commands import their modules when run: `pdp serve` builds this parser too, and
# cryptography and redis would cost its process ~18 MB of RSS for commands it never runs.

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_PARTIAL = 4
VERDICT_EXIT = {
    "OK": EXIT_OK,
    "TAMPERED": EXIT_TAMPERED,
    "INCOMPLETE": EXIT_INCOMPLETE,
    "PARTIAL": EXIT_PARTIAL,
}


def _error(message: str) -> int:
    print(f"pdp audit: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_keygen(args: argparse.Namespace) -> int:
    from policy_engine.audit.keys import KeyFileError, generate_keypair

    try:
        kid = generate_keypair(Path(args.out_private), Path(args.out_public), force=args.force)
    except (KeyFileError, OSError) as exc:
        return _error(str(exc))
    print(f"wrote {args.out_private} (private, mode 0600) and {args.out_public}; key id {kid}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from policy_engine.audit.keys import KeyFileError, load_public_key
    from policy_engine.audit.tail import is_redis_source
    from policy_engine.audit.verify import verify_files, verify_redis

    if args.public_key is None and not args.chain_only:
        return _error("--public-key KEY is required (or --chain-only to skip signatures)")
    sources: list[str] = args.files
    redis_sources = [s for s in sources if is_redis_source(s)]
    if redis_sources and len(sources) > 1:
        return _error("give one redis:// URL, or files (not both, not several URLs)")
    paths = [Path(p) for p in sources] if not redis_sources else []
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return _error(f"no such file: {', '.join(missing)}")
    try:
        key = load_public_key(Path(args.public_key)) if args.public_key else None
    except KeyFileError as exc:
        return _error(str(exc))
    report: Report
    if redis_sources:
        try:
            report = verify_redis(
                redis_sources[0], args.stream, key, allow_partial=args.partial, live=args.live
            )
        except Exception as exc:  # redis errors: say what, not a traceback
            return _error(f"{type(exc).__name__}: {exc}")
    else:
        report = verify_files(paths, key, allow_partial=args.partial, live=args.live)
    print(report.render())
    return VERDICT_EXIT[report.verdict]


def cmd_tail(args: argparse.Namespace) -> int:
    from policy_engine.audit.tail import Filters, run_tail

    filters = Filters(
        organization=args.org,
        subject=args.subject,
        application=args.application,
        integration=args.integration,
        decision=args.decision,
        code=args.code,
        include_all=args.all,
    )
    if args.count is not None and args.count < 1:
        return _error("--count must be at least 1")
    try:
        run_tail(
            args.source,
            filters,
            stream=args.stream,
            json_output=args.json,
            from_start=args.from_start or args.once,
            once=args.once,
            count=args.count,
            out=sys.stdout,
        )
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        return _error(str(exc))
    except Exception as exc:  # redis errors and the like: say what, not a traceback
        return _error(f"{type(exc).__name__}: {exc}")
    return EXIT_OK


def add_audit_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `audit` and its subcommands to the `pdp` parser."""
    audit = commands.add_parser("audit", help="audit log: keys, verification, tail")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signing checkpoints")
    keygen.add_argument("--out-private", required=True, metavar="FILE")
    keygen.add_argument("--out-public", required=True, metavar="FILE")
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    keygen.set_defaults(handler=cmd_keygen)

    verify = sub.add_parser(
        "verify",
        help="check audit files (oldest first) or a Redis Stream for edits, deletions, "
        "reordering and missing records (exit 0 OK, 1 TAMPERED, 3 INCOMPLETE, 4 PARTIAL)",
    )
    verify.add_argument("files", nargs="+", metavar="FILE|redis://HOST:PORT/DB")
    verify.add_argument(
        "--stream",
        default=AuditSettings().redis_stream,
        help="Redis Stream key, with a redis:// source (default %(default)s)",
    )
    verify.add_argument("--public-key", metavar="KEY", help="PEM Ed25519 public key")
    verify.add_argument(
        "--chain-only", action="store_true", help="check hashes only, not signatures"
    )
    verify.add_argument(
        "--partial",
        action="store_true",
        help="accept streams that begin mid-chain (an excerpt, a trimmed Redis Stream) as "
        "PARTIAL (exit 4) rather than TAMPERED",
    )
    verify.add_argument(
        "--live",
        action="store_true",
        help="the log is still being written: accept streams without a final checkpoint "
        "(unless a later segment shows their writer restarted)",
    )
    verify.set_defaults(handler=cmd_verify)

    tail = sub.add_parser("tail", help="follow an audit file or a Redis Stream")
    tail.add_argument("source", metavar="FILE|redis://HOST:PORT/DB")
    tail.add_argument(
        "--stream",
        default=AuditSettings().redis_stream,
        help="Redis Stream key (default %(default)s)",
    )
    tail.add_argument("--org")
    tail.add_argument("--subject")
    tail.add_argument("--application")
    tail.add_argument("--integration")
    tail.add_argument("--decision", type=str.upper, choices=["ALLOW", "DENY"])
    tail.add_argument("--code", help="a reason code, e.g. kontext_policy_denied")
    tail.add_argument("--json", action="store_true", help="print the stored JSON lines")
    tail.add_argument("--all", action="store_true", help="also checkpoints and other chain records")
    tail.add_argument("--from-start", action="store_true", help="begin at the beginning")
    tail.add_argument("--once", action="store_true", help="print what is there, then exit")
    tail.add_argument("-n", "--count", type=int, help="exit after N matching records")
    tail.set_defaults(handler=cmd_tail)
