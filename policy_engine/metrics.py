"""Prometheus metrics: every metric the PDP exports, defined in one place.

Labels are bounded sets (effects, codes, levels, results): never an ID from a request.

With `--workers N` the workers write their values to files in PROMETHEUS_MULTIPROC_DIR and
the supervisor serves the sum (prometheus_client multiprocess mode): counters and histograms
add up across workers; each Gauge says how to combine workers (`multiprocess_mode`); Info and
Enum metrics are not supported there, so "which revision" is an info-style Gauge.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
DEADLINE_EXCEEDED = Counter(
    "pdp_deadline_exceeded_total",
    "Calls not evaluated because the caller's deadline had passed: when their turn came"
    " (stage=queued), while waiting for a JWKS refresh (stage=keys) or for the cache"
    " (stage=cache) or for room in a full audit queue (stage=audit), or during a batch's"
    " evaluation (stage=evaluation: the rest is not"
    " evaluated), or for the quota counter store (stage=quota). Answered DEADLINE_EXCEEDED.",
    ["stage"],
)
CACHE_LOOKUPS = Counter(
    "pdp_cache_lookups_total",
    "Decision cache lookups per level (local, redis) and result (hit, miss, error, skip;"
    " redis also rejected: a value that failed verification).",
    ["level", "result"],
)
REDIS_ERRORS = Counter(
    "pdp_redis_errors_total", "Redis operations that failed or timed out.", ["operation"]
)
CACHE_WRITES_DROPPED = Counter(
    "pdp_cache_writes_dropped_total",
    "Redis cache writes not made, by reason: queue_full (Redis slower than the misses; the"
    " request never waits for a write), shutdown (still queued at the stop deadline).",
    ["reason"],
)
BREAKER_STATE = Gauge(
    "pdp_redis_breaker_open", "1 while the Redis circuit breaker is open (Redis bypassed)."
)
POLICY_REVISION = Gauge(
    "pdp_policy_revision_info",
    "Processes serving each policy revision (1 for the serving one; 0 for one served before).",
    ["revision"],
    multiprocess_mode="livesum",
)
RELOADS = Counter(
    "pdp_policy_reloads_total", "Policy reload attempts by result (success, error).", ["result"]
)
LAST_RELOAD_SUCCESS = Gauge(
    "pdp_policy_last_reload_success",
    "1 if the last reload attempt succeeded, else 0 (with workers: 0 if any worker's failed).",
    multiprocess_mode="livemin",
)
LAST_RELOAD_TIME = Gauge(
    "pdp_policy_last_reload_timestamp_seconds",
    "Unix time of the last reload attempt (with workers: the latest of any worker).",
    multiprocess_mode="livemax",
)
RELOAD_DURATION = Histogram(
    "pdp_policy_reload_seconds",
    "Time to read and compile the whole policy set, per reload attempt.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
POLICY_WORK = Counter(
    "pdp_policy_compiles_total",
    "Policy load work actually done (a count, not a time): files parsed (file) and CEL"
    " conditions compiled (condition). A reload parses and compiles only what changed.",
    ["unit"],
)
POLICY_LOADS = Counter(
    "pdp_policy_loads_total",
    "Reload attempts that read the policy files (read) or found every file unchanged by its"
    " identity and read none (unchanged).",
    ["kind"],
)
AUDIT_RECORDS = Counter(
    "pdp_audit_records_total",
    "Audit records written, by sink (file, redis, stdout) and record type.",
    ["sink", "type"],
)
AUDIT_DROPPED = Counter(
    "pdp_audit_dropped_total",
    "Decisions left out of the audit log, by sink (`queue`: before any sink) and reason "
    "(queue_full, closed, sink_backlog_full, shutdown, build_error).",
    ["sink", "reason"],
)
AUDIT_BLOCKED = Counter(
    "pdp_audit_blocked_total", "Audit record() calls that waited for room in the full queue."
)
AUDIT_SINK_ERRORS = Counter(
    "pdp_audit_sink_errors_total",
    "Failed audit sink operations (open, write, rotate); each is retried with backoff.",
    ["sink"],
)
AUDIT_STREAM_REMOVED = Counter(
    "pdp_audit_stream_removed_total",
    "Audit records found removed from a sink under the writer, by sink and reason: reset (the "
    "Redis Stream was deleted or replaced), trimmed (trimmed past the writer's last entry), "
    "unread (trimmed before a consumer group read them, counted per group).",
    ["sink", "reason"],
)
AUDIT_QUEUE_DEPTH = Gauge(
    "pdp_audit_queue_depth",
    "Decisions waiting in the audit queue for the writer.",
    multiprocess_mode="livesum",
)
AUDIT_SINK_BACKLOG = Gauge(
    "pdp_audit_sink_backlog",
    "Audit records waiting for a sink (a growing backlog means the sink is failing or slow).",
    ["sink"],
    multiprocess_mode="livesum",
)
QUOTAS = Counter(
    "pdp_quota_total",
    "ALLOWs counted against each quota (organization and quota names come from the policies),"
    " by outcome: admitted (counted), exhausted (answered DENY kontext_rate_limited),"
    " unavailable (the counter store could not count: denied, or let through uncounted with"
    " when_unavailable: allow).",
    ["organization", "quota", "outcome"],
)
