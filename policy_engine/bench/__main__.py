"""`python -m policy_engine.bench`: see `policy_engine.bench.cli`."""

from policy_engine.bench.cli import main

raise SystemExit(main())
