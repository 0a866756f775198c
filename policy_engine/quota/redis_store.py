"""The quota counters in Redis, shared by every replica: one Lua script per call (per slot).

Keys: `{prefix}:{<organization>}:<quota name>:<window_ms><f|s>:<bucket>`. The hash tag keeps
one organization's counters in one Cluster slot, so a call's items of one organization are
counted by one script, atomically; a change of window or algorithm starts new counters, a
change of limit keeps them.

- fixed: a string counter per bucket, `INCR`ed, expiring (`PEXPIREAT`) at its window's end
  (windows are aligned to multiples of `window_ms` since the Unix epoch), or later when it
  already did (a counter written while Redis's clock was ahead keeps its count: fail closed);
- sliding: a sorted set of ALLOW times (score: epoch ms; member: the time in microseconds
  and the set's size then, unique), trimmed to the window (`ZREMRANGEBYSCORE`) before its
  size is read, expiring a window after its newest entry (never sooner than it did).

The script (`SCRIPT`) reads the time once from Redis (`TIME`: every replica agrees, and no
caller can move its own windows), then for each item in order checks every charge and, only
when all have room, counts all of them. It answers two integers per item: 0 (admitted), the
1-based index of the first full charge and the milliseconds until it frees, or -1 (a counter
key holds something else than a counter: a wrong type, a value that is not a decimal count;
nothing is counted for that item, and the script goes on with the next).

The client is the cache's (`cache/redis_backend.py`: standalone, Sentinel or Cluster, short
timeouts, no retries) with its own circuit breaker. One call is one pipeline: one `EVALSHA`
per organization in Cluster mode (each sent to its slot's node), one for the whole call
otherwise; `NOSCRIPT` loads the script (`SCRIPT LOAD`, every primary) and retries once. The
first call, and one call every `EVICTION_CHECK_SECONDS`, first reads `INFO memory` (every node
in Cluster mode): a Redis that may evict counters (a `maxmemory` with any policy but
`noeviction`) counts nothing, its items unavailable (an evicted counter restarts at zero). The
wait is bounded by the caller's deadline (`redis_backend.bounded`: the command is never
cancelled, it runs on to its own timeout). Anything short of a well-formed answer (a
fault, a timeout, an open breaker, `NOSCRIPT` again, a malformed reply) makes the items
unavailable, never admitted; the caller applies each quota's `when_unavailable`.

A command the caller stopped waiting for may still count its items: a quota then counts an
ALLOW that was not answered (fail closed). Redis's replication is asynchronous: a failover can
lose the latest counts (at most the writes of the last moments before it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from policy_engine.cache.breaker import BreakerState, CircuitBreaker
from policy_engine.cache.redis_backend import DeadlinePassed, RedisBackend, bounded
from policy_engine.config import CacheSettings, QuotaSettings
from policy_engine.lifecycle import ComponentStatus, State, event_loop
from policy_engine.metrics import REDIS_ERRORS
from policy_engine.quota.counting import distinct, unavailable_all
from policy_engine.quota.model import ADMITTED, UNAVAILABLE, Algorithm, Charge, Verdict

log = logging.getLogger(__name__)

# After the stop deadline: time for the connections to close.
_STOP_SLACK_SECONDS = 1.0
# How often the Redis's eviction settings are read again (`INFO memory`, one round trip): an
# operator's `CONFIG SET maxmemory-policy` is seen within this many seconds.
EVICTION_CHECK_SECONDS = 10.0

# ARGV[1], one comma-separated string (one argument, not hundreds: encoding each argument is
# most of a large batch's client-side cost): the item count, then per item its charge count,
# then per charge: the index of its key in KEYS (1-based), "f" or "s", the limit, the window in
# ms. The reply is one string too: "code,wait" per item, comma-separated. A fixed counter holds
# a decimal count of at most 15 digits (a Lua number holds it exactly); anything else at its
# key is garbage. The time: TIME's seconds and microseconds, so every replica agrees.
SCRIPT = """
local argv = {}
for token in string.gmatch(ARGV[1], '[^,]+') do
  argv[#argv + 1] = token
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Expire `key` at `at` (epoch ms) unless it already expires later: a counter written by a
-- clock ahead of this one (a stepped clock, a failover to a node whose clock is behind)
-- keeps its count until its own end. A key without expiry (a count whose expiry was never
-- set) gets one.
local function expire_no_sooner(key, at)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 or now + ttl < at then
    redis.call('PEXPIREAT', key, string.format('%d', at))
  end
end
local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
local out = {}
local pos = 2
for _ = 1, tonumber(argv[1]) do
  local count = tonumber(argv[pos])
  pos = pos + 1
  local first = pos
  local code, wait = 0, 0
  for j = 1, count do
    local key = KEYS[tonumber(argv[pos])]
    local limit = tonumber(argv[pos + 2])
    local window = tonumber(argv[pos + 3])
    if argv[pos + 1] == 's' then
      local oldest = string.format('%d', now - window)
      local trimmed = redis.pcall('ZREMRANGEBYSCORE', key, '-inf', oldest)
      if type(trimmed) == 'table' and trimmed.err then
        code = -1
      else
        local size = redis.call('ZCARD', key)
        if size >= limit then
          local entry = redis.call('ZRANGE', key, size - limit, size - limit, 'WITHSCORES')
          -- Whole ms within [1, window]: a score someone else wrote may be fractional,
          -- in the future, or inf.
          local frees = math.floor(tonumber(entry[2]) + window - now)
          code, wait = j, math.max(1, math.min(window, frees))
        end
      end
    else
      local value = redis.pcall('GET', key)
      if type(value) == 'table' then
        code = -1
      elseif value then
        if #value > 15 or not string.match(value, '^%d+$') then
          code = -1
        elseif tonumber(value) >= limit then
          -- Frees at its window's end, or at the counter's own when a clock ahead wrote it.
          local ttl = redis.call('PTTL', key)
          code, wait = j, math.max(now - now % window + window - now, ttl)
        end
      end
    end
    pos = pos + 4
    if code ~= 0 then
      break
    end
  end
  pos = first + 4 * count
  if code == 0 then
    for j = 0, count - 1 do
      local at = first + 4 * j
      local key = KEYS[tonumber(argv[at])]
      local window = tonumber(argv[at + 3])
      if argv[at + 1] == 's' then
        local size = redis.call('ZCARD', key)
        redis.call('ZADD', key, string.format('%d', now), stamp .. ':' .. size)
        expire_no_sooner(key, now + window)
      else
        redis.call('INCR', key)
        expire_no_sooner(key, now - now % window + window)
      end
    end
  end
  out[#out + 1] = code
  out[#out + 1] = wait
end
return table.concat(out, ',')
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # how Redis names a script (EVALSHA)

_UNAVAILABLE_CODE = -1
# What a charge may carry into a key: the organization inside the hash tag (no braces), a
# bucket without the key's separator (so keys cannot collide: see `counter_key`).
_BUCKET = re.compile(r"[0-9A-Za-z_-]{1,128}")
_FORBIDDEN_IN_ORGANIZATION = re.compile(r"[{}\s]")


def counter_key(prefix: str, charge: Charge) -> str | None:
    """The Redis key of `charge`'s counter, None when its parts could not make an
    unambiguous key (an organization with a brace or a space, an empty one, a bucket that is
    not 1-128 of [0-9A-Za-z_-]): such a charge is never counted, its item is unavailable.

    Unambiguous: the organization is delimited by the braces, the bucket is the last part and
    holds no ':', the window part is digits and f/s, so the name is what is left."""
    spec = charge.spec
    organization = spec.organization
    if not organization or _FORBIDDEN_IN_ORGANIZATION.search(organization):
        return None
    if not _BUCKET.fullmatch(charge.bucket) or not spec.name:
        return None
    kind = "f" if spec.algorithm is Algorithm.FIXED else "s"
    return f"{prefix}:{{{organization}}}:{spec.name}:{spec.window_ms}{kind}:{charge.bucket}"


@dataclasses.dataclass(slots=True)
class _Group:
    """The items one script counts: KEYS (distinct keys), ARGV[1]'s tokens after the item
    count, and the items' indices."""

    keys: list[str] = dataclasses.field(default_factory=list)
    tokens: list[str] = dataclasses.field(default_factory=list)
    items: list[int] = dataclasses.field(default_factory=list)
    charges: list[list[Charge]] = dataclasses.field(default_factory=list)
    _index: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, item: int, charges: list[Charge], keys: list[str]) -> None:
        tokens = self.tokens
        tokens.append(str(len(charges)))
        for charge, key in zip(charges, keys, strict=True):
            index = self._index.get(key)
            if index is None:
                self.keys.append(key)
                index = self._index[key] = len(self.keys)
            spec = charge.spec
            kind = "f" if spec.algorithm is Algorithm.FIXED else "s"
            tokens.append(f"{index},{kind},{spec.limit},{spec.window_ms}")
        self.items.append(item)
        self.charges.append(charges)

    def verdicts(self, reply: object) -> list[Verdict] | None:
        """The script's reply as one verdict per item, None when it is not a well-formed
        reply for these items (then they are all unavailable)."""
        if not isinstance(reply, bytes) or len(reply) > 64 * len(self.items):
            return None
        try:
            numbers = [int(token) for token in reply.split(b",")]
        except ValueError:
            return None
        if len(numbers) != 2 * len(self.items):
            return None
        found = []
        for position, charges in enumerate(self.charges):
            code, wait = numbers[2 * position], numbers[2 * position + 1]
            if code == 0:
                found.append(ADMITTED)
            elif code == _UNAVAILABLE_CODE:
                found.append(UNAVAILABLE)
            elif 0 < code <= len(charges):
                spec = charges[code - 1].spec
                # Within (0, window]: an entry a Redis writer dated in the future would
                # otherwise promise a wait past what the quota can hold.
                found.append(Verdict(False, spec, min(max(wait, 1), spec.window_ms)))
            else:
                return None
        return found


def _script_args(group: _Group) -> list[str | int]:
    """EVALSHA's arguments after the command name for `group` (see `SCRIPT`)."""
    argv = f"{len(group.items)}," + ",".join(group.tokens)
    return [SCRIPT_SHA, len(group.keys), *group.keys, argv]


class RedisQuotaStore:
    """A `QuotaStore` in Redis (see the module docstring) and the "quota" lifecycle component.

    The constructor checks the settings (ConfigError naming the setting) and connects
    nothing; the first call connects. Calls run on the process's event loop
    (`policy_engine.lifecycle.event_loop()`), where the client lives."""

    name = "quota"

    def __init__(
        self,
        quota: QuotaSettings,
        cache: CacheSettings,
        *,
        redis_backend: RedisBackend | None = None,
    ) -> None:
        if redis_backend is None:
            backend_settings = dataclasses.replace(
                cache,
                redis_url=quota.effective_redis_url(cache),
                redis_timeout_ms=quota.redis_timeout_ms,
            )
            redis_backend = RedisBackend(backend_settings, section="quota")
        self.redis = redis_backend
        self.prefix = quota.key_prefix
        self._reset_seconds = cache.breaker_reset_seconds
        self.breaker = CircuitBreaker(
            cache.breaker_failure_threshold, cache.breaker_reset_seconds, on_change=self._changed
        )
        self._errors = REDIS_ERRORS.labels("quota")
        self._process_loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopped = False
        self._stopped_clean = True
        self.round_trips = 0  # pipelines sent (a NOSCRIPT retry is a second), for tests
        # Why the counters may be evicted (None: they may not), read by `_check_eviction`
        # when `_eviction_due` (monotonic s) has come; one check in flight at a time.
        self.eviction: str | None = None
        self._eviction_due = 0.0
        self._eviction_check: asyncio.Future[None] | None = None
        self._info_refused_logged = False

    # --- counting ---------------------------------------------------------------------------

    async def consume(
        self, items: Sequence[Sequence[Charge]], deadline: float | None
    ) -> list[Verdict]:
        """See `QuotaStore.consume`. Raises RuntimeError off the process's event loop (a
        programming error); every store fault is an unavailable verdict."""
        if asyncio.get_running_loop() is not self._loop():
            raise RuntimeError(
                "the quota store's Redis client runs on the process's event loop "
                "(policy_engine.lifecycle.event_loop())"
            )
        verdicts: list[Verdict | None] = [None] * len(items)
        groups = self._groups(items, verdicts)
        if groups:
            if self._stopped or not self.breaker.allow():
                return unavailable_all(items)
            try:
                replies = await bounded("quota", self._run(groups), deadline, self._late)
            except DeadlinePassed:
                replies = []  # the script reports to the breaker when it ends
            except Exception as exc:
                self._failed(exc)
                replies = []
            self._fill(groups, replies, verdicts)
        return [UNAVAILABLE if verdict is None else verdict for verdict in verdicts]

    def _groups(
        self, items: Sequence[Sequence[Charge]], verdicts: list[Verdict | None]
    ) -> list[_Group]:
        """The call's items as scripts to run (one per organization in Cluster mode, one in
        all otherwise); items with nothing to count get their verdict here."""
        by_group: dict[str, _Group] = {}
        per_organization = self.redis.mode == "cluster"
        for index, item in enumerate(items):
            charges = distinct(item)
            if not charges:
                verdicts[index] = ADMITTED
                continue
            keys = [counter_key(self.prefix, charge) for charge in charges]
            counted = [key for key in keys if key is not None]
            organizations = {charge.spec.organization for charge in charges}
            if len(counted) != len(keys) or len(organizations) != 1:
                # One item is one organization's ALLOW; anything else cannot be counted
                # atomically (its keys are in different slots): a caller's bug, fail closed.
                log.error("quota charges that cannot be counted (item %d): %r", index, item)
                verdicts[index] = UNAVAILABLE
                continue
            slot = organizations.pop() if per_organization else ""
            group = by_group.get(slot)
            if group is None:
                group = by_group[slot] = _Group()
            group.add(index, charges, counted)
        return list(by_group.values())

    async def _run(self, groups: list[_Group]) -> list[object]:
        """One reply (or the error in its place) per group: one pipeline of EVALSHAs; the
        groups answered NOSCRIPT are run again once after SCRIPT LOAD. Raises on a fault
        of the whole pipeline (connection, timeout)."""
        from redis.exceptions import NoScriptError

        client = self.redis.client()
        if time.monotonic() >= self._eviction_due:
            check = self._eviction_check
            if check is None or check.done():
                check = self._eviction_check = asyncio.ensure_future(self._check_eviction(client))
            await asyncio.shield(check)
        if self.eviction is not None:
            return []  # nothing sent: every item unavailable, not a Redis fault
        replies = await self._pipeline(client, groups)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await client.script_load(SCRIPT)
            again = await self._pipeline(client, [groups[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _check_eviction(self, client: Any) -> None:
        """Read whether Redis may evict the counters (`INFO memory`: a `maxmemory` with any
        `maxmemory_policy` but `noeviction`; in Cluster mode on every node) into
        `self.eviction`, and when to read it again. An evicted counter starts again from zero
        mid-window: more ALLOWs than the quota, so such a Redis counts nothing (every quota
        applies its `when_unavailable`). An INFO that Redis refuses (a proxy, a renamed
        command) cannot tell: logged once, counted as before. Raises on a connection fault
        (then checked again at the next call)."""
        from redis.exceptions import ResponseError

        try:
            info = await client.info("memory")
        except ResponseError as exc:
            if not self._info_refused_logged:
                self._info_refused_logged = True
                log.warning(
                    "quota counters: redis refused INFO memory (%s): cannot check that it "
                    "never evicts counters (maxmemory-policy noeviction)",
                    str(exc)[:200],
                )
            found = None
        else:
            found = eviction_risk(info)
        if found != self.eviction:
            if found is not None:
                log.error(
                    "quota counters: redis may evict them (%s): quotas unavailable (each "
                    "applies its when_unavailable) until it is set to noeviction",
                    found,
                )
            else:
                log.warning("quota counters: redis no longer evicts them: counting again")
        self.eviction = found
        self._eviction_due = time.monotonic() + EVICTION_CHECK_SECONDS

    async def _pipeline(self, client: Any, groups: list[_Group]) -> list[object]:
        """One reply per group, a command error (NOSCRIPT, WRONGTYPE, ...) in its place;
        raises on a connection fault. One group (every call but a Cluster call spanning
        organizations) is one plain command: redis-py's pipeline costs the client about as
        much again as the command itself."""
        from redis.exceptions import ResponseError

        self.round_trips += 1
        # execute_command: redis-py's cluster pipeline blocks its `evalsha` method (for
        # scripts whose keys may span slots); ours are one organization's, one slot.
        if len(groups) == 1:
            group = groups[0]
            try:
                return [await client.execute_command("EVALSHA", *_script_args(group))]
            except ResponseError as exc:
                return [exc]
        pipe = client.pipeline(transaction=False)
        for group in groups:
            pipe.execute_command("EVALSHA", *_script_args(group))
        return list(await pipe.execute(raise_on_error=False))

    def _fill(
        self, groups: list[_Group], replies: list[object], verdicts: list[Verdict | None]
    ) -> None:
        """Each group's verdicts from its reply; a group whose reply is an error or
        malformed, or that has none (the whole call failed), stays unavailable (None)."""
        healthy = bool(replies)
        for group, reply in zip(groups, replies, strict=False):
            found = None if isinstance(reply, Exception) else group.verdicts(reply)
            if found is None:
                healthy = False
                log.warning("quota counters: redis answered %s", _describe(reply))
                continue
            for index, verdict in zip(group.items, found, strict=True):
                verdicts[index] = verdict
        if replies:
            if healthy:
                self.breaker.success()
            else:
                self._errors.inc()
                self.breaker.failure()

    # --- faults, loop -----------------------------------------------------------------------

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self._process_loop
        if loop is None:
            loop = self._process_loop = event_loop().loop
        return loop

    def _late(self, exc: Exception | None) -> None:
        """A script nobody waits for any more ended (see `redis_backend.bounded`)."""
        if exc is None:
            self.breaker.success()
        else:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self._errors.inc()
        log.debug("quota counters: redis failed: %s: %s", type(exc).__name__, exc)
        self.breaker.failure()

    def _changed(self, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            log.warning(
                "quota counters: redis circuit breaker open: quotas unavailable (each applies "
                "its when_unavailable), probing every %.1fs",
                self._reset_seconds,
            )
        elif state is BreakerState.CLOSED:
            log.warning("quota counters: redis circuit breaker closed: counting again")

    # --- the lifecycle component ------------------------------------------------------------

    def start(self) -> None:
        """Nothing to start: the first call connects. Raises nothing."""
        self._started = True

    def stop(self, deadline: float) -> bool:
        """Close the Redis connections by `deadline` (`time.monotonic()` s); calls after it
        are unavailable. Safe to call twice or unstarted; from any thread but the loop's."""
        if self._stopped:
            return self._stopped_clean
        self._stopped = True
        wait = max(0.0, deadline - time.monotonic()) + _STOP_SLACK_SECONDS
        try:
            event_loop().call(self.redis.aclose(), wait)
        except TimeoutError:
            log.error("quota counters: Redis connections still closing at the stop deadline")
            self._stopped_clean = False
        return self._stopped_clean

    def status(self) -> ComponentStatus:
        """Never blocks. Ready even while Redis is unreachable: each quota then applies its
        `when_unavailable` (deny by default), an answer every replica gives alike."""
        detail = f"redis {self.redis.mode}, keys {self.prefix}:*"
        if self._stopped:
            return ComponentStatus(self.name, State.STOPPED, True, detail)
        degraded = self.breaker.degraded(self.name, detail, "quotas unavailable")
        if degraded is not None:
            return degraded
        if self.eviction is not None:
            detail = f"{detail}; redis may evict counters ({self.eviction}): quotas unavailable"
            return ComponentStatus(self.name, State.DEGRADED, True, detail)
        return ComponentStatus(
            self.name, State.RUNNING if self._started else State.NEW, True, detail
        )


def eviction_risk(info: object) -> str | None:
    """From an `INFO memory` answer (a dict; in Cluster mode one per node, by node name),
    why Redis may evict counters ("maxmemory-policy allkeys-lru on 10.0.0.5:7000"), or
    None when no node may: `maxmemory` 0 (no limit) or `maxmemory_policy` noeviction. Every
    volatile-* policy counts too: each counter has an expiry. A node whose answer lacks the
    fields cannot tell and is not counted against."""
    if not isinstance(info, dict):
        return None
    nodes = {"": info} if "maxmemory_policy" in info else info
    for node, fields in nodes.items():
        if not isinstance(fields, dict):
            continue
        policy, limit = fields.get("maxmemory_policy"), fields.get("maxmemory")
        if policy is None or policy == "noeviction" or limit in (0, "0", None):
            continue
        where = f" on {node}" if node else ""
        return f"maxmemory-policy {policy}{where}"
    return None


def _describe(reply: object) -> str:
    """A reply for a log line: an error's type and text, else the value's type (a hostile
    Redis's reply is not quoted)."""
    if isinstance(reply, Exception):
        return f"{type(reply).__name__}: {str(reply)[:200]}"
    return f"a malformed reply ({type(reply).__name__})"
