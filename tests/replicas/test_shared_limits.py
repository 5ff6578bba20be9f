"""Rate limits shared through a real Redis: several limiters (one per replica) on one server admit a
tenant's limit in total, reserve tokens and settle them, and say what happens while Redis is away."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.metrics import Metrics
from gateway.ratelimit import Limited, Reservation
from gateway.shared_limits import SharedLimiter
from gateway.tenants import Tenant


def tenant(name: str = "acme", rpm: int | None = None, tpm: int | None = None) -> Tenant:
    return Tenant(name, "", frozenset({"*"}), rpm, tpm)


def replicas(url: str, n: int = 3, window_s: float = 60.0, **kw: object) -> list[SharedLimiter]:
    return [SharedLimiter(url, window_s, Metrics(), **kw) for _ in range(n)]  # type: ignore[arg-type]


async def _close(limiters: list[SharedLimiter]) -> None:
    for limiter in limiters:
        await limiter.close()


def test_three_replicas_admit_exactly_the_rpm_between_them(redis_server):
    async def main() -> list[Reservation | Limited]:
        limiters = replicas(redis_server.url)
        t = tenant(rpm=9)
        try:
            return await asyncio.gather(*(limiters[i % 3].admit(t) for i in range(27)))
        finally:
            await _close(limiters)

    results = asyncio.run(main())
    admitted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, Limited)]
    assert len(admitted) == 9 and len(refused) == 18
    assert all(r.kind == "requests" and r.retry_after >= 1 and not r.unavailable for r in refused)
    assert sorted(r.headroom[0].remaining for r in admitted) == list(range(9))  # each saw the others' charges


def test_tokens_are_reserved_at_admission_and_settled_to_the_real_count_on_any_replica(redis_server):
    async def main() -> None:
        a, b = replicas(redis_server.url, 2)
        t = tenant(tpm=200)
        try:
            first = await a.admit(t, 150)
            assert isinstance(first, Reservation) and first.headroom[0].remaining == 50
            refused = await b.admit(t, 100)  # 150 reserved leaves 50
            assert isinstance(refused, Limited) and refused.kind == "tokens" and refused.headroom[0].remaining == 50
            first.settle(40)  # the answer was shorter than its bound
            await asyncio.sleep(0.2)  # settling is sent without waiting
            second = await b.admit(t, 100)
            assert isinstance(second, Reservation) and second.headroom[0].remaining == 200 - 40 - 100
            huge = await a.admit(t, 201)
            assert isinstance(huge, Limited) and huge.too_large and huge.requested == 201
        finally:
            await _close([a, b])

    asyncio.run(main())


def test_the_window_slides_on_redis_time(redis_server):
    async def main() -> None:
        (a,) = replicas(redis_server.url, 1, window_s=1.0)
        t = tenant(rpm=2)
        try:
            assert [isinstance(await a.admit(t), Reservation) for _ in range(2)] == [True, True]
            refused = await a.admit(t)
            assert isinstance(refused, Limited) and refused.retry_after == 1
            await asyncio.sleep(1.2)
            assert isinstance(await a.admit(t), Reservation)
        finally:
            await a.close()

    asyncio.run(main())


def test_tenants_do_not_share_a_log(redis_server):
    async def main() -> None:
        (a,) = replicas(redis_server.url, 1)
        try:
            assert isinstance(await a.admit(tenant("one", rpm=1)), Reservation)
            assert isinstance(await a.admit(tenant("two", rpm=1)), Reservation)
            assert isinstance(await a.admit(tenant("one", rpm=1)), Limited)
            assert isinstance(await a.admit(tenant("free")), Reservation)  # no limits: no round trip needed
        finally:
            await a.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["closed", "share"])
def test_while_redis_is_down_the_documented_fallback_applies_then_redis_again(redis_server, mode):
    async def main() -> None:
        (a,) = replicas(redis_server.url, 1, down=mode, replicas=3, timeout_s=0.3)
        metrics = a._metrics
        t = tenant(rpm=9)
        try:
            assert isinstance(await a.admit(t), Reservation) and metrics.shared_limits_up._value.get() == 1
            redis_server.stop()
            results = [await a.admit(t) for _ in range(5)]
            assert not await a.healthy() if mode == "closed" else await a.healthy()
            assert metrics.shared_limits_up._value.get() == 0
            assert metrics.limit_fallbacks.labels(mode)._value.get() >= 5
            if mode == "closed":  # refused with a 503, never served unlimited
                assert all(isinstance(r, Limited) and r.unavailable for r in results)
            else:  # each of 3 replicas admits a third of the limit on its own
                assert [isinstance(r, Reservation) for r in results] == [True] * 3 + [False] * 2
            redis_server.start()
            await asyncio.sleep(1.1)  # Redis is tried again after a second
            assert await a.healthy() and metrics.shared_limits_up._value.get() == 1
            back = await a.admit(t)
            assert isinstance(back, Reservation) and back.headroom[0].remaining == 9 - 1  # a fresh server's log
        finally:
            await a.close()

    asyncio.run(main())


def test_one_round_trip_per_admission_is_cheap_enough_to_measure_not_to_assert(redis_server):
    """Not a timing bound (the machine is shared): the benchmark measures latency. This checks that
    many sequential admissions on one connection all succeed and are counted exactly."""
    async def main() -> int:
        (a,) = replicas(redis_server.url, 1)
        t = tenant(rpm=1000)
        try:
            started = time.perf_counter()
            results = [await a.admit(t) for _ in range(1000)]
            print(f"1000 admissions: {(time.perf_counter() - started) * 1000:.0f} ms")
            return sum(isinstance(r, Reservation) for r in results)
        finally:
            await a.close()

    assert asyncio.run(main()) == 1000


def test_stream_slots_are_counted_across_replicas_renewed_while_open_and_freed_when_a_replica_dies(redis_server):
    async def main() -> None:
        a, b, c = replicas(redis_server.url, 3, slot_ttl_s=0.9)
        try:
            held = [await r.acquire("acme", 4) for r in (a, b, c, a)]
            assert all(callable(h) for h in held)
            assert await b.acquire("acme", 4) is None and await c.acquire("acme", 4) is None  # 4 open in all
            assert callable(await b.acquire("globex", 4))  # another tenant's cap is its own
            held[0]()
            held[0]()  # release is idempotent: it frees one slot, once
            await asyncio.sleep(0.1)
            again = await c.acquire("acme", 4)
            assert callable(again) and await b.acquire("acme", 4) is None
            await asyncio.sleep(2.0)  # longer than the ttl: open slots are renewed, not lost
            assert await b.acquire("acme", 4) is None
            await a.close()  # replica a dies holding one slot: it expires, nobody releases it
            await asyncio.sleep(1.3)
            assert [callable(await b.acquire("acme", 4)) for _ in range(2)] == [True, False]
        finally:
            await _close([b, c])

    asyncio.run(main())
