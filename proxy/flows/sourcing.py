"""Where a fill's bytes come from when replicas share a Redis: a peer that holds the blob, else
upstream under a lease this replica takes, else the peer that holds the lease.

Only the lease holder talks to upstream for a blob. A follower streams from a peer with an
ordinary OCI blob GET and verifies the digest itself; when that peer fails (it died, it says
it has nothing, it is unreachable) the follower chooses again at the offset it has: the lease
has expired and it takes it (and resumes from upstream with ``Range``), or another replica
took it and it follows that one. A holder whose lease turns out to be held by another (it
expired while we still filled) stops fetching at once (its upstream streams are closed) and
follows the new holder: never two fillers for long. Redis down: every fill goes to upstream
as a lone replica's would.

A peer that sent bytes which did not match the digest is not asked for that blob again for a
while, even as the lease holder (then this replica fetches it from upstream itself).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

import structlog
from cachetools import TTLCache

from proxy.cluster.cluster import Cluster
from proxy.cluster.holders import now_ms
from proxy.cluster.leases import Lease
from proxy.cluster.peers import PeerMiss, PeerSource
from proxy.core.errors import Code, OciError
from proxy.flows.fill import Fill
from proxy.upstream.client import retryable
from proxy.upstream.source import BlobSource

log = structlog.get_logger("ocicache.cluster")

# How long a peer that sent bad bytes for a digest is not asked for it again.
DISTRUST_SECONDS: Final = 600.0


class Sourcing:
    """The app's choice of sources for its fills (one per app, in a cluster)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._distrusted: TTLCache[tuple[str, str], bool] = TTLCache(maxsize=4096, ttl=DISTRUST_SECONDS)

    def for_fill(self, fill: Fill) -> FillSource:
        return FillSource(self, fill)

    def distrust(self, digest: str, peer: str) -> None:
        self._distrusted[(digest, peer)] = True

    def distrusted(self, digest: str, peer: str) -> bool:
        return (digest, peer) in self._distrusted


class FillSource:
    """The current source of one fill, and its lease while it has one."""

    def __init__(self, sourcing: Sourcing, fill: Fill) -> None:
        self.sourcing = sourcing
        self.cluster = sourcing.cluster
        self.fill = fill
        self.digest = str(fill.digest)
        self.lease: Lease | None = None
        self.started_ms = now_ms()
        self.generation = 0
        self.peers_used: set[str] = set()
        self._source: BlobSource | None = None
        self._followed = False  # has this fill streamed from a peer (so taking the lease is a takeover)
        self._stuck_since: float | None = None
        # Called when the source changes under a running download (lease lost): close streams.
        self.interrupt: Callable[[], None] | None = None

    @property
    def poll(self) -> float:
        return min(max(self.cluster.lease_ttl / 5, 0.05), 1.0)

    def is_peer(self, source: BlobSource) -> bool:
        return isinstance(source, PeerSource)

    @property
    def from_upstream(self) -> bool:
        return self._source is not None and not self.is_peer(self._source)

    async def current(self) -> BlobSource:
        if self._source is None:
            self._source = await self._choose()
            self.fill.from_upstream = not self.is_peer(self._source)
            self.fill.sourced.set()
        return self._source

    def progress(self) -> None:
        self._stuck_since = None

    async def failed(self, source: BlobSource, err: OciError) -> bool:
        """A stream from ``source`` failed with ``err``: True if the fill should choose again
        (a peer that failed), False if it is upstream's failure to retry as usual."""
        if not isinstance(source, PeerSource):
            return False
        if not (retryable(err) or isinstance(err, PeerMiss)):
            return False  # upstream's answer, relayed by the peer (404, 401, 429): final
        log.info("peer_failed", digest=self.digest, peer=source.url, reason=err.message, at=self.fill.written)
        if isinstance(err, PeerMiss):
            # What it does not have, it must not be listed as holding.
            await self.cluster.records.remove_location(self.digest, source.url)
        if self._source is source:
            self._source = None
            self.generation += 1
        if self._stuck_since is None:
            self._stuck_since = time.monotonic()
        return True

    def _lost(self) -> None:
        if self.fill.verified:
            return
        self.cluster.note("lease_lost")
        self.lease = None
        self._source = None
        self.generation += 1
        self._followed = True
        if self.interrupt is not None:
            self.interrupt()

    async def _choose(self) -> BlobSource:
        cluster, digest = self.cluster, self.digest
        upstream = self.fill.upstream
        while True:
            if self._stuck_since is not None:
                # Waiting for a peer that fails (dead, but its lease not yet expired). Bounded:
                # past a few lease lives it is no cluster to wait for.
                await asyncio.sleep(self.poll)
                if time.monotonic() - self._stuck_since > 3 * cluster.lease_ttl:
                    log.warning("lease_wait_gave_up", digest=digest, fetching="from upstream, unleased")
                    return upstream
            peer = await self._holding_peer()
            if peer is not None:
                return self._follow(peer)
            if await cluster.records.absent(upstream.name, self.fill.repository, digest):
                # Another replica was just told upstream has no such blob there.
                raise OciError(Code.BLOB_UNKNOWN, "not found upstream", {"digest": digest, "recently": True})
            taken = await cluster.leases.take(digest)
            if taken is None:
                return upstream  # Redis is down: a lone replica
            if taken:
                peer = await self._holding_peer()
                if peer is not None:  # committed between our look and our take
                    await cluster.leases.release(digest)
                    return self._follow(peer)
                return self._lead()
            holder = await cluster.leases.holder(digest)
            if holder is None:
                if self._stuck_since is None:
                    self._stuck_since = time.monotonic()  # it came and went: look again
                continue
            if holder.instance == cluster.holder.instance:
                # Ours already (a fill of ours that ended without giving it up): keep it.
                return self._lead()
            if holder.url == cluster.me:
                # Another process advertises our own address (our previous life, or two
                # replicas given one --advertise): we cannot stream from ourselves. Wait for
                # it to expire, or give up waiting.
                log.warning("lease_holder_is_me", digest=digest, advertise=cluster.me)
                if self._stuck_since is None:
                    self._stuck_since = time.monotonic()
                continue
            if self.sourcing.distrusted(digest, holder.url):
                log.warning("lease_holder_distrusted", digest=digest, peer=holder.url)
                return upstream
            return self._follow(holder.url)

    async def _holding_peer(self) -> str | None:
        for url in await self.cluster.records.locations(self.digest):
            if url != self.cluster.me and not self.sourcing.distrusted(self.digest, url):
                return url
        return None

    def _follow(self, url: str) -> BlobSource:
        self._followed = True
        self.peers_used.add(url)
        return self.cluster.peers.source(url, self.fill.upstream.name)

    def _lead(self) -> BlobSource:
        self.cluster.note("lease_taken_over" if self._followed else "lease_taken")
        self._stuck_since = None
        self.lease = Lease(self.cluster.leases, self.digest, self._lost)
        return self.fill.upstream

    async def distrust_peers(self) -> None:
        """The bytes did not match the digest and some came from peers: ask them no more."""
        for url in sorted(self.peers_used):
            log.error("peer_sent_bad_bytes", digest=self.digest, peer=url)
            self.sourcing.distrust(self.digest, url)
            await self.cluster.records.remove_location(self.digest, url)
        self.cluster.note("peer_bad_bytes")

    async def end(self, committed: bool) -> None:
        """The fill is over: if it committed, list us as holding it before giving up the lease
        (a replica that finds the lease free then finds us instead)."""
        if committed:
            await self.cluster.records.add_location(self.digest, self.cluster.me)
            if self.fill.peer_received:
                self.cluster.note("peer_fetched_blobs")
                self.cluster.note("peer_fetched_bytes", self.fill.peer_received)
        elif (
            self.fill.error is not None
            and self.fill.error.code is Code.BLOB_UNKNOWN
            and self.from_upstream
            and not isinstance(self.fill.error, PeerMiss)
        ):
            upstream, repository = self.fill.upstream.name, self.fill.repository
            await self.cluster.records.put_absent(upstream, repository, self.digest)
            await self.cluster.holders.drop(upstream, repository, self.digest, self.started_ms)
        if self.lease is not None:
            await self.lease.end()
            self.lease = None
