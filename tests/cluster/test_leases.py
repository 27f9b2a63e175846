"""Leases: one holder at a time, renewed and released only by their holder, and a holder whose
lease another replica took is told so."""

from __future__ import annotations

import asyncio

from proxy.cluster.keys import lease_key
from proxy.cluster.leases import Holder, Lease, Leases, Renewal
from proxy.cluster.redisstate import RedisState

DIGEST = "sha256:" + "ab" * 32


def two(state: RedisState, ttl: float = 5.0) -> tuple[Leases, Leases]:
    a = Leases(state, Holder("aaaa", "http://127.0.0.1:1001"), ttl)
    b = Leases(state, Holder("bbbb", "http://127.0.0.1:1002"), ttl)
    return a, b


async def test_one_holder_at_a_time_and_it_is_named(state: RedisState) -> None:
    a, b = two(state)
    assert await a.take(DIGEST) is True
    assert await b.take(DIGEST) is False
    assert await b.holder(DIGEST) == a.me
    await b.release(DIGEST)  # not b's to give up
    assert await b.holder(DIGEST) == a.me
    await a.release(DIGEST)
    assert await b.holder(DIGEST) is None
    assert await b.take(DIGEST) is True


async def test_renewal_by_the_holder_and_a_lost_lease_is_reported(state: RedisState) -> None:
    a, b = two(state)
    assert await a.take(DIGEST)
    assert await a.renew(DIGEST) is Renewal.RENEWED
    assert await b.renew(DIGEST) is Renewal.LOST
    await state.client.delete(lease_key(DIGEST))  # expired, nobody took it
    assert await a.renew(DIGEST) is Renewal.RETAKEN
    assert await b.holder(DIGEST) == a.me
    # It expires and b takes it: a's renewal may neither extend nor delete b's lease.
    await state.client.delete(lease_key(DIGEST))
    assert await b.take(DIGEST)
    assert await a.renew(DIGEST) is Renewal.LOST
    await a.release(DIGEST)
    assert await a.holder(DIGEST) == b.me


async def test_a_running_lease_notices_it_was_taken_over(state: RedisState) -> None:
    a, b = two(state, ttl=0.3)
    assert await a.take(DIGEST)
    lost = asyncio.Event()
    lease = Lease(a, DIGEST, lost.set)
    await state.client.set(lease_key(DIGEST), b.me.encode(), px=5000)
    await lost.wait()
    assert lease.lost
    await lease.end()
    assert await a.holder(DIGEST) == b.me  # ending a lost lease leaves the new holder's alone


async def test_redis_down_is_no_lease_at_all(state: RedisState) -> None:
    a, _ = two(state)
    state.up = False
    assert await a.take(DIGEST) is None
    assert await a.renew(DIGEST) is Renewal.UNKNOWN
    assert Holder.decode(b"garbage") is None
    assert Holder.decode(b"id ftp://x") is None
