"""Serve the EmptyServicer (the benchmark's ceiling) from the command line.

The `pdp` CLI deliberately has no way to serve it, so this entry point exists for the harness.
Settings load exactly as for `pdp serve` (defaults, PDP_* environment, flags), so a row's
extra environment reaches the empty server the same way it reaches the real one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from policy_engine.config import load_settings
from policy_engine.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m policy_engine.bench.empty_server")
    parser.add_argument("--address", required=True, help="host:port")
    parser.add_argument("--workers", type=int, help="processes sharing the port")
    parser.add_argument("--threads", type=int, help="handler threads per process")
    args = parser.parse_args(argv)
    settings = load_settings(
        overrides={"address": args.address, "workers": args.workers, "threads": args.threads}
    )
    setup_logging(settings.log_level, settings.log_format)
    from policy_engine.server.empty import serve_empty

    serve_empty(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
