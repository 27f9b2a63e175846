"""Single-flight blob downloads: one upstream GET per digest, however many clients wait for it.

A :class:`Fill` downloads one blob into a temp file, hashing as it writes, and commits it into
storage only when the digest matches. Readers join it and tail the temp file up to the last
announced offset (``written``): announcing never blocks, so a slow reader cannot stall the
download or the other readers, and nothing is queued per reader in memory.

The digest is known only after the last byte, so a reader is never given the final byte of the
blob before the fill has verified it (:meth:`Fill.readable`). On failure every reader raises
:class:`FillFailed` and aborts its connection: no client sees a clean end of a wrong or short body.

Fills are tasks owned by :class:`Fills` (the application), not by the request that started them:
a client that leaves does not cancel the download that others, or the cache, still want.

Lock order: there are no locks. Everything below runs on the loop thread except the file writes
and hash updates in ``_write``, which the fill task awaits one at a time.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import Final

import structlog

from proxy.core.errors import Code, OciError
from proxy.core.reference import Digest
from proxy.flows.window import Cut, Window
from proxy.store.cache import BlobCache
from proxy.store.storage import Storage
from proxy.upstream.client import UpstreamClient, retryable
from proxy.upstream.failures import BLOB

log = structlog.get_logger("ocicache.fills")

# Largest piece written (and hashed) per worker-thread hop.
WRITE_BATCH: Final = 4 * 1024 * 1024
# Clients named in the warning when a fill that served unverified ranges fails.
UNVERIFIED_NAMED: Final = 32
# Room freed beyond the rest of a blob when the disk is full, for the catalogue and neighbours.
EVICT_MARGIN: Final = 256 * 1024
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


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
        self.written = 0
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

    def readable(self) -> int:
        """How far a reader may send: all of it once verified, else all but the final byte."""
        if self.verified:
            return self.written
        if self.size is not None and self.written >= self.size:
            return self.size - 1
        return self.written if self.size is not None else max(0, self.written - 1)

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
            limit = self.readable()
            # Verified bytes stay good to send even if storing them fails afterwards.
            if limit > pos and (self.verified or self.state is not State.FAILED):
                return limit
            if self.state is State.FAILED:
                raise FillFailed(str(self.error))
            await self._wait()

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _announce(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _maybe_close_reader(self) -> None:
        if self._users <= 0 and self.state in (State.DONE, State.FAILED) and self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    @property
    def users(self) -> int:
        return self._users


class Fills:
    """The app's table of running fills, keyed by digest, and the tasks that run them."""

    def __init__(
        self,
        storage: Storage,
        cache: BlobCache,
        *,
        retries: int,
        cancel_abandoned: bool,
        stall: float = 60.0,
        on_commit: Callable[[Fill], Awaitable[None]] | None = None,
        on_finish: Callable[[Fill], None] | None = None,
    ) -> None:
        self.storage = storage
        self.cache = cache
        self.retries = retries
        self.cancel_abandoned = cancel_abandoned
        self.stall = stall  # how long a full window waits for its slowest reader
        self.on_commit = on_commit
        self.on_finish = on_finish
        self._fills: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Called with every fill a reader joins (after it counted the reader): for observers
        # such as tests that must know when N clients share one download.
        self.join_observers: list[Callable[[Fill], None]] = []

    def get(self, digest: Digest) -> Fill | None:
        return self._fills.get(digest)

    def __len__(self) -> int:
        return len(self._fills)

    def running(self) -> list[Fill]:
        """The downloads under way now (for people: the status page, the admin API)."""
        return list(self._fills.values())

    def join(self, digest: Digest, upstream: UpstreamClient, repository: str) -> tuple[Fill, bool]:
        """The running fill for ``digest``, started if there is none; and whether we started it.
        The caller has acquired it and must call :meth:`leave`."""
        fill = self._fills.get(digest)
        started = fill is None
        if fill is None:
            fill = Fill(digest, upstream, repository, self.storage.new_temp())
            self._fills[digest] = fill
            task = asyncio.get_running_loop().create_task(self._run(fill), name=f"fill {digest}")
            fill.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        fill.acquire()
        for observe in self.join_observers:
            observe(fill)
        return fill, started

    def leave(self, fill: Fill) -> None:
        remaining = fill.release()
        # A verified fill has only its commit left (fsync, rename, index): cancelling it then
        # would throw away a good download, or leave a renamed file the index never heard of.
        if (
            remaining == 0
            and self.cancel_abandoned
            and fill.state in (State.STARTING, State.RUNNING)
            and not fill.verified
            and fill.task is not None
        ):
            log.info("fill_abandoned", digest=str(fill.digest), written=fill.written)
            fill.task.cancel()

    async def settled(self) -> None:
        """Wait until every fill running now has committed or failed."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Stop downloads under way; a verified one only has its commit left, so let it finish."""
        for fill in list(self._fills.values()):
            if fill.task is not None and not fill.verified:
                fill.task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- the fill task ---------------------------------------------------------------------

    async def _run(self, fill: Fill) -> None:
        write_fd = -1
        try:
            try:
                write_fd, fill.read_fd = await asyncio.to_thread(_open_pair, fill.temp)
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                self._uncached(fill, 0)  # not even an empty file fits
            hasher = hashlib.new(fill.digest.algorithm)
            await self._download(fill, write_fd, hasher)
            if fill.size is not None and fill.written != fill.size:
                raise OciError(Code.UPSTREAM_ERROR, "upstream sent a short blob")
            if hasher.hexdigest() != fill.digest.hex:
                log.error(
                    "digest_mismatch",
                    digest=str(fill.digest),
                    upstream=fill.upstream.name,
                    repository=fill.repository,
                    got=f"{fill.digest.algorithm}:{hasher.hexdigest()}",
                )
                raise fill.upstream.bad_answer(BLOB, "upstream blob does not match its digest")
            fill.size = fill.written
            fill.verified = True
            fill._announce()
            if fill.window is not None:
                # Served whole to every reader; nothing of it is cached.
                fill.state = State.DONE
                log.warning("fill_uncached", digest=str(fill.digest), bytes=fill.written, reason="disk full")
                return
            # From here on the download is good: the commit runs to its end even if this task is
            # cancelled (a shutdown), so that no renamed file is left out of the index.
            commit = asyncio.ensure_future(self._commit(fill, write_fd))
            try:
                await asyncio.shield(commit)
            except asyncio.CancelledError:
                await asyncio.wait([commit])
                raise
            if self.on_commit is not None:
                await self.on_commit(fill)
            fill.state = State.DONE
            log.info("fill_committed", digest=str(fill.digest), bytes=fill.written, gets=fill.upstream_gets)
        except asyncio.CancelledError:
            fill.error = OciError(Code.UNAVAILABLE, "download cancelled")
            raise
        except OciError as err:
            fill.error = err
            log.warning(
                "fill_failed",
                digest=str(fill.digest),
                code=err.code.value,
                reason=err.message,
                written=fill.written,
            )
        except OSError as exc:
            fill.error = OciError(Code.UNAVAILABLE, "cache disk error")
            log.error("fill_disk_error", digest=str(fill.digest), error=str(exc))
        finally:
            if fill.state is not State.DONE:
                fill.state = State.FAILED
                if fill.error is None:
                    fill.error = OciError(Code.UNAVAILABLE, "download failed")
                if fill.unverified_count:
                    log.warning(
                        "unverified_ranges_of_failed_fill",
                        digest=str(fill.digest),
                        clients=fill.unverified_readers,
                        count=fill.unverified_count,
                        reason=fill.error.message,
                    )
            del self._fills[fill.digest]
            if write_fd >= 0:
                os.close(write_fd)
            if not fill.committed:
                # Readers hold the read fd, not the path: unlinking now loses nothing of theirs.
                fill.temp.unlink(missing_ok=True)
            fill._maybe_close_reader()
            fill._announce()
            if self.on_finish is not None:
                self.on_finish(fill)

    async def _store(self, fill: Fill, write_fd: int, hasher: hashlib._Hash, chunk: bytes) -> None:
        """Hash the next ``chunk`` and put it where readers find it: the temp file, or, once
        the disk is full, the fill's window. A full disk first makes room by evicting least
        recently used files, once per fill; then the fill goes on without caching."""
        offset = fill.written
        if fill.window is not None:
            await asyncio.to_thread(hasher.update, chunk)
            await fill.window.append(chunk)
            return
        try:
            await asyncio.to_thread(_hash_and_write, write_fd, hasher, chunk, offset)
            return
        except DiskFull as full:
            done = full.done
        if not fill.evicted_for_space:
            fill.evicted_for_space = True
            rest = (fill.size - offset) if fill.size is not None else len(chunk)
            await self.cache.evict_for(rest + EVICT_MARGIN)
            try:
                await asyncio.to_thread(_write_at, write_fd, chunk[done:], offset + done)
                return
            except DiskFull as again:
                done += again.done
        self._uncached(fill, offset + done)
        assert fill.window is not None
        await fill.window.append(chunk[done:])

    def _uncached(self, fill: Fill, origin: int) -> None:
        log.warning("fill_disk_full", digest=str(fill.digest), at=origin, readers=len(fill.readers))
        fill.window = Window(origin, stall=self.stall)
        for reader, at in fill.readers.items():
            fill.window.join(reader, at)

    async def _commit(self, fill: Fill, write_fd: int) -> None:
        await asyncio.to_thread(_sync_and_commit, write_fd, self.storage, fill.temp, fill.digest)
        fill.committed = True
        await self.cache.add(fill.digest, fill.written)

    async def _download(self, fill: Fill, write_fd: int, hasher: hashlib._Hash) -> None:
        failures = 0
        while True:
            try:
                stream = await fill.upstream.open_blob(fill.repository, fill.digest, fill.written)
            except OciError as err:
                if not retryable(err) or failures >= self.retries:
                    raise
                failures += 1
                await _backoff(failures)
                continue
            fill.upstream_gets += 1
            try:
                if fill.size is None and stream.total is not None:
                    fill.size = stream.total
                elif stream.total is not None and stream.total != fill.size:
                    raise OciError(Code.UPSTREAM_ERROR, "upstream changed the blob's size")
                if fill.state is State.STARTING:
                    fill.state = State.RUNNING
                    fill._announce()
                skip = fill.written - stream.start  # upstream ignored our Range: drop what we have
                async for chunk in stream.chunks(WRITE_BATCH):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    if fill.size is not None and fill.written + len(chunk) > fill.size:
                        raise OciError(Code.UPSTREAM_ERROR, "upstream sent more than it announced")
                    await self._store(fill, write_fd, hasher, chunk)
                    fill.written += len(chunk)
                    fill._announce()
                if fill.size is None or fill.written == fill.size:
                    return
                raise OciError(Code.UNAVAILABLE, "upstream body ended early")
            except OciError as err:
                if not retryable(err) or failures >= self.retries:
                    raise
                failures += 1
                log.info(
                    "fill_resume",
                    digest=str(fill.digest),
                    at=fill.written,
                    attempt=failures,
                    reason=err.message,
                )
                await _backoff(failures)
            finally:
                stream.close()


async def _backoff(failures: int) -> None:
    await asyncio.sleep(min(0.1 * 2**failures, 5.0))


def _open_pair(path: Path) -> tuple[int, int]:
    write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return write_fd, os.open(path, os.O_RDONLY)
    except OSError:
        os.close(write_fd)
        raise


class DiskFull(Exception):
    """The file system took only ``done`` bytes of a write (ENOSPC, EDQUOT)."""

    def __init__(self, done: int) -> None:
        super().__init__(f"disk full after {done} bytes")
        self.done = done


def _hash_and_write(fd: int, hasher: hashlib._Hash, data: bytes, offset: int) -> None:
    # hashlib releases the GIL for large buffers, so hashing here runs beside the loop. The
    # hash takes every byte received, whether or not the disk takes it.
    hasher.update(data)
    _write_at(fd, data, offset)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise DiskFull(done) from exc
            raise


def _sync_and_commit(fd: int, storage: Storage, temp: Path, digest: Digest) -> None:
    os.fsync(fd)
    storage.commit(temp, digest)
