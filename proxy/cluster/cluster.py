"""A replica's part in a cluster: its Redis connection (with the degraded mode), leases, shared
records and confirmations, and the client that streams blobs from peers; for the app's life.

Flows reach it through this one object, and only when ``cluster.redis`` is set: a proxy
without Redis has none and runs exactly as it does alone.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Final

import structlog

from proxy.cluster.holders import SharedHolders
from proxy.cluster.leases import Holder, Leases
from proxy.cluster.peers import Peers
from proxy.cluster.records import Records
from proxy.cluster.redisstate import RedisState
from proxy.core.clusterconfig import ClusterConfig

log = structlog.get_logger("ocicache.cluster")

# What a cluster reports to whoever counts (the app's metrics): an event name and an amount.
EVENTS: Final = (
    "lease_taken",
    "lease_lost",
    "lease_taken_over",
    "peer_fetched_blobs",
    "peer_fetched_bytes",
    "peer_served_blobs",
    "peer_served_bytes",
    "peer_bad_bytes",
    "peer_refused",
)


class Cluster:
    def __init__(self, cfg: ClusterConfig, me: str, *, connect_timeout: float, read_timeout: float) -> None:
        assert cfg.redis is not None
        self.cfg = cfg
        self.state = RedisState(cfg.redis, cfg.timeout)
        self.holder = Holder(secrets.token_hex(8), me)
        self.leases = Leases(self.state, self.holder, cfg.lease_ttl)
        self.records = Records(self.state, cfg.negative_ttl)
        self.holders = SharedHolders(self.state)
        self.peers = Peers(me, cfg.token, connect_timeout=connect_timeout, read_timeout=read_timeout)
        self.observers: list[Callable[[str, int], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def me(self) -> str:
        return self.holder.url

    def advertise(self, url: str) -> None:
        """The URL peers reach us at, once the listening port is known (``--listen :0``)."""
        self.holder = Holder(self.holder.instance, url)
        self.leases.me = self.holder
        self.peers.me = url

    @property
    def up(self) -> bool:
        return self.state.up

    @property
    def lease_ttl(self) -> float:
        return self.cfg.lease_ttl

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Background bookkeeping (a location dropped on eviction), owned until close."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.peers.close()
        await self.state.close()

    def note(self, event: str, amount: int = 1) -> None:
        for observe in self.observers:
            observe(event, amount)


@asynccontextmanager
async def joined(
    cfg: ClusterConfig, me: str, *, connect_timeout: float, read_timeout: float
) -> AsyncIterator[Cluster]:
    cluster = Cluster(cfg, me, connect_timeout=connect_timeout, read_timeout=read_timeout)
    await cluster.state.start()
    log.info("cluster_joined", advertise=me, redis_up=cluster.up, lease_ttl=cfg.lease_ttl)
    try:
        yield cluster
    finally:
        await cluster.close()
