"""Quotas the PDP enforces: declared in policies, counted on every ALLOW it answers.

- `model`: the shared types (`QuotaSpec`, `Charge`, `Verdict`, the `QuotaStore` protocol);
- `memory`: the in-process counter store (per process: used when no Redis is configured);
- `redis_store`: the Redis counter store shared by every replica (one Lua script per slot);
- `quota_store_from_settings`: the store the settings configure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from policy_engine.quota.memory import InProcessQuotaStore
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

if TYPE_CHECKING:
    from policy_engine.config import Settings


def quota_store_from_settings(settings: Settings) -> QuotaStore:
    """The configured counter store: Redis at `quota.redis_url`, else at `cache.redis_url`,
    else in-process (per process). Raises ConfigError naming the setting when a Redis setting
    is unusable; connects nothing and starts nothing (a lifecycle component)."""
    if settings.quota.effective_redis_url(settings.cache):
        # Imported here: a server without Redis never loads the Redis store's module.
        from policy_engine.quota.redis_store import RedisQuotaStore

        return RedisQuotaStore(settings.quota, settings.cache)
    return InProcessQuotaStore()


__all__ = [
    "ADMITTED",
    "UNAVAILABLE",
    "Algorithm",
    "Charge",
    "InProcessQuotaStore",
    "QuotaSpec",
    "QuotaStore",
    "Verdict",
    "WhenUnavailable",
    "quota_store_from_settings",
]
