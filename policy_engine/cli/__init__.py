"""The `pdp` command: serve, validate and dry-run policies."""
