"""Everything the cache is, without the HTTP server: the cache directory (locked), its
catalogue and budget, the upstream clients, single-flight fills, manifests and the access rule.

``serve`` runs one around its app; the command-line tools that write a cache directory
(prefetch, import, rm) run one of their own, so that they fetch, verify and commit exactly as a
pull through the proxy would. One process at a time holds a cache directory
(:mod:`proxy.store.lock`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from proxy.core.config import Settings
from proxy.flows.access import Access
from proxy.flows.fills import Fill, Fills, Plan
from proxy.flows.manifests import ManifestStore
from proxy.flows.referrers import Referrers
from proxy.store.cache import BlobCache, Budget
from proxy.store.catalogue import Catalogue
from proxy.store.lock import CacheLock
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
    settings: Settings, *, on_fill_finish: Callable[[Fill], None] | None = None
) -> AsyncIterator[Engine]:
    """Lock the cache directory, open everything, and close it all again on exit."""
    lock = CacheLock(settings.cache_dir)
    await asyncio.to_thread(lock.acquire)
    try:
        storage = Storage(settings.cache_dir)
        await asyncio.to_thread(storage.prepare)
        catalogue = Catalogue(storage)
        await catalogue.open()
        try:
            await catalogue.set_pins(settings.pins, "config")
            budget = Budget(
                settings.max_cache_bytes, settings.high_watermark, settings.low_watermark, settings.max_unused
            )
            holder: list[Engine] = []
            cache = BlobCache(storage, catalogue, budget, lambda: holder[0].pinned())
            access = Access(catalogue)

            async def on_commit(fill: Fill) -> None:
                await access.remember(fill.upstream.name, fill.repository, fill.digest)

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
            )
            async with upstream_clients(settings) as upstreams:
                manifests = ManifestStore(storage, catalogue, cache, access, settings)
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
                )
                holder.append(engine)
                await cache.start()
                try:
                    yield engine
                finally:
                    await fills.close()
                    await cache.close()
        finally:
            await catalogue.close()
    finally:
        lock.release()
