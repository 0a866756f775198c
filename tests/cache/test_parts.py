"""The cache's parts on their own: the local LRU, the breaker, the entry codec, write-behind."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

from prometheus_client import REGISTRY

from policy_engine.cache.breaker import BreakerState, CircuitBreaker
from policy_engine.cache.entry import Codec, Entry
from policy_engine.cache.local import LocalLRU
from policy_engine.cache.signing import SigningKeys
from policy_engine.cache.writer import Write, WriteBehind
from tests.cache.support import KEY, NEW_KEY, OLD_KEY


def _entry(expires_at: float = 100.0, tag: bytes = b"t") -> Entry:
    return Entry(tag, expires_at, 1, "")


# --- local LRU -------------------------------------------------------------------------------


def test_lru_is_bounded_and_evicts_the_least_recently_used() -> None:
    lru = LocalLRU(3)
    for key in "abc":
        lru.put(key, _entry(tag=key.encode()))
    assert lru.get("a", 0) is not None  # a is now the most recently used
    lru.put("d", _entry())
    assert len(lru) == 3
    assert lru.get("b", 0) is None  # b was the least recently used
    assert all(lru.get(k, 0) is not None for k in "acd")


def test_lru_entries_expire() -> None:
    lru = LocalLRU(10)
    lru.put("k", _entry(expires_at=5.0))
    assert lru.get("k", 4.999) is not None
    assert lru.get("k", 5.0) is None
    assert len(lru) == 0  # dropped when met


def test_lru_get_many_and_put_many() -> None:
    lru = LocalLRU(2)
    lru.put_many([("a", _entry()), ("b", _entry(expires_at=1.0)), ("c", _entry())])
    assert len(lru) == 2
    found = lru.get_many(["a", None, "b", "c"], now=2.0)
    assert found[0] is None and found[1] is None  # a evicted; None keys give None
    assert found[2] is None  # b expired
    assert found[3] is not None


def test_lru_is_thread_safe() -> None:
    lru = LocalLRU(500)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(3000):
                key = f"k{(i * seed) % 1000}"
                lru.put(key, _entry())
                lru.get(key, 0)
                lru.get_many([key, f"k{i % 997}"], 0)
        except BaseException as exc:  # pragma: no cover - the failure we look for
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 3, 7, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(lru) <= 500


# --- breaker ---------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_then_probes_once() -> None:
    clock = FakeTime()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(3, 2.0, monotonic=clock, on_change=changes.append)
    breaker.failure()
    breaker.failure()
    breaker.success()  # not consecutive: the count starts again
    breaker.failure()
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_probe_reopens_and_a_lost_probe_is_replaced() -> None:
    clock = FakeTime()
    breaker = CircuitBreaker(1, 1.0, monotonic=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.failure()  # the probe failed
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()  # a probe that never reports back ...
    clock.now += 1.0
    assert breaker.allow()  # ... is replaced after reset_seconds
    assert breaker.opened_count == 2


def test_stragglers_do_not_close_an_open_breaker() -> None:
    clock = FakeTime()
    breaker = CircuitBreaker(1, 5.0, monotonic=clock)
    breaker.failure()
    breaker.success()  # a call that started before it opened
    assert breaker.state is BreakerState.OPEN


# --- entry codec -----------------------------------------------------------------------------


def test_entries_round_trip_through_the_redis_encoding() -> None:
    entry = Entry(b"\x08\x02\x12\x00template", 1_700_000_123.25, 2, "kontext_policy_denied")
    codec = Codec(SigningKeys.of(KEY))
    back = codec.decode("k", codec.encode("k", entry))
    assert back is not None
    assert (back.template, back.expires_at, back.effect, back.code) == (
        entry.template,
        entry.expires_at,
        entry.effect,
        entry.code,
    )


def test_values_this_codec_did_not_write_under_this_key_are_misses() -> None:
    codec = Codec(SigningKeys.of(KEY))
    value = codec.encode("k", _entry())
    assert codec.decode("k", value) is not None
    assert codec.decode("k", b"") is None
    assert codec.decode("k", b"garbage") is None
    assert codec.decode("k", b"\x09" + value[1:]) is None  # another format version
    assert codec.decode("other-key", value) is None  # an entry copied onto another key
    assert codec.decode("k\0", value) is None
    flipped = bytearray(value)
    flipped[13] ^= 1  # the effect byte: an attempt to turn a deny into an allow
    assert codec.decode("k", bytes(flipped)) is None
    later = bytearray(value)
    later[12] ^= 1  # the expiry's low byte: an attempt to make an entry live longer
    assert codec.decode("k", bytes(later)) is None
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    assert codec.decode("k", tampered) is None


def test_only_a_held_key_makes_a_value_that_verifies() -> None:
    signed = Codec(SigningKeys.of(KEY))
    value = signed.encode("k", _entry())
    assert Codec(SigningKeys.of(NEW_KEY)).decode("k", value) is None
    # The key id says which key signed; rewriting it to another held key's id does not help.
    other = Codec(SigningKeys.of(NEW_KEY, KEY))
    assert other.decode("k", value) is not None
    relabelled = value[:1] + other.encode("k", _entry())[1:5] + value[5:]
    assert other.decode("k", relabelled) is None
    # Long key texts are used whole (derived, not truncated): a shared prefix is not enough.
    long_a, long_b = "x" * 100 + "a", "x" * 100 + "b"
    assert (
        Codec(SigningKeys.of(long_b)).decode(
            "k", Codec(SigningKeys.of(long_a)).encode("k", _entry())
        )
        is None
    )


def test_during_a_rotation_old_and_new_signers_read_each_other() -> None:
    """Replica A still signs with the old key; B signs with the new one and still accepts the
    old; the third phase drops the old key everywhere."""
    old_only = Codec(SigningKeys.of(OLD_KEY))
    new_staged = Codec(SigningKeys.of(OLD_KEY, NEW_KEY))  # phase 1: new key verifies only
    new_signing = Codec(SigningKeys.of(NEW_KEY, OLD_KEY))  # phase 2: new key signs
    retired = Codec(SigningKeys.of(NEW_KEY))  # phase 3: old key gone
    from_old, from_new = old_only.encode("k", _entry()), new_signing.encode("k", _entry())
    assert new_signing.decode("k", from_old) is not None
    assert new_staged.decode("k", from_new) is not None
    assert retired.decode("k", from_new) is not None
    assert retired.decode("k", from_old) is None


# --- write-behind ----------------------------------------------------------------------------


def _writer_run(scenario: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    """Run an asyncio scenario on a fresh loop of this test's own."""

    async def main() -> None:
        await scenario(asyncio.get_running_loop())

    asyncio.run(main())


def test_write_behind_batches_and_flushes() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        seen: list[list[Write]] = []
        gate = asyncio.Event()

        async def sink(batch: list[Write]) -> None:
            await gate.wait()
            seen.append(batch)

        writer = WriteBehind(sink, max_pending=100)
        writer.start(loop)
        writer.submit([("a", b"1", 10)])
        while writer.pending != 1 or not writer._in_flight:  # the task waits in the sink
            await asyncio.sleep(0.001)
        writer.submit([("b", b"2", 10), ("c", b"3", 10)])
        writer.submit([("d", b"4", 10)])
        gate.set()
        assert await writer.flush(5)
        # The jobs queued while the sink was busy went out together, in order.
        assert [[k for k, _, _ in batch] for batch in seen] == [["a"], ["b", "c", "d"]]
        assert await writer.close(time.monotonic() + 5)

    _writer_run(scenario)


def test_write_behind_drops_rather_than_blocks_when_full() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        gate = asyncio.Event()

        async def sink(batch: list[Write]) -> None:
            await gate.wait()

        writer = WriteBehind(sink, max_pending=2)
        writer.start(loop)
        dropped_before = _dropped("queue_full")
        assert writer.submit([("a", b"", 1)])
        while not writer._in_flight:
            await asyncio.sleep(0.001)
        assert writer.submit([("b", b"", 1), ("c", b"", 1)])
        # Full: dropped at once, counted, and the caller never waits (no await here at all).
        assert not writer.submit([("d", b"", 1)])
        assert not writer.submit([("e", b"", 1), ("f", b"", 1)])
        assert writer.dropped == 3
        assert _dropped("queue_full") - dropped_before == 3
        gate.set()
        assert await writer.flush(5)
        assert writer.submit([("g", b"", 1)])  # room again once drained

    _writer_run(scenario)


def test_write_behind_close_writes_what_is_queued_or_counts_it_dropped() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        written: list[str] = []

        async def sink(batch: list[Write]) -> None:
            written.extend(key for key, _, _ in batch)

        writer = WriteBehind(sink)
        writer.submit([("early", b"", 1)])  # before start: waits in the queue
        writer.start(loop)
        writer.submit([("a", b"", 1)])
        assert await writer.close(time.monotonic() + 5)
        assert sorted(written) == ["a", "early"]
        assert not writer.submit([("late", b"", 1)])  # closed

        async def hung(batch: list[Write]) -> None:
            await asyncio.sleep(3600)  # Redis never answers

        stuck = WriteBehind(hung)
        stuck.start(loop)
        stuck.submit([("x", b"", 1), ("y", b"", 1)])
        shutdown_before = _dropped("shutdown")
        started = time.monotonic()
        assert not await stuck.close(time.monotonic() + 0.2)
        assert time.monotonic() - started < 5  # the deadline, not the hung write
        assert stuck.dropped == 2
        assert _dropped("shutdown") - shutdown_before == 2

    _writer_run(scenario)


def test_a_failing_sink_does_not_kill_the_writer() -> None:
    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        calls: list[int] = []

        async def sink(batch: list[Write]) -> None:
            calls.append(len(batch))
            raise RuntimeError("boom")

        writer = WriteBehind(sink)
        writer.start(loop)
        writer.submit([("a", b"", 1)])
        assert await writer.flush(5)
        writer.submit([("b", b"", 1)])
        assert await writer.flush(5)
        assert calls == [1, 1]
        assert await writer.close(time.monotonic() + 5)

    _writer_run(scenario)


def _dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("pdp_cache_writes_dropped_total", {"reason": reason}) or 0.0
