"""Quotas the PDP enforces: declared in policies, counted on every ALLOW it answers.

- `model`: the shared types (`QuotaSpec`, `Charge`, `Verdict`, the `QuotaStore` protocol);
- `memory`: the in-process counter store (per process: used when no Redis is configured);
- `redis_store`: the Redis counter store shared by every replica (one Lua script per slot).
"""

from policy_engine.quota.model import (
    ADMITTED,
    UNAVAILABLE,
    Algorithm,
    Charge,
    QuotaSpec,
    QuotaStore,
    Verdict,
    WhenUnavailable,
)

__all__ = [
    "ADMITTED",
    "UNAVAILABLE",
    "Algorithm",
    "Charge",
    "QuotaSpec",
    "QuotaStore",
    "Verdict",
    "WhenUnavailable",
]
