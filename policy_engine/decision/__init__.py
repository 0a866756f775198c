"""One decision pipeline for every transport: requests in, typed outcomes and answers out.

- `pipeline`: the `Decider` (snapshot, cache lookup, evaluation, store, observers), what may
  be cached, the answer fingerprint, the clock;
- `outcome`: the typed outcomes (`CacheHit`, `Decided`, `Invalid`, `ServerError`) and the
  call's `Decisions`.
"""

from policy_engine.decision.outcome import (
    CacheHit,
    Decided,
    Decisions,
    Invalid,
    Outcome,
    ServerError,
)
from policy_engine.decision.pipeline import (
    DeadlineExceeded,
    Decider,
    DecisionMetrics,
    DecisionStore,
    Observer,
    answer_fingerprint,
    cache_from_settings,
    storable,
)

__all__ = [
    "CacheHit",
    "DeadlineExceeded",
    "Decided",
    "Decider",
    "DecisionMetrics",
    "DecisionStore",
    "Decisions",
    "Invalid",
    "Observer",
    "Outcome",
    "ServerError",
    "answer_fingerprint",
    "cache_from_settings",
    "storable",
]
