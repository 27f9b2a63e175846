"""A RedisState on the test's redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.cluster.redisstate import RedisState
from tests.support.redisserver import RedisServer


@pytest.fixture
async def state(redis_server: RedisServer) -> AsyncIterator[RedisState]:
    state = RedisState(redis_server.url, timeout=2.0, ping_interval=0.1)
    await state.start()
    assert state.up
    yield state
    await state.close()
