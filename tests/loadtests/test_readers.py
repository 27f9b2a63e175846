"""The lazy-range scenario's readers (loadtests/readers.py) against an in-process server: a range
answered 206 is checked against the blob, one answered with the whole blob (200, as
distribution's proxy does) is taken from the stream at its offset, wrong bytes or a wrong
Content-Range are errors, and the chunk reader covers the whole blob in order. No timings."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from loadtests import readers

MiB = 1024 * 1024


@dataclass(frozen=True)
class Blob:
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


BLOB = Blob(os.urandom(3 * MiB + 12345))


def _range(request: web.Request) -> tuple[int, int]:
    first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
    return int(first), min(int(last), BLOB.size - 1)


async def ranged(request: web.Request) -> web.Response:
    """A server that honours Range, with the wrong bytes (shifted by one) if asked."""
    if "Range" not in request.headers:
        return web.Response(body=BLOB.data)
    first, last = _range(request)
    shift = 1 if request.query.get("shift") else 0
    headers = {"Content-Range": f"bytes {first}-{last}/{BLOB.size}"}
    if request.query.get("lie"):
        headers["Content-Range"] = f"bytes 0-{last - first}/{BLOB.size}"
    return web.Response(status=206, body=BLOB.data[first + shift : last + 1 + shift], headers=headers)


async def whole_only(request: web.Request) -> web.Response:
    return web.Response(body=BLOB.data)


@pytest.fixture
async def base() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/ranged", ranged)
    app.router.add_get("/whole", whole_only)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_206_range_is_checked_against_the_blob(base: str) -> None:
    async with readers.session() as client:
        read = await readers.read_range(client, base + "/ranged", BLOB, 2 * MiB, 2 * MiB + 4095)

    assert (read.status, read.error, read.received) == (206, None, 4096)
    assert read.ttfb is not None


async def test_a_range_answered_with_the_whole_blob_is_taken_at_its_offset(base: str) -> None:
    async with readers.session() as client:
        read = await readers.read_range(client, base + "/whole", BLOB, 2 * MiB, 2 * MiB + 4095)

    assert (read.status, read.error, read.received) == (200, None, 4096)
    assert read.first_byte is not None


@pytest.mark.parametrize(("query", "error"), [("shift=1", "bad range"), ("lie=1", "Content-Range")])
async def test_wrong_bytes_or_a_wrong_content_range_are_errors(base: str, query: str, error: str) -> None:
    async with readers.session() as client:
        read = await readers.read_range(client, f"{base}/ranged?{query}", BLOB, MiB, MiB + 999)

    assert read.error is not None and error in read.error


async def test_a_whole_read_checks_the_digest(base: str) -> None:
    wrong = Blob(BLOB.data[:-1] + b"\0")
    async with readers.session() as client:
        good = await readers.read_whole(client, base + "/whole", BLOB)
        bad = await readers.read_whole(client, base + "/whole", wrong)

    assert (good.error, good.received) == (None, BLOB.size)
    assert bad.error is not None and "bad body" in bad.error


async def test_chunks_cover_the_blob_in_order_every_one_checked(base: str) -> None:
    chunk = 256 * 1024
    reads = await readers.read_chunks(base + "/ranged", BLOB, chunk, workers=5)

    assert readers.failures(reads) == []
    assert [r.asked for r in reads] == [f"bytes={o}-{o + chunk - 1}" for o in range(0, BLOB.size, chunk)]
    assert sum(r.received for r in reads) == BLOB.size
    assert readers.wall(reads) > 0
