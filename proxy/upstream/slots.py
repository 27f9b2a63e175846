"""How many blob downloads one upstream may have open at once, and the queue for the rest.

aiohttp's connection pool makes a request wait for a free connection inside its *connect*
timeout, so the 65th of 80 concurrent cold blobs behind a slow but healthy upstream failed as
"upstream unreachable" after the timeout, and manifests queued behind blobs in the same pool.
Blob downloads therefore wait here, in their turn and for as long as it takes (each download
that holds a slot is bounded by its own read-stall timeout), on a pool of their own; manifests,
tokens and access checks use another pool and never wait behind a blob.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Slots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self.waiting = 0
        self.busy = 0
        # Called after every change of ``waiting`` or ``busy``: metrics, and tests that must
        # know a download is queued without sleeping.
        self.observers: list[Callable[[Slots], None]] = []

    async def acquire(self) -> None:
        self.waiting += 1
        self._notify()
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1
        self._notify()

    def release(self) -> None:
        self.busy -= 1
        self._sem.release()
        self._notify()

    def _notify(self) -> None:
        for observe in self.observers:
            observe(self)
