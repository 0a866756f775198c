"""The `pdp` command: serve, validate and dry-run policies."""

import sys

from policy_engine.cli.early import hold_signals, serving

if serving(sys.argv):
    hold_signals()  # first: before the heavy imports of `pdp serve` (see early.py)
