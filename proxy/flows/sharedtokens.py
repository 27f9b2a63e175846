"""Upstream tokens shared by the replicas of a cluster (the upstream client's TokenShare), kept in
Redis until they expire: a token one replica fetched spares the others the token service."""

from __future__ import annotations

from proxy.cluster.cluster import Cluster


class SharedTokens:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def get(self, upstream: str, who: str, scope: str) -> tuple[str, float] | None:
        return await self.cluster.records.token(upstream, who, scope)

    async def put(self, upstream: str, who: str, scope: str, value: str, seconds: float) -> None:
        await self.cluster.records.put_token(upstream, who, scope, value, seconds)
