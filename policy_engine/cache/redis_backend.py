"""The shared level: Redis through `redis.asyncio` (standalone, Sentinel, Cluster).

One client per process, hence one connection pool, living on one event loop: the process's
(`policy_engine.lifecycle.event_loop()`, which the decision cache checks). Timeouts are short
(`redis_timeout_ms` for connect, socket reads and waiting for a pooled connection) and there
are no retries: on the request path a slow Redis is a missing Redis, and the circuit breaker
(see `breaker.py`) decides when to try again. This module only talks to Redis; it raises on
any failure and leaves counting failures to its callers (`decision_cache.py`, and the quota
counters' `quota/redis_store.py`, which builds its client here too); `bounded` is how they
bound a wait by a caller's deadline.

Cancellation, as redis-py 8 on Python 3.11 behaves (tests/cache/test_deadlines.py): a command
cancelled while it waits for a reply closes its connection before the cancellation propagates
(`read_response` and `send_packed_command` disconnect on any BaseException), so its late reply
is never read as another command's. But a cancellation that lands while a command waits for a
pooled connection and then connects can be lost (the task runs on to the socket timeout). So
the decision cache never cancels a command for a caller's sake: it stops waiting at the
caller's deadline and lets the command end on its own, within `redis_timeout_ms` (see
`decision_cache.py`); only `aclose` at shutdown ends commands early.

URLs:
- standalone: `redis://[user:password@]host:port/db`, or `rediss://...` for TLS
  (query options such as `?ssl_cert_reqs=required&ssl_ca_certs=/path` are redis-py's own);
- sentinel: `redis://[user:password@]sentinel1:26379,sentinel2:26379/db` (or `rediss://`),
  the sentinels to ask for `redis_sentinel_master`; the password is the master's;
- cluster: `redis://[user:password@]any-node:6379` (or `rediss://`); the client discovers
  the other nodes. Keys of one batch hash to different slots, so batch reads use
  `mget_nonatomic` (one MGET per node, concurrently) and writes a cluster pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from policy_engine.config import CacheSettings, ConfigError
from policy_engine.errors import PolicyEngineError

if TYPE_CHECKING:
    # redis is imported when a client is built: it costs ~10 MB of RSS in a server whose
    # cache has no Redis level (this module is imported by the decision cache either way).
    import redis.asyncio
    from redis.asyncio.retry import Retry

MODES = ("standalone", "sentinel", "cluster")

T = TypeVar("T")


class DeadlinePassed(PolicyEngineError, TimeoutError):
    """The caller's deadline passed while it waited for Redis: nothing was answered (the Redis
    command runs on, bounded by its socket timeout, and reports its outcome when it ends)."""


async def bounded(
    operation: str,
    command: Coroutine[Any, Any, T],
    deadline: float | None,
    late: Callable[[Exception | None], None],
) -> T:
    """`command`'s result, waited for until `deadline` (`time.monotonic()` s; None: no
    bound) at most; raises DeadlinePassed then, and whatever `command` raises.

    The command runs as its own task and is never cancelled here (see the module docstring):
    one the caller stops waiting for (deadline, or the caller's task cancelled) calls
    `late(None)` when it succeeds and `late(exc)` when it fails, so a breaker still learns
    whether Redis answers (callers with short deadlines cannot hide a hung Redis)."""
    if deadline is not None and deadline <= time.monotonic():
        command.close()
        raise DeadlinePassed(f"the deadline passed before redis {operation}")
    task = asyncio.ensure_future(command)
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.add_done_callback(partial(_settle, late))
        raise
    if not task.done():
        task.add_done_callback(partial(_settle, late))
        raise DeadlinePassed(f"the deadline passed while waiting for redis {operation}")
    return task.result()


def _settle(late: Callable[[Exception | None], None], task: asyncio.Future[Any]) -> None:
    """A command nobody waits for any more ended: tell `late` how."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None or isinstance(exc, Exception):
        late(exc)


def _no_retry() -> Retry:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)


class RedisBackend:
    """GET, MGET and pipelined SET ... PX against one Redis deployment, as coroutines.

    The constructor only checks the settings (raises ConfigError naming the setting); the
    client is created at the first `client()` call and connects at its first command.
    """

    def __init__(self, settings: CacheSettings, *, section: str = "cache") -> None:
        """`section` names the settings in errors: "cache", or "quota" for the quota
        counters' Redis (whose URL and timeout come from `quota.*`, the rest from `cache.*`)."""
        mode = settings.redis_mode.strip().lower()
        if mode not in MODES:
            raise ConfigError(
                f"setting cache.redis_mode: expected one of {', '.join(MODES)}, got {mode!r}"
            )
        url = settings.redis_url.strip()
        if not url:
            raise ConfigError(f"setting {section}.redis_url: empty (no Redis configured)")
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss") and not (mode == "standalone" and scheme == "unix"):
            raise ConfigError(
                f"setting {section}.redis_url: expected redis:// or rediss://, got {scheme!r}"
            )
        self.mode = mode
        self._url = url
        self._settings = settings
        self._timeout = max(settings.redis_timeout_ms, 1) / 1000.0
        self._client: Any = None
        self._sentinel: Any = None

    # --- clients ----------------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        return {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            "retry": _no_retry(),
            "health_check_interval": 0,
        }

    def _standalone(self) -> redis.asyncio.Redis:
        import redis.asyncio

        pool = redis.asyncio.BlockingConnectionPool.from_url(
            self._url,
            max_connections=max(self._settings.redis_pool_size, 1),
            timeout=self._timeout,  # waiting for a free connection is bounded too
            **self._common(),
        )
        return redis.asyncio.Redis.from_pool(pool)  # the client owns (and closes) the pool

    def _sentinel_master(self) -> redis.asyncio.Redis:
        from redis.asyncio.sentinel import Sentinel

        parts = urlsplit(self._url)
        hosts: list[tuple[str, int]] = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = item.strip().rpartition(":")
            hosts.append((host.strip("[]") or "localhost", int(port or 26379)))
        db = int(parts.path.strip("/") or 0)
        options = dict(parse_qsl(parts.query))
        ssl = parts.scheme == "rediss"
        sentinel_kwargs = {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            "ssl": ssl,
        }
        self._sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **self._common(), ssl=ssl)
        master: redis.asyncio.Redis = self._sentinel.master_for(
            self._settings.redis_sentinel_master,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            max_connections=max(self._settings.redis_pool_size, 1),
            **{k: v for k, v in options.items() if k.startswith("ssl_")},
        )
        return master

    def _cluster(self) -> Any:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(
            self._url,
            max_connections=max(self._settings.redis_pool_size, 1),
            **self._common(),
        )

    def client(self) -> Any:
        """The client, created on first use (creating it connects nothing)."""
        client = self._client
        if client is None:
            if self.mode == "standalone":
                client = self._standalone()
            elif self.mode == "sentinel":
                client = self._sentinel_master()
            else:
                client = self._cluster()
            self._client = client
        return client

    # --- operations (raise on any failure) --------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.client().get(key)
        return value

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """All keys in one round trip (per cluster node)."""
        client = self.client()
        if self.mode == "cluster":
            return list(await client.mget_nonatomic(list(keys)))
        return list(await client.mget(list(keys)))

    async def set_many(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        """`SET key value PX ttl_ms` for every item, in one pipeline (no MULTI/EXEC)."""
        pipe = self.client().pipeline(transaction=False)
        for key, value, ttl_ms in items:
            pipe.set(key, value, px=ttl_ms)
        await pipe.execute()

    async def aclose(self) -> None:
        """Close every connection (the pool's, and Sentinel's own); best effort, never
        raises. The next command would create a new client."""
        client, self._client = self._client, None
        sentinel, self._sentinel = self._sentinel, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        if sentinel is not None:
            for sentinel_client in sentinel.sentinels:
                with contextlib.suppress(Exception):
                    await sentinel_client.aclose()
