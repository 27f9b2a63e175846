"""Readers of one cold blob for the lazy-range scenario: the whole blob, one range, and the
parallel chunks containerd 2.1 asks for. Each checks every byte it was given against the blob
itself (the whole by its sha256, a range against the file at that offset) and records when it
sent its request, when the first byte it asked for arrived, and when it had the last.

They run in the harness's process on its event loop (aiohttp): a few readers at the pace of a
shaped link cost it little. A server may answer a range with the whole blob (200), as
distribution's proxy does for a blob it does not hold yet; the range's first byte then
arrives when the stream reaches it, and that is when it is timed. Every request is bounded by
``timeout``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp

READ_BUFSIZE: Final = 1024 * 1024
TIMEOUT: Final = 300.0


class Blob(Protocol):
    """What a reader checks against (:class:`loadtests.cold.ColdBlob` is one)."""

    @property
    def digest(self) -> str: ...
    @property
    def size(self) -> int: ...
    def read(self, offset: int, length: int) -> bytes: ...


@dataclass
class Read:
    """One request, as its reader saw it. Times are ``time.perf_counter()``."""

    asked: str  # "whole" or the Range header
    sent: float
    status: int = 0
    first_byte: float | None = None  # of what was asked for
    done: float | None = None
    received: int = 0  # bytes of what was asked for
    error: str | None = None

    @property
    def ttfb(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.sent


def session(timeout: float = TIMEOUT) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1),
        auto_decompress=False,
        read_bufsize=READ_BUFSIZE,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10),
    )


async def read_whole(
    client: aiohttp.ClientSession,
    url: str,
    blob: Blob,
    on_first_byte: Callable[[], None] = lambda: None,
) -> Read:
    """GET the whole blob, check its sha256; ``on_first_byte`` is called when its first body
    byte arrives (the cue for a range reader that must ask while the fill runs)."""
    read = Read("whole", time.perf_counter())
    hasher = hashlib.sha256()
    try:
        async with client.get(url) as resp:
            read.status = resp.status
            if resp.status != 200:
                read.error = f"status {resp.status}: {(await resp.text())[:200]}"
                return read
            while chunk := await resp.content.readany():
                if read.first_byte is None:
                    read.first_byte = time.perf_counter()
                    on_first_byte()
                hasher.update(chunk)
                read.received += len(chunk)
        read.done = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as exc:
        read.error = f"{type(exc).__name__}: {exc}"
        return read
    if read.received != blob.size or f"sha256:{hasher.hexdigest()}" != blob.digest:
        read.error = f"bad body: {read.received} bytes, sha256:{hasher.hexdigest()}"
    return read


async def read_range(client: aiohttp.ClientSession, url: str, blob: Blob, first: int, last: int) -> Read:
    """GET ``Range: bytes=first-last``, and check what came against the blob at ``first``. A 206
    must carry exactly that range; a 200 (the whole blob) is read up to the range, then the
    range is taken from it and the connection dropped."""
    header = f"bytes={first}-{last}"
    want = min(last, blob.size - 1) - first + 1
    read = Read(header, time.perf_counter())
    got = bytearray()
    try:
        async with client.get(url, headers={"Range": header}) as resp:
            read.status = resp.status
            if resp.status == 206:
                expected = f"bytes {first}-{first + want - 1}/{blob.size}"
                if resp.headers.get("Content-Range") != expected:
                    read.error = f"Content-Range {resp.headers.get('Content-Range')!r}, not {expected!r}"
                    return read
                skip = 0
            elif resp.status == 200:
                skip = first
            else:
                read.error = f"status {resp.status}: {(await resp.text())[:200]}"
                return read
            while len(got) < want and (chunk := await resp.content.readany()):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                if read.first_byte is None:
                    read.first_byte = time.perf_counter()
                got += chunk[: want - len(got)]
            read.done = time.perf_counter()
            if resp.status == 200:
                resp.close()  # the rest of the whole blob is not wanted
    except (aiohttp.ClientError, TimeoutError) as exc:
        read.error = f"{type(exc).__name__}: {exc}"
        return read
    read.received = len(got)
    if got != await asyncio.to_thread(blob.read, first, want):
        read.error = f"bad range: {len(got)} bytes, not the blob's {want} at {first}"
    return read


async def read_chunks(url: str, blob: Blob, chunk: int, workers: int, timeout: float = TIMEOUT) -> list[Read]:
    """The whole blob as ``Range: bytes=N-(N+chunk-1)`` requests, ``workers`` at a time over a
    connection each, every worker taking the next chunk in order as it finishes one (as
    containerd 2.1 fetches a layer). Returns every chunk's read, in order of offset."""
    offsets = list(range(0, blob.size, chunk))
    todo = iter(offsets)
    reads: dict[int, Read] = {}

    async def worker() -> None:
        async with session(timeout) as client:
            for offset in todo:
                reads[offset] = await read_range(client, url, blob, offset, offset + chunk - 1)

    await asyncio.gather(*(worker() for _ in range(min(workers, len(offsets)))))
    return [reads[o] for o in offsets]


def wall(reads: list[Read]) -> float:
    """First request sent to last byte had, over ``reads``."""
    ends = [r.done for r in reads if r.done is not None]
    return max(ends) - min(r.sent for r in reads) if ends else float("nan")


def failures(reads: list[Read]) -> list[str]:
    return [f"{r.asked}: {r.error}" for r in reads if r.error is not None]
