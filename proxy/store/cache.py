"""The disk budget over the catalogue's files: eviction, pins, and the open descriptors.

Eviction starts when the cache holds more than the high watermark of its budget and removes
least recently used files until it is under the low one, so that it runs in batches, not per
blob. It never removes a file that a response or a fill is using (pinned for the duration), nor
anything a pinned image needs. ``max_unused`` additionally removes files nobody asked for in
that long. The budget never exceeds what the file system can hold: at start-up a budget larger
than the cache's share of the disk is lowered to it, with a warning.

A file is served only at the size it was verified at: a descriptor whose size disagrees with
the catalogue (truncated behind our back) is refused and the blob dropped, so it is fetched
again instead of being served short.

Touched only from the event loop thread. Disk work (unlink, stat) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import structlog

from proxy.core.reference import Digest
from proxy.store.catalogue import BLOB, BlobEntry, Catalogue
from proxy.store.openfiles import OpenFiles
from proxy.store.storage import Storage

log = structlog.get_logger("ocicache.cache")

# Of the file system's room for the cache, what the budget may use: the rest is for the
# catalogue, downloads in flight and whatever else shares the disk.
DISK_SHARE: Final = 0.95
UNUSED_SWEEP_MAX: Final = 60.0


@dataclass(frozen=True, slots=True)
class Budget:
    max_bytes: int
    high: float = 1.0  # start evicting above max_bytes * high
    low: float = 0.9  # ... and stop below max_bytes * low
    max_unused: float | None = None  # seconds since last use after which a file goes


def choose_victims(
    lru: Iterable[tuple[str, int]], pinned: set[str] | frozenset[str], total: int, target: int
) -> list[str]:
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


def unused_since(
    lru: Iterable[tuple[str, float]], pinned: set[str] | frozenset[str], cutoff: float
) -> list[str]:
    """Digests last used before ``cutoff``, pinned ones excepted. (All are looked at: the LRU
    order follows last use only roughly, as commits finish in their own order.)"""
    return [key for key, last_used in lru if last_used < cutoff and key not in pinned]


class BlobCache:
    def __init__(
        self,
        storage: Storage,
        catalogue: Catalogue,
        budget: Budget,
        pinned_images: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.storage = storage
        self.catalogue = catalogue
        self.budget = budget
        self.max_bytes = budget.max_bytes
        self.pinned_images = pinned_images
        self._pins: Counter[str] = Counter()
        self._evicting: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._checking: asyncio.Task[None] | None = None
        self.open_files = OpenFiles()
        catalogue.drop_observers.append(self.open_files.drop)
        self.evicted = 0
        self.evicted_bytes = 0
        self.purged = 0
        self.purged_bytes = 0

    async def start(self) -> None:
        """Fit the budget to the disk, evict what is over it, and sweep unused files."""
        free = await asyncio.to_thread(lambda: shutil.disk_usage(self.storage.root).free)
        room = int((self.catalogue.total + free) * DISK_SHARE)
        if self.budget.max_bytes > room:
            log.warning(
                "budget_exceeds_disk",
                budget=self.budget.max_bytes,
                disk_room=room,
                cached=self.catalogue.total,
                free=free,
            )
            self.max_bytes = room
        self._checking = asyncio.get_running_loop().create_task(self._check_sizes(), name="size check")
        self._maybe_evict()
        if self.budget.max_unused is not None:
            every = min(self.budget.max_unused / 10, UNUSED_SWEEP_MAX)
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(max(every, 0.01)))

    async def _check_sizes(self) -> None:
        """Right after start-up: every file at the size it was verified at, or it goes (it is
        fetched again when next asked for). Opening checks the same, so a request that comes
        first is safe too."""
        expected = {d: e.size for d, e in self.catalogue.blobs.items()}
        sizes = await asyncio.to_thread(self.storage.sizes, list(expected))
        suspects = [d for d in expected if sizes.get(d) != expected[d]]
        # The pass takes seconds over a big cache, and a blob can be removed and fetched again
        # meanwhile: judge each suspect on its file and row as they are now, not at the scan.
        now = await asyncio.to_thread(lambda: {d: self._size_now(d) for d in suspects})
        wrong: list[str] = []
        missing: list[str] = []
        for digest in suspects:
            entry = self.catalogue.entry(digest)
            size = now[digest]
            if entry is None or size == entry.size:
                continue
            if size is None:
                missing.append(digest)
                self.catalogue.drop(digest)
            else:
                wrong.append(digest)
                log.warning("blob_size_mismatch", digest=digest, verified=entry.size, on_disk=size)
                await self.remove(Digest.parse(digest))
        log.info("cache_sizes_checked", blobs=len(expected), wrong=len(wrong), missing=len(missing))

    def _size_now(self, digest: str) -> int | None:
        found = self.storage.stat(digest)
        return None if found is None else found.size

    async def checked(self) -> None:
        """Wait for the start-up size check (tests)."""
        if self._checking is not None:
            await self._checking

    # --- what is held -------------------------------------------------------------------------

    def __contains__(self, digest: Digest) -> bool:
        """Held as a blob (a manifest's bytes are not served as a blob unless upstream did)."""
        return self.catalogue.has(str(digest), BLOB)

    def __len__(self) -> int:
        return len(self.catalogue.blobs)

    @property
    def total(self) -> int:
        return self.catalogue.total

    def size_of(self, digest: Digest) -> int | None:
        entry = self.catalogue.entry(str(digest))
        return None if entry is None else entry.size

    def touch(self, digest: Digest) -> None:
        self.catalogue.touch(str(digest))

    def forget(self, digest: Digest) -> None:
        """Drop an entry whose file turned out to be gone (removed by hand, or disk trouble)."""
        self.catalogue.drop(str(digest))

    async def open(self, digest: Digest) -> tuple[int, int]:
        """A shared read descriptor of a cached file and its size; give it back with
        :meth:`release`. Raises FileNotFoundError (and forgets the blob) if the file is gone
        or no longer has the size it was verified at."""
        key = str(digest)
        entry = self.catalogue.entry(key)
        if entry is None:
            raise FileNotFoundError(key)
        try:
            fd, size = await self.open_files.acquire(key, self.storage.blob_path(digest))
        except FileNotFoundError:
            self.forget(digest)
            raise
        if size != entry.size:
            self.open_files.release(key, fd)
            log.warning("blob_size_mismatch", digest=key, verified=entry.size, on_disk=size)
            await self.remove(digest)
            raise FileNotFoundError(key)
        self.touch(digest)
        return fd, size

    def release(self, digest: Digest, fd: int) -> None:
        self.open_files.release(str(digest), fd)

    @contextmanager
    def pinned(self, digest: Digest) -> Iterator[None]:
        """Keep ``digest`` from eviction while a response or fill uses it."""
        key = str(digest)
        self._pins[key] += 1
        try:
            yield
        finally:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    # --- changes ------------------------------------------------------------------------------

    async def add(self, digest: Digest, size: int, kind: int = BLOB) -> None:
        """A file committed under ``blobs/``."""
        await self.catalogue.add_blob(str(digest), size, kind)
        self._maybe_evict()

    def note_added(self) -> None:
        """Something was indexed by another route (a manifest): check the budget."""
        self._maybe_evict()

    async def remove(self, digest: Digest, *, purge: bool = False) -> BlobEntry | None:
        """Remove a file and its facts: the file first, so that a crash between leaves a row
        without a file, which start-up drops. Counted as evicted, or as ``purge``d (asked for
        by an operator)."""
        key = str(digest)
        if key not in self.catalogue.blobs:
            return None
        await asyncio.to_thread(self.storage.remove, digest)
        entry = self.catalogue.drop(key)
        if entry is not None:
            if purge:
                self.purged += 1
                self.purged_bytes += entry.size
            else:
                self.evicted += 1
                self.evicted_bytes += entry.size
        return entry

    def _maybe_evict(self) -> None:
        if self.catalogue.total > self.max_bytes * self.budget.high and (
            self._evicting is None or self._evicting.done()
        ):
            self._evicting = asyncio.get_running_loop().create_task(self._evict())

    def protected(self) -> set[str]:
        return set(self._pins) | self.pinned_images()

    async def _evict(self) -> None:
        target = int(self.max_bytes * self.budget.low)
        removed = 0
        # Files added while we remove others may push the total over again: go round until
        # under the high mark, or until everything left is protected.
        while self.catalogue.total > self.max_bytes * self.budget.high:
            protected = self.protected()
            lru = ((d, e.size) for d, e in self.catalogue.lru())
            victims = choose_victims(lru, protected, self.catalogue.total, target)
            if not victims:
                log.warning("cache_over_budget_all_pinned", bytes=self.catalogue.total, budget=self.max_bytes)
                break
            for key in victims:
                if key in self._pins:  # pinned since the choice was made
                    continue
                if await self.remove(Digest.parse(key)) is not None:
                    removed += 1
        if removed:
            log.info("cache_evicted", blobs=removed, bytes_now=self.catalogue.total, budget=self.max_bytes)

    async def evict_for(self, needed: int) -> int:
        """Free at least ``needed`` bytes now (a full disk hit a download), least recently
        used first; returns the bytes freed."""
        protected = self.protected()
        lru = ((d, e.size) for d, e in self.catalogue.lru())
        victims = choose_victims(lru, protected, self.catalogue.total, max(0, self.catalogue.total - needed))
        freed = 0
        for key in victims:
            entry = await self.remove(Digest.parse(key))
            if entry is not None:
                freed += entry.size
        log.info("cache_evicted_for_space", blobs=len(victims), freed=freed, needed=needed)
        return freed

    async def sweep_unused(self) -> int:
        assert self.budget.max_unused is not None
        cutoff = time.time() - self.budget.max_unused
        lru = ((d, e.last_used) for d, e in self.catalogue.lru())
        victims = unused_since(lru, self.protected(), cutoff)
        for key in victims:
            await self.remove(Digest.parse(key))
        if victims:
            log.info("cache_unused_removed", blobs=len(victims), max_unused=self.budget.max_unused)
        return len(victims)

    async def _sweep_loop(self, every: float) -> None:
        while True:
            await self.sweep_unused()
            await asyncio.sleep(every)

    async def settled(self) -> None:
        """Wait for an eviction under way."""
        if self._evicting is not None:
            await self._evicting

    async def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
            await asyncio.gather(self._checking, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.settled()
        self.open_files.close()
