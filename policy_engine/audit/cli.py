"""`pdp audit keygen | verify | tail`: the audit log's commands, added to the `pdp` parser.

Exit codes: 0 when the command did its job (for `verify`: the files are intact); 1 when
`verify` found tampering; 2 for bad flags, missing files or unusable keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from policy_engine.audit.keys import KeyFileError, generate_keypair, load_public_key
from policy_engine.audit.tail import Filters, run_tail
from policy_engine.audit.verify import verify_files
from policy_engine.config import AuditSettings

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2


def _error(message: str) -> int:
    print(f"pdp audit: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        kid = generate_keypair(Path(args.out_private), Path(args.out_public), force=args.force)
    except (KeyFileError, OSError) as exc:
        return _error(str(exc))
    print(f"wrote {args.out_private} (private, mode 0600) and {args.out_public}; key id {kid}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    if args.public_key is None and not args.chain_only:
        return _error("--public-key KEY is required (or --chain-only to skip signatures)")
    paths = [Path(p) for p in args.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return _error(f"no such file: {', '.join(missing)}")
    try:
        key = load_public_key(Path(args.public_key)) if args.public_key else None
    except KeyFileError as exc:
        return _error(str(exc))
    report = verify_files(paths, key, allow_partial=args.partial)
    print(report.render())
    return EXIT_OK if report.ok else EXIT_TAMPERED


def cmd_tail(args: argparse.Namespace) -> int:
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


def add_audit_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `audit` and its subcommands to the `pdp` parser."""
    audit = commands.add_parser("audit", help="audit log: keys, verification, tail")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signing checkpoints")
    keygen.add_argument("--out-private", required=True, metavar="FILE")
    keygen.add_argument("--out-public", required=True, metavar="FILE")
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    keygen.set_defaults(handler=cmd_keygen)

    verify = sub.add_parser(
        "verify", help="check audit files (oldest first) for edits, deletions, reordering"
    )
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.add_argument("--public-key", metavar="KEY", help="PEM Ed25519 public key")
    verify.add_argument(
        "--chain-only", action="store_true", help="check hashes only, not signatures"
    )
    verify.add_argument(
        "--partial",
        action="store_true",
        help="accept streams that begin mid-chain (an excerpt, a trimmed Redis Stream)",
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
