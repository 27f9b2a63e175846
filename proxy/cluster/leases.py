"""Single-flight across replicas: a lease in Redis per blob being fetched from upstream.

Taking one is an atomic ``SET key value NX PX ttl``; the value names the holder (a per-process
id, so that a restarted replica does not take its previous life's lease for its own, and the
URL peers stream from). The holder renews it every third of its life and gives it up when the
fill ends, both compare-and-act in Lua, so that a holder whose lease expired and was taken by
another replica can neither extend nor delete the new holder's lease: its renewal answers
"lost", and the holder stops fetching. A holder that finds its expired lease free again takes
it back in the same script (Redis restarted empty, or it was down past the lease's life).

aiocache's RedLock is documented as not being a lock for exclusion, so it is not used here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

import structlog
from redis.asyncio import Redis

from proxy.cluster.keys import lease_key
from proxy.cluster.redisstate import RedisState

log = structlog.get_logger("ocicache.cluster")

# 1: renewed; 2: it had expired and nobody held it, so it is ours again; 0: another holds it.
RENEW: Final = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Holder:
    instance: str
    url: str

    def encode(self) -> bytes:
        return f"{self.instance} {self.url}".encode()

    @staticmethod
    def decode(raw: object) -> Holder | None:
        if not isinstance(raw, bytes):
            return None
        instance, _, url = raw.decode(errors="replace").partition(" ")
        if not instance or not url.startswith(("http://", "https://")):
            return None
        return Holder(instance, url)


class Renewal(Enum):
    RENEWED = 1
    RETAKEN = 2
    LOST = 0
    UNKNOWN = -1  # Redis did not answer: nobody can take it from us meanwhile but by expiry


class Leases:
    def __init__(self, state: RedisState, me: Holder, ttl: float) -> None:
        self.state = state
        self.me = me
        self.ttl = ttl
        self._renew = state.client.register_script(RENEW)
        self._release = state.client.register_script(RELEASE)

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    async def take(self, digest: str) -> bool | None:
        """True: ours now. False: another replica holds it. None: Redis is not there."""
        key, value = lease_key(digest), self.me.encode()

        async def command(r: Redis) -> bool:
            return bool(await r.set(key, value, nx=True, px=self.ttl_ms))

        return await self.state.call(command, None)

    async def holder(self, digest: str) -> Holder | None:
        raw = await self.state.call(lambda r: r.get(lease_key(digest)), None)
        return Holder.decode(raw)

    async def renew(self, digest: str) -> Renewal:
        answer = await self.state.call(
            lambda r: self._renew(keys=[lease_key(digest)], args=[self.me.encode(), self.ttl_ms]), None
        )
        if answer is None:
            return Renewal.UNKNOWN
        return Renewal(int(answer))

    async def release(self, digest: str) -> None:
        await self.state.call(
            lambda r: self._release(keys=[lease_key(digest)], args=[self.me.encode()]), None
        )


class Lease:
    """One lease we hold, renewed in the background until :meth:`end`. ``on_lost`` is called
    once if another replica turns out to hold it (ours expired while we still filled)."""

    def __init__(self, leases: Leases, digest: str, on_lost: Callable[[], None]) -> None:
        self.leases = leases
        self.digest = digest
        self.on_lost = on_lost
        self.lost = False
        self._task = asyncio.get_running_loop().create_task(self._keep(), name=f"lease {digest}")

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.leases.ttl / 3)
            result = await self.leases.renew(self.digest)
            if result is Renewal.LOST:
                self.lost = True
                log.warning("lease_lost", digest=self.digest)
                self.on_lost()
                return
            if result is Renewal.RETAKEN:
                log.info("lease_retaken", digest=self.digest)

    async def end(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if not self.lost:
            await self.leases.release(self.digest)
