"""The LRU index over :mod:`storage`: what is cached, how big, how recently used, what is pinned.

Touched only from the event loop thread. Disk work (scan, unlink) runs in worker threads.
Eviction starts when the total passes ``max_bytes`` and removes least recently used blobs
until the total is under the low watermark, skipping pinned blobs (a response or a fill is
using them): a shared base layer that many pulls are reading is never pulled from under them.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Final

import structlog

from proxy.core.reference import Digest
from proxy.store.openfiles import OpenFiles
from proxy.store.storage import Storage

log = structlog.get_logger("ocicache.cache")

# Evict down to this fraction of the budget, so that eviction runs in batches, not per blob.
LOW_WATERMARK: Final = 0.9


def choose_victims(lru: Iterable[tuple[str, int]], pinned: set[str], total: int, target: int) -> list[str]:
    """Oldest-first digests to remove so that ``total`` falls to ``target``; pinned ones stay."""
    victims: list[str] = []
    for key, size in lru:
        if total <= target:
            break
        if key in pinned:
            continue
        victims.append(key)
        total -= size
    return victims


class BlobCache:
    def __init__(self, storage: Storage, max_bytes: int) -> None:
        self.storage = storage
        self.max_bytes = max_bytes
        self._lru: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._pins: Counter[str] = Counter()
        self.total = 0
        self._evicting: asyncio.Task[None] | None = None
        self.open_files = OpenFiles()

    async def load(self) -> None:
        """Index what is on disk, oldest modification first (hits refresh the mtime)."""
        found = await asyncio.to_thread(lambda: sorted(self.storage.scan(), key=lambda b: b.mtime))
        for blob in found:
            self._lru[str(blob.digest)] = blob.size
            self.total += blob.size
        log.info("cache_loaded", blobs=len(self._lru), bytes=self.total, root=str(self.storage.root))

    def __contains__(self, digest: Digest) -> bool:
        return str(digest) in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def size_of(self, digest: Digest) -> int | None:
        return self._lru.get(str(digest))

    def touch(self, digest: Digest) -> None:
        key = str(digest)
        if key in self._lru:
            self._lru.move_to_end(key)

    def forget(self, digest: Digest) -> None:
        """Drop an entry whose file turned out to be gone (removed by hand, or disk trouble)."""
        size = self._lru.pop(str(digest), None)
        if size is not None:
            self.total -= size
        self.open_files.drop(str(digest))

    async def open(self, digest: Digest) -> tuple[int, int]:
        """A shared read descriptor of a cached blob and its size; give it back with
        :meth:`release`. Raises FileNotFoundError (and forgets the blob) if the file is gone."""
        try:
            fd, size = await self.open_files.acquire(str(digest), self.storage.blob_path(digest))
        except FileNotFoundError:
            self.forget(digest)
            raise
        self.touch(digest)
        return fd, size

    def release(self, digest: Digest, fd: int) -> None:
        self.open_files.release(str(digest), fd)

    @contextmanager
    def pinned(self, digest: Digest) -> Iterator[None]:
        key = str(digest)
        self._pins[key] += 1
        try:
            yield
        finally:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def add(self, digest: Digest, size: int) -> None:
        key = str(digest)
        if key not in self._lru:
            self.total += size
        self._lru[key] = size
        self._lru.move_to_end(key)
        if self.total > self.max_bytes and (self._evicting is None or self._evicting.done()):
            self._evicting = asyncio.get_running_loop().create_task(self._evict())

    async def _evict(self) -> None:
        target = int(self.max_bytes * LOW_WATERMARK)
        removed = 0
        # Blobs added while we remove others may push the total over again: go round until
        # under budget, or until everything left is pinned.
        while self.total > self.max_bytes:
            victims = choose_victims(self._lru.items(), set(self._pins), self.total, target)
            if not victims:
                break
            for key in victims:
                if key in self._pins:  # pinned since the choice was made
                    continue
                size = self._lru.pop(key, None)
                if size is None:
                    continue
                self.total -= size
                removed += 1
                self.open_files.drop(key)
                await asyncio.to_thread(self.storage.remove, Digest.parse(key))
        if removed:
            log.info("cache_evicted", blobs=removed, bytes_now=self.total, budget=self.max_bytes)

    async def settled(self) -> None:
        """Wait for an eviction under way."""
        if self._evicting is not None:
            await self._evicting

    async def close(self) -> None:
        await self.settled()
        self.open_files.close()
