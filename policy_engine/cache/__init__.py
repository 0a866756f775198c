"""The decision cache: an in-process LRU in front of Redis, shared by every replica.

- `key`: what a decision depends on, canonically hashed, under the policy revision;
- `local`: the bounded, thread-safe in-process LRU;
- `redis_backend`: redis-py (standalone, Sentinel, Cluster), short timeouts, no retries;
- `breaker`: the circuit breaker that stops a dead or slow Redis from costing requests;
- `writer`: write-behind, so responses never wait for a Redis write;
- `decision_cache`: the two-level facade the servicer uses.
"""

from policy_engine.cache.breaker import BreakerState, CircuitBreaker
from policy_engine.cache.decision_cache import CacheLevel, DecisionCache, Hit, Store, build_cache
from policy_engine.cache.entry import Entry
from policy_engine.cache.key import KeyBuilder, settings_fingerprint

__all__ = [
    "BreakerState",
    "CacheLevel",
    "CircuitBreaker",
    "DecisionCache",
    "Entry",
    "Hit",
    "KeyBuilder",
    "Store",
    "build_cache",
    "settings_fingerprint",
]
