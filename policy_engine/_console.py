"""The `pdp` console script: `policy_engine.cli.main`, or one clear line when the server's
dependencies are not installed.

The base distribution is the broker's client only (grpcio, protobuf); the command needs the
`server` extra. Installed without it, `pdp` would die with a ModuleNotFoundError traceback from
whichever import came first; instead it says what is missing and how to install it, exit 2
(bad setup, as for bad flags). A missing module of this package itself is a broken install,
not a missing extra, and is raised as it is.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2
INSTALL_HINT = "pip install 'policy-engine[server]'"


def main() -> int:
    """Run `pdp` with sys.argv; return its exit code."""
    try:
        from policy_engine.cli.main import main as pdp_main
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "policy_engine":
            raise
        print(
            f"pdp: error: the pdp command needs the server's dependencies, which are not "
            f"installed (no module {missing!r}): {INSTALL_HINT}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return pdp_main()
