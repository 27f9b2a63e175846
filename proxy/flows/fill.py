"""One blob being downloaded, as its readers see it.

Readers tail the temp file up to what the download has announced: a whole-body reader follows
the contiguous prefix, a range reader whatever run of bytes is present from its offset (with
parallel parts, a part further on may be there long before the prefix). Announcing never
blocks, so a slow reader cannot stall the download or the other readers, and nothing is queued
per reader in memory.

The digest is known only after the last byte, so no reader is given the blob's final byte
before the download has verified it (:meth:`Fill.readable_from`). On failure every reader
raises :class:`FillFailed` and aborts its connection: no client sees a clean end of a wrong or
short body.
"""

from __future__ import annotations

import asyncio
import os
from enum import Enum
from pathlib import Path
from typing import Final

from proxy.core.errors import OciError
from proxy.core.reference import Digest
from proxy.flows.coverage import Coverage
from proxy.flows.window import Cut, Window
from proxy.upstream.client import UpstreamClient

# Clients named in the warning when a fill that served unverified ranges fails.
UNVERIFIED_NAMED: Final = 32
# Lazy reads of one download may cost upstream at most this share of the blob again.
RELAY_SHARE: Final = 1 / 8


class FillFailed(Exception):
    """The fill a reader was tailing did not produce a verified blob."""


class State(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Fill:
    def __init__(self, digest: Digest, upstream: UpstreamClient, repository: str, temp: Path) -> None:
        self.digest = digest
        self.upstream = upstream
        self.repository = repository
        self.temp = temp
        self.size: int | None = None
        # What is in the file: set once upstream named the size (None before, or if it never
        # did; then ``streamed`` counts the bytes of the one stream).
        self.coverage: Coverage | None = None
        self.streamed = 0
        self.received = 0  # bytes from upstream, retries included
        self.relayed = 0  # bytes lazy reads asked upstream for on their own (see take_relay)
        self.state = State.STARTING
        # Every byte is here and hashed to the digest: readers may have the final byte, even
        # while the file is still being fsynced and renamed into the cache.
        self.verified = False
        # Renamed into the cache and indexed.
        self.committed = False
        self.error: OciError | None = None
        self.read_fd = -1
        self.upstream_gets = 0
        # Clients sent a range of this download before its digest was checked (bounded list).
        self.unverified_readers: list[str] = []
        self.unverified_count = 0
        # The disk was full: bytes from window.origin on are in memory, not in the file.
        self.window: Window | None = None
        self.evicted_for_space = False
        # Reader -> the next offset it needs (for the window, if there is one).
        self.readers: dict[int, int] = {}
        self._users = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] | None = None
        # Whether the bytes come from upstream (True) or a peer replica (False); None until the
        # fill has chosen (:mod:`proxy.flows.sourcing`), which sets ``sourced``.
        self.from_upstream: bool | None = None
        self.sourced = asyncio.Event()
        self.peer_gets = 0
        self.peer_received = 0

    @property
    def written(self) -> int:
        """The contiguous prefix that is in place."""
        return self.coverage.prefix() if self.coverage is not None else self.streamed

    # --- the reader's side -----------------------------------------------------------------

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> int:
        """Leave; returns how many readers remain. Closes the read fd once nobody needs it."""
        self._users -= 1
        self._maybe_close_reader()
        return self._users

    def attach(self, reader: int, at: int) -> None:
        """A reader that will send bytes from ``at``; raises Cut when it comes too late to a
        download the disk could not take (the bytes it needs are no longer held)."""
        self.readers[reader] = at
        if self.window is not None:
            try:
                self.window.join(reader, at)
            except Cut:
                del self.readers[reader]
                raise

    def detach(self, reader: int) -> None:
        self.readers.pop(reader, None)
        if self.window is not None:
            self.window.leave(reader)

    def note_unverified_reader(self, client: str) -> None:
        self.unverified_count += 1
        if len(self.unverified_readers) < UNVERIFIED_NAMED:
            self.unverified_readers.append(client)

    def readable_from(self, pos: int) -> int:
        """How far a reader at ``pos`` may send: to the end of the bytes present from there,
        all of it once verified, else never the final byte."""
        if self.coverage is None:
            # No size: any byte may be the last one.
            return self.streamed if self.verified else max(pos, self.streamed - 1)
        end = self.coverage.filled_until(pos)
        if self.verified or end < self.coverage.size:
            return end
        return max(pos, self.coverage.size - 1)

    def take_relay(self, length: int) -> bool:
        """May a lazy read of ``length`` bytes have a ranged upstream request of its own? Yes
        while this download's lazy reads together stay within ``RELAY_SHARE`` of the blob (each
        is a second copy of its bytes from upstream); counted when yes."""
        if self.size is None or self.relayed + length > self.size * RELAY_SHARE:
            return False
        self.relayed += length
        return True

    def untake_relay(self, length: int) -> None:
        """A lazy read :meth:`take_relay` allowed that upstream would not give as a range:
        no second copy came, so the share is left to the next one."""
        self.relayed -= length

    def far_from(self, pos: int, gap: int) -> bool:
        """Are the bytes at ``pos`` more than ``gap`` away from arriving (a lazy puller's range
        deep into a blob that has just started)?"""
        if self.verified or self.coverage is None:
            return False
        return self.coverage.far_from(pos, gap)

    async def sourced_from_upstream(self, timeout: float) -> bool:
        """Is this fill fetching from upstream (not from a peer)? Waits for it to choose."""
        if not self.sourced.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self.sourced.wait()
            except TimeoutError:
                return False
        return bool(self.from_upstream) and self.state is not State.FAILED

    async def started(self) -> int | None:
        """Wait until the upstream answered; returns the blob's size if upstream told it."""
        while self.state is State.STARTING:
            await self._wait()
        if self.state is State.FAILED and not self.verified:
            # Nothing sent to this reader yet: it can still get an honest error response.
            assert self.error is not None
            raise self.error
        return self.size

    async def finished(self) -> int:
        """Wait for the verified whole; returns its size. Raises the fill's error."""
        while not self.verified:
            if self.state is State.FAILED:
                assert self.error is not None
                raise self.error
            await self._wait()
        return self.written

    async def wait_beyond(self, pos: int) -> int:
        """Wait until bytes past ``pos`` may be sent; returns how far. Raises FillFailed."""
        while True:
            limit = self.readable_from(pos)
            # Verified bytes stay good to send even if storing them fails afterwards.
            if limit > pos and (self.verified or self.state is not State.FAILED):
                return limit
            if self.state is State.FAILED:
                raise FillFailed(str(self.error))
            await self._wait()

    async def wait_beyond_prefix(self, pos: int) -> None:
        """Wait until the contiguous prefix passes ``pos`` (the download's own hashing)."""
        while self.written <= pos:
            await self._wait()

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def announce(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def maybe_close_reader(self) -> None:
        self._maybe_close_reader()

    def _maybe_close_reader(self) -> None:
        if self._users <= 0 and self.state in (State.DONE, State.FAILED) and self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    @property
    def users(self) -> int:
        return self._users
