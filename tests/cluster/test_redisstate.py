"""Redis slow, cut off mid-command, gone and back: callers get their fallback at once and the
replica runs on alone; it rejoins by itself."""

from __future__ import annotations

import asyncio

from proxy.cluster.redisstate import RedisState
from tests.support.redisserver import RedisServer
from tests.support.tcprelay import Relay


async def wait_up(state: RedisState, up: bool) -> None:
    changed = asyncio.Event()
    state.observers.append(lambda now: changed.set() if now == up else None)
    while state.up != up:
        await changed.wait()


async def test_a_slow_redis_is_a_fallback_within_the_timeout_and_the_replica_goes_on_alone(
    redis_server: RedisServer,
) -> None:
    async with Relay(redis_server.port) as relay:
        state = RedisState(relay.url, timeout=0.3, ping_interval=0.1)
        await state.start()
        try:
            assert await state.call(lambda r: r.set("k", b"v"), None) is True
            relay.set("stall")
            assert await state.call(lambda r: r.get("k"), b"fallback") == b"fallback"
            assert not state.up
            # Down: nothing is even sent, so no caller waits out a timeout.
            assert await state.call(lambda r: r.get("k"), b"fallback") == b"fallback"
            relay.set("pass")
            await wait_up(state, True)
            assert await state.call(lambda r: r.get("k"), None) == b"v"
        finally:
            await state.close()


async def test_redis_cut_off_mid_command_is_a_fallback(redis_server: RedisServer) -> None:
    async with Relay(redis_server.port) as relay:
        state = RedisState(relay.url, timeout=2.0, ping_interval=0.1)
        await state.start()
        try:
            relay.set("drop")
            assert await state.call(lambda r: r.set("k", b"v"), "fallback") == "fallback"
            assert not state.up
            relay.set("pass")
            await wait_up(state, True)
            assert await state.call(lambda r: r.set("k", b"v"), None) is True
        finally:
            await state.close()


async def test_redis_not_there_at_start_then_started(redis_server: RedisServer) -> None:
    redis_server.stop()
    state = RedisState(redis_server.url, timeout=0.3, ping_interval=0.1)
    await state.start()
    try:
        assert not state.up
        assert await state.call(lambda r: r.get("k"), "fallback") == "fallback"
        redis_server.start()
        await wait_up(state, True)
        redis_server.kill()
        assert await state.call(lambda r: r.get("k"), "fallback") == "fallback"
        assert not state.up
    finally:
        await state.close()
