"""A cache directory opened for writing: its lock taken, its layout prepared, its catalogue
reconciled and loaded; all undone, in the reverse order, on the way out. What ``serve``'s
engine and every command that writes the cache start from."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from proxy.store.catalogue import Catalogue
from proxy.store.lock import CacheLock
from proxy.store.storage import Storage


@asynccontextmanager
async def opened(cache_dir: Path) -> AsyncIterator[tuple[Storage, Catalogue]]:
    """Raises :class:`proxy.store.lock.CacheBusy` when another process holds the directory."""
    lock = CacheLock(cache_dir)
    await asyncio.to_thread(lock.acquire)
    try:
        storage = Storage(cache_dir)
        await asyncio.to_thread(storage.prepare)
        catalogue = Catalogue(storage)
        await catalogue.open()
        try:
            yield storage, catalogue
        finally:
            await catalogue.close()
    finally:
        lock.release()
