"""Prometheus metrics: every metric the PDP exports, defined in one place.

Labels are bounded sets (effects, codes, levels, results): never an ID from a request.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

DECISIONS = Counter(
    "pdp_decisions_total",
    "Decisions answered, by effect and by the first reason's code (empty for allows).",
    ["effect", "code"],
)
DECISION_LATENCY = Histogram(
    "pdp_decision_seconds",
    "Time to answer one RPC, by method and by which cache level answered.",
    ["method", "cache_level"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5),
)
CACHE_LOOKUPS = Counter(
    "pdp_cache_lookups_total",
    "Decision cache lookups per level (local, redis) and result (hit, miss, error, skip).",
    ["level", "result"],
)
REDIS_ERRORS = Counter(
    "pdp_redis_errors_total", "Redis operations that failed or timed out.", ["operation"]
)
BREAKER_STATE = Gauge(
    "pdp_redis_breaker_open", "1 while the Redis circuit breaker is open (Redis bypassed)."
)
POLICY_REVISION = Info("pdp_policy", "The policy revision being served.")
RELOADS = Counter(
    "pdp_policy_reloads_total", "Policy reload attempts by result (success, error).", ["result"]
)
LAST_RELOAD_SUCCESS = Gauge(
    "pdp_policy_last_reload_success", "1 if the last reload attempt succeeded, else 0."
)
LAST_RELOAD_TIME = Gauge(
    "pdp_policy_last_reload_timestamp_seconds", "Unix time of the last reload attempt."
)
