"""Getting one fill's bytes from upstream into its temp file.

The first GET asks for the first chunk (``Range: bytes=0-...``). Its answer tells the blob's
size; a blob over the threshold is then fetched by several connections at once, each taking the
next chunk in order as it finishes one (:func:`proxy.flows.coverage.plan_parts`), each chunk
written at its offset, and hashed in order as the contiguous prefix grows, reading back what
the connections wrote. A smaller blob is one stream (resumed from the first chunk's end). A
registry that ignores ``Range`` answers the whole blob to that first GET: one stream, hashed as
it arrives. Either
way upstream sends each byte once (1.00x the blob), unless a broken connection makes a part
resume, which re-asks only for what that part still lacks.

A full disk (ENOSPC, EDQUOT) first makes room by evicting least recently used files, once per
fill. Then a single stream goes on without caching, its readers served from the fill's memory
window (:mod:`proxy.flows.window`); parallel parts are never started without room for the
whole blob, and one that hits a full disk anyway fails the fill (the next request starts a
fresh one, as a single stream).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import structlog

from proxy.core.errors import Code, OciError
from proxy.flows.coverage import Coverage, Part, plan_parts
from proxy.flows.fill import Fill, State
from proxy.flows.window import Window
from proxy.store.cache import BlobCache
from proxy.upstream.client import BlobStream, retryable
from proxy.upstream.source import BlobSource

if TYPE_CHECKING:
    from proxy.flows.sourcing import FillSource

log = structlog.get_logger("ocicache.fills")

# Largest piece written (and hashed) per worker-thread hop.
WRITE_BATCH: Final = 4 * 1024 * 1024
# Room freed beyond the rest of a blob when the disk is full, for the catalogue and neighbours.
EVICT_MARGIN: Final = 256 * 1024
DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
# Several connections must carry this much more than one alone, or one is all they get.
SHARED_GAIN: Final = 1.5


@dataclass(frozen=True, slots=True)
class Plan:
    retries: int
    connections: int = 4  # parallel ranged GETs for a large blob; 1 turns them off
    threshold: int = 32 * 1024 * 1024  # blobs larger than this are fetched in parts
    chunk: int = 8 * 1024 * 1024  # what one ranged GET asks for
    stall: float = 60.0  # how long a full memory window waits for its slowest reader


class _Rate:
    """Bytes per second since the first byte counted."""

    def __init__(self) -> None:
        self.bytes = 0
        self.started: float | None = None

    def add(self, count: int) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self.bytes += count

    def per_second(self) -> float:
        if self.started is None:
            return 0.0
        return self.bytes / max(time.monotonic() - self.started, 1e-6)


class DiskFull(Exception):
    """The file system took only ``done`` bytes of a write (ENOSPC, EDQUOT)."""

    def __init__(self, done: int) -> None:
        super().__init__(f"disk full after {done} bytes")
        self.done = done


class Download:
    def __init__(
        self, fill: Fill, write_fd: int, cache: BlobCache, plan: Plan, sources: FillSource | None = None
    ) -> None:
        self.fill = fill
        self.write_fd = write_fd
        self.cache = cache
        self.plan = plan
        self.hasher = hashlib.new(fill.digest.algorithm)
        # In a cluster, where the bytes come from (a peer, or upstream under a lease), which
        # may change mid-way; None: always upstream.
        self.sources = sources
        self._streams: dict[int, tuple[BlobStream, BlobSource, int]] = {}
        if sources is not None:
            sources.interrupt = self._interrupt

    async def run(self) -> str:
        """Fetch every byte; returns the hex digest of what arrived (the caller compares)."""
        fill = self.fill
        ranged_end = self.plan.chunk if self.plan.connections > 1 else None
        if self.sources is not None and self.sources.is_peer(await self.sources.current()):
            # A peer is one fast stream away (and its own fill may be one stream): no parts.
            ranged_end = None
        first = await self._open(0, ranged_end, failures=[0])
        total = first.total
        parallel = False
        if total is not None:
            fill.size = total
            if (
                first.ranged
                and total > self.plan.threshold
                and total > first.end
                and await self._room_for(total)
            ):
                fill.coverage = Coverage(total, plan_parts(total, first.end, self.plan.chunk))
                parallel = len(fill.coverage.parts) > 1
            else:
                fill.coverage = Coverage.single(total)
        fill.state = State.RUNNING
        fill.announce()
        if fill.coverage is None:
            await self._stream_unsized(first)
        elif not parallel:
            await self._part(fill.coverage.parts[0], first, inline_hash=True)
        else:
            await self._parallel(fill.coverage, first)
        return self.hasher.hexdigest()

    # --- requests ----------------------------------------------------------------------------

    async def _open(self, start: int, end: int | None, failures: list[int]) -> BlobStream:
        """A stream from ``start`` (to ``end``), retrying what may be retried."""
        fill = self.fill
        while True:
            sources = self.sources
            source: BlobSource = fill.upstream if sources is None else await sources.current()
            generation = 0 if sources is None else sources.generation
            try:
                stream = await source.open_blob(fill.repository, fill.digest, start, end)
            except OciError as err:
                if sources is not None and await sources.failed(source, err):
                    failures[0] = 0  # a new source gets its own tries
                    continue
                if not retryable(err) or failures[0] >= self.plan.retries:
                    raise
                failures[0] += 1
                await _backoff(failures[0])
                continue
            if sources is not None and sources.is_peer(source):
                fill.peer_gets += 1
            else:
                fill.upstream_gets += 1
            if fill.size is not None and stream.total is not None and stream.total != fill.size:
                stream.close()
                raise OciError(Code.UPSTREAM_ERROR, f"{source.name} changed the blob's size")
            self._streams[id(stream)] = (stream, source, generation)
            return stream

    def _close(self, stream: BlobStream) -> None:
        self._streams.pop(id(stream), None)
        stream.close()

    def _interrupt(self) -> None:
        """The source changed under us (our lease is another's now): stop reading from it."""
        for stream, _, _ in list(self._streams.values()):
            stream.close()

    async def _switched(self, stream: BlobStream | None, err: OciError) -> bool:
        """Did ``stream`` fail because its source is no longer ours to read (a peer that
        failed, a lease lost)? Then the part goes on from a newly chosen source."""
        if self.sources is None or stream is None:
            return False
        opened = self._streams.get(id(stream))
        if opened is None:
            return False
        _, source, generation = opened
        if generation != self.sources.generation:
            return True
        return await self.sources.failed(source, err)

    def _from_peer(self, stream: BlobStream) -> bool:
        opened = self._streams.get(id(stream))
        return opened is not None and self.sources is not None and self.sources.is_peer(opened[1])

    async def _room_for(self, size: int) -> bool:
        try:
            free = await asyncio.to_thread(lambda: shutil.disk_usage(self.fill.temp.parent).free)
        except OSError:
            return False
        return free > size + EVICT_MARGIN

    # --- one part ----------------------------------------------------------------------------

    async def _part(
        self, part: Part, stream: BlobStream | None, *, inline_hash: bool, rate: _Rate | None = None
    ) -> None:
        """Fill ``part``, resuming a broken connection from where the part stands."""
        fill = self.fill
        failures = [0]
        part.taken = True
        while not part.complete:
            if stream is None:
                stream = await self._open(part.reached, part.end, failures)
            from_peer = self._from_peer(stream)
            try:
                # An upstream that ignored our Range starts earlier: drop what we have.
                skip = part.reached - stream.start
                if skip < 0:
                    raise OciError(Code.UPSTREAM_ERROR, "upstream answered the wrong range")
                async for chunk in stream.chunks(WRITE_BATCH):
                    fill.received += len(chunk)
                    if from_peer:
                        fill.peer_received += len(chunk)
                        assert self.sources is not None
                        self.sources.progress()
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    chunk = chunk[: part.end - part.reached]  # never into the next part
                    if inline_hash:
                        await self._store(part, chunk)
                    else:
                        await self._write(part.reached, chunk)
                    part.done += len(chunk)
                    if rate is not None:
                        rate.add(len(chunk))
                    fill.announce()
                    if part.complete:
                        break
                if not part.complete and stream.end < part.end and part.reached >= stream.end:
                    self._close(stream)
                    stream = None  # it ended where it said it would: ask for the rest
                    continue
                if not part.complete:
                    raise OciError(Code.UNAVAILABLE, "upstream body ended early")
            except OciError as err:
                if await self._switched(stream, err):
                    failures[0] = 0
                    log.info(
                        "fill_source_changed", digest=str(fill.digest), at=part.reached, reason=err.message
                    )
                    continue  # the finally below lets the stream go; the next source resumes
                if not retryable(err) or failures[0] >= self.plan.retries:
                    raise
                failures[0] += 1
                log.info(
                    "fill_resume",
                    digest=str(fill.digest),
                    at=part.reached,
                    part=part.start,
                    attempt=failures[0],
                    reason=err.message,
                )
                await _backoff(failures[0])
            finally:
                if stream is not None:
                    self._close(stream)
                    stream = None

    async def _stream_unsized(self, stream: BlobStream) -> None:
        """Upstream named no size: one stream to its end (no resume: we cannot know the end)."""
        fill = self.fill
        try:
            async for chunk in stream.chunks(WRITE_BATCH):
                fill.received += len(chunk)
                await self._store_unsized(chunk)
                fill.streamed += len(chunk)
                fill.announce()
        finally:
            self._close(stream)

    # --- parallel parts ----------------------------------------------------------------------

    async def _parallel(self, coverage: Coverage, first: BlobStream) -> None:
        """The first chunk alone, timed; then the other connections join, each taking the next
        chunk in order. When the first round of them shows that together they carry no more
        than one did alone (a link they share, not a cap per stream), all but one stop, so
        that the prefix, which whole-body readers are waiting on, grows at the link's full
        rate again instead of a share of it."""
        fill = self.fill
        todo = deque(coverage.parts[1:])
        alone = _Rate()
        await self._part(coverage.parts[0], first, inline_hash=False, rate=alone)
        together = _Rate()
        decided = asyncio.Event()
        shared = False

        async def connection(part: Part | None) -> None:
            nonlocal shared
            while part is not None:
                await self._part(part, None, inline_hash=False, rate=together)
                if not decided.is_set():
                    decided.set()
                    shared = together.per_second() < SHARED_GAIN * alone.per_second()
                    log.info(
                        "fill_parallel",
                        digest=str(fill.digest),
                        parts=len(coverage.parts),
                        alone=round(alone.per_second()),
                        together=round(together.per_second()),
                        connections=1 if shared else self.plan.connections,
                        size=coverage.size,
                    )
                if shared and connections_running[0] > 1:
                    connections_running[0] -= 1
                    return
                part = todo.popleft() if todo else None
            connections_running[0] -= 1

        connections_running = [0]
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.plan.connections):
                    if todo:
                        connections_running[0] += 1
                        group.create_task(connection(todo.popleft()))
                group.create_task(self._hash_in_order(coverage))
        except* OciError as failed:
            raise failed.exceptions[0] from None
        except* DiskFull:
            raise OciError(Code.UNAVAILABLE, "the cache's disk is full") from None

    async def _hash_in_order(self, coverage: Coverage) -> None:
        """Follow the contiguous prefix, hashing what the parts wrote (from the page cache)."""
        hashed = 0
        fill = self.fill
        while hashed < coverage.size:
            prefix = coverage.prefix()
            if prefix <= hashed:
                await fill.wait_beyond_prefix(hashed)
                continue
            upto = min(prefix, hashed + WRITE_BATCH)
            await asyncio.to_thread(_hash_back, fill.read_fd, self.hasher, hashed, upto - hashed)
            hashed = upto

    # --- writing -----------------------------------------------------------------------------

    async def _write(self, offset: int, chunk: bytes) -> None:
        try:
            await asyncio.to_thread(write_at, self.write_fd, chunk, offset)
        except DiskFull as full:
            if self.fill.evicted_for_space:
                raise
            self.fill.evicted_for_space = True
            await self.cache.evict_for(len(chunk) - full.done + EVICT_MARGIN)
            await asyncio.to_thread(write_at, self.write_fd, chunk[full.done :], offset + full.done)

    async def _store(self, part: Part, chunk: bytes) -> None:
        """The single stream: hash ``chunk`` and put it where readers find it (the temp file, or
        once the disk is full, the fill's window)."""
        await self._store_at(part.reached, chunk, rest=part.end - part.reached)

    async def _store_unsized(self, chunk: bytes) -> None:
        await self._store_at(self.fill.streamed, chunk, rest=len(chunk))

    async def _store_at(self, offset: int, chunk: bytes, rest: int) -> None:
        fill = self.fill
        if fill.window is not None:
            await asyncio.to_thread(self.hasher.update, chunk)
            await fill.window.append(chunk)
            return
        try:
            await asyncio.to_thread(_hash_and_write, self.write_fd, self.hasher, chunk, offset)
            return
        except DiskFull as full:
            done = full.done
        if not fill.evicted_for_space:
            fill.evicted_for_space = True
            await self.cache.evict_for(rest + EVICT_MARGIN)
            try:
                await asyncio.to_thread(write_at, self.write_fd, chunk[done:], offset + done)
                return
            except DiskFull as again:
                done += again.done
        self.go_uncached(offset + done)
        assert fill.window is not None
        await fill.window.append(chunk[done:])

    def go_uncached(self, origin: int) -> None:
        fill = self.fill
        log.warning("fill_disk_full", digest=str(fill.digest), at=origin, readers=len(fill.readers))
        fill.window = Window(origin, stall=self.plan.stall)
        for reader, at in fill.readers.items():
            fill.window.join(reader, at)


async def _backoff(failures: int) -> None:
    await asyncio.sleep(min(0.1 * 2**failures, 5.0))


def _hash_and_write(fd: int, hasher: hashlib._Hash, data: bytes, offset: int) -> None:
    # hashlib releases the GIL for large buffers, so hashing here runs beside the loop. The
    # hash takes every byte received, whether or not the disk takes it.
    hasher.update(data)
    write_at(fd, data, offset)


def write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise DiskFull(done) from exc
            raise


def _hash_back(fd: int, hasher: hashlib._Hash, offset: int, count: int) -> None:
    while count > 0:
        data = os.pread(fd, min(count, 1024 * 1024), offset)
        if not data:
            raise OSError(errno.EIO, "temp file shorter than what was written")
        hasher.update(data)
        offset += len(data)
        count -= len(data)
