"""The decision cache: an in-process LRU in front of Redis, shared by every replica.

- `key`: what a decision depends on, canonically hashed, under the policy revision;
- `local`: the bounded, thread-safe in-process LRU;
- `redis_backend`: redis.asyncio (standalone, Sentinel, Cluster), short timeouts, no retries;
- `breaker`: the circuit breaker that stops a dead or slow Redis from costing requests;
- `writer`: the write-behind task, so responses never wait for a Redis write;
- `entry`, `signing`: what a Redis value holds, signed with keys no Redis writer holds;
- `decision_cache`: the two-level facade the decision pipeline uses, a lifecycle component.
"""

from policy_engine.cache.breaker import BreakerState, CircuitBreaker
from policy_engine.cache.decision_cache import (
    CacheLevel,
    DecisionCache,
    Hit,
    Store,
    build_cache,
)
from policy_engine.cache.entry import Entry
from policy_engine.cache.key import KeyBuilder, settings_fingerprint
from policy_engine.cache.redis_backend import DeadlinePassed
from policy_engine.cache.signing import (
    MIN_KEY_BYTES,
    SigningKeys,
    load_signing_keys,
    redis_level_on,
)

__all__ = [
    "MIN_KEY_BYTES",
    "BreakerState",
    "CacheLevel",
    "CircuitBreaker",
    "DeadlinePassed",
    "DecisionCache",
    "Entry",
    "Hit",
    "KeyBuilder",
    "SigningKeys",
    "Store",
    "build_cache",
    "load_signing_keys",
    "redis_level_on",
    "settings_fingerprint",
]
