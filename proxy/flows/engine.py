"""Everything the cache is, without the HTTP server: the cache directory (locked), its
catalogue and budget, the upstream clients, single-flight fills, manifests and the access rule.

``serve`` runs one around its app; the command-line tools that write a cache directory
(prefetch, import, rm) run one of their own, so that they fetch, verify and commit exactly as a
pull through the proxy would. One process at a time holds a cache directory
(:mod:`proxy.store.lock`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from proxy.cluster.cluster import Cluster, joined
from proxy.core.clusterconfig import advertised
from proxy.core.config import Settings
from proxy.flows.access import Access
from proxy.flows.fills import Fill, Fills, Plan
from proxy.flows.manifests import ManifestStore
from proxy.flows.referrers import Referrers
from proxy.flows.sharedtokens import SharedTokens
from proxy.flows.sourcing import Sourcing
from proxy.store.cache import BlobCache, Budget
from proxy.store.catalogue import Catalogue
from proxy.store.opened import opened
from proxy.store.pins import pinned_digests
from proxy.store.storage import Storage
from proxy.upstream.client import UpstreamClient
from proxy.upstream.sessions import upstream_clients


@dataclass
class Engine:
    settings: Settings
    storage: Storage
    catalogue: Catalogue
    cache: BlobCache
    access: Access
    fills: Fills
    manifests: ManifestStore
    referrers: Referrers
    upstreams: dict[str, UpstreamClient]
    # Replicas sharing state through Redis; None without cluster.redis.
    cluster: Cluster | None = None

    def pinned(self) -> frozenset[str]:
        names = [u.name for u in self.settings.upstreams]
        return pinned_digests(
            self.catalogue.pins,
            self.catalogue.tags,
            self.catalogue.manifests,
            names,
            self.catalogue.referrers_of,
        )


@asynccontextmanager
async def running(
    settings: Settings, *, on_fill_finish: Callable[[Fill], None] | None = None, serving: bool = False
) -> AsyncIterator[Engine]:
    """Lock the cache directory, open everything, and close it all again on exit. Only a
    ``serving`` engine joins a cluster: a command-line tool has no address for peers to
    stream from, so it fetches and commits as a lone replica would."""
    async with opened(settings.cache_dir) as (storage, catalogue):
        await catalogue.set_pins(settings.pins, "config")
        async with AsyncExitStack() as stack:
            cluster = None
            if settings.cluster.enabled and serving:
                me = advertised(
                    settings.cluster,
                    settings.listen_host,
                    settings.listen_port,
                    tls=settings.tls is not None,
                )
                cluster = await stack.enter_async_context(
                    joined(
                        settings.cluster,
                        me,
                        connect_timeout=settings.blob_connect_timeout,
                        read_timeout=settings.blob_read_timeout,
                    )
                )
                catalogue.drop_observers.append(_forget_location(cluster))
            engine = await stack.enter_async_context(
                _engine(settings, storage, catalogue, cluster, on_fill_finish)
            )
            yield engine


def _forget_location(cluster: Cluster) -> Callable[[str], None]:
    """A blob this replica no longer holds is no longer listed as here."""

    def forget(digest: str) -> None:
        cluster.spawn(cluster.records.remove_location(digest, cluster.me))

    return forget


@asynccontextmanager
async def _engine(
    settings: Settings,
    storage: Storage,
    catalogue: Catalogue,
    cluster: Cluster | None,
    on_fill_finish: Callable[[Fill], None] | None,
) -> AsyncIterator[Engine]:
    budget = Budget(
        settings.max_cache_bytes, settings.high_watermark, settings.low_watermark, settings.max_unused
    )
    holder: list[Engine] = []
    cache = BlobCache(storage, catalogue, budget, lambda: holder[0].pinned())
    access = Access(catalogue, cluster)

    async def on_commit(fill: Fill) -> None:
        # Bytes from upstream are upstream's word that the repository holds them; bytes from
        # a peer are that peer's, which is not a fresh answer to share.
        await access.remember(
            fill.upstream.name, fill.repository, fill.digest, share=bool(fill.from_upstream)
        )

    fills = Fills(
        storage,
        cache,
        plan=Plan(
            retries=settings.blob_retries,
            connections=settings.fill_connections,
            threshold=settings.parallel_fill_threshold,
            chunk=settings.fill_chunk,
            stall=settings.blob_read_timeout,
        ),
        cancel_abandoned=settings.cancel_abandoned_fills,
        on_commit=on_commit,
        on_finish=on_fill_finish,
        sourcing=None if cluster is None else Sourcing(cluster),
    )
    async with upstream_clients(settings, None if cluster is None else SharedTokens(cluster)) as upstreams:
        manifests = ManifestStore(storage, catalogue, cache, access, settings, cluster)
        engine = Engine(
            settings,
            storage,
            catalogue,
            cache,
            access,
            fills,
            manifests,
            Referrers(catalogue, manifests, settings),
            upstreams,
            cluster,
        )
        holder.append(engine)
        await cache.start()
        try:
            yield engine
        finally:
            await fills.close()
            await cache.close()
