"""The bytes of a download that the disk could not take, kept in memory for its readers.

When the cache's file system is full (and evicting did not make room), a fill goes on without
caching: from the offset where writing failed, its bytes are appended here instead of to the
temp file, and its readers take them from here (the bytes before that offset are still in the
temp file). The window holds at most ``limit`` bytes. It forgets what every reader has taken;
when it is full, the download waits for the slowest reader, which is what a slow reader costs
on a full disk. A reader that takes nothing for ``stall`` seconds while the window is full is
cut off (its connection aborted), so that one stalled client cannot hold the others forever.

Touched only from the event loop thread.
"""

from __future__ import annotations

import asyncio
from typing import Final

DEFAULT_LIMIT: Final = 16 * 1024 * 1024


class Cut(Exception):
    """This reader fell too far behind the window, or the bytes it wants are gone."""


class Window:
    def __init__(self, start: int, *, limit: int = DEFAULT_LIMIT, stall: float = 60.0) -> None:
        self.origin = start  # where the file's bytes end and the window's begin
        self.start = start  # blob offset of data[0]
        self.data = bytearray()
        self.limit = limit
        self.stall = stall
        self._readers: dict[int, int] = {}  # reader -> next offset it needs
        self._cut: set[int] = set()
        self._progress = asyncio.Event()

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def join(self, reader: int, at: int) -> None:
        """A reader that will need bytes from ``at`` on (those before ``origin`` it reads from
        the file); Cut if the window has already let go of some it needs."""
        need = max(at, self.origin)
        if self.start > need:
            raise Cut("joined too late: part of this download is no longer held")
        self._readers[reader] = need

    def leave(self, reader: int) -> None:
        self._readers.pop(reader, None)
        self._cut.discard(reader)
        self._progress.set()

    def take(self, reader: int, pos: int, limit: int) -> bytes:
        """Bytes [pos, limit) for ``reader``, which has taken everything before ``pos``."""
        if reader in self._cut:
            raise Cut("this reader fell behind a download the disk could not take")
        if pos < self.start:
            raise Cut("the bytes this reader needs are no longer held")
        self._readers[reader] = limit
        self._progress.set()
        return bytes(self.data[pos - self.start : limit - self.start])

    async def append(self, chunk: bytes) -> None:
        """Add the download's next bytes, waiting while the window is full."""
        self._trim()
        while self.data and len(self.data) + len(chunk) > self.limit:
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), self.stall)
            except TimeoutError:
                self._cut_slowest()
            self._trim()
        self.data += chunk

    def _trim(self) -> None:
        active = [at for r, at in self._readers.items() if r not in self._cut]
        keep_from = min(active, default=self.end)
        if keep_from > self.start:
            drop = min(keep_from, self.end) - self.start
            del self.data[:drop]
            self.start += drop

    def _cut_slowest(self) -> None:
        active = {r: at for r, at in self._readers.items() if r not in self._cut}
        if active:
            slowest = min(active.values())
            self._cut |= {r for r, at in active.items() if at == slowest}
