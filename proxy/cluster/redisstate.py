"""The replica's connection to Redis, and what it does when Redis is not there.

Every command is bounded (``cluster.timeout``). One that fails or runs out of time marks Redis
down: from then on commands are not even sent (each would cost a client its timeout), every
caller gets its fallback (no lease, no shared record), and the replica runs as the independent
cache it is without a cluster. A watcher pings Redis meanwhile and marks it up again when it
answers, so the replicas rejoin by themselves. Going down and coming back are logged once each.

The redis package's exceptions are translated here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = structlog.get_logger("ocicache.cluster")

T = TypeVar("T")
F = TypeVar("F")

# While Redis is down it is pinged this often (at most; the timeout is part of each try).
PING_INTERVAL: Final = 1.0
_FAILURES: Final = (RedisError, OSError, TimeoutError)


class RedisState:
    def __init__(self, url: str, timeout: float, *, ping_interval: float = PING_INTERVAL) -> None:
        self.timeout = timeout
        self.ping_interval = ping_interval
        # Our own timeout bounds each command; the client must not retry inside it.
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=256,
        )
        self.up = False
        # Called with True/False at each change: the metric, and tests that wait for it.
        self.observers: list[Callable[[bool], None]] = []
        self._changed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect if Redis answers now; the watcher keeps trying if it does not."""
        await self._ping()
        if not self.up:
            log.warning("cluster_redis_down", reason="not reachable at start", mode="independent cache")
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="redis watcher")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(*_FAILURES):
            await self.client.aclose()

    async def call(self, command: Callable[[aioredis.Redis], Awaitable[T]], fallback: F) -> T | F:
        """``command``'s answer, or ``fallback`` when Redis is down, slow or fails."""
        if not self.up:
            return fallback
        try:
            async with asyncio.timeout(self.timeout):
                return await command(self.client)
        except _FAILURES as exc:
            self._set(False, f"{type(exc).__name__}: {exc}"[:200])
            return fallback

    def kick(self) -> None:
        """Something suggests Redis is back (a peer said so): ping now rather than later."""
        self._changed.set()

    async def _ping(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.ping()
        except _FAILURES as exc:
            if self.up:
                self._set(False, f"{type(exc).__name__}: {exc}"[:200])
            return
        if not self.up:
            self._set(True, None)

    async def _watch(self) -> None:
        while True:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ping_interval):
                    await self._changed.wait()
            if not self.up:
                await self._ping()

    def _set(self, up: bool, reason: str | None) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            log.info("cluster_redis_up", mode="cluster")
        else:
            log.warning("cluster_redis_down", reason=reason, mode="independent cache")
        for observe in self.observers:
            observe(up)
