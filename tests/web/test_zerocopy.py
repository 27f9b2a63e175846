"""send_file under both event loops: bytes arrive whole and in order, also behind a transport
buffer that still holds earlier bytes (the case where sending on the dup'd fd could overtake)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

from proxy.web.zerocopy import send_file

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
PREFIX = b"p" * (8 * 1024 * 1024)  # more than a loopback socket buffer takes at once


async def _roundtrip(path: Path, offset: int, count: int) -> bytes:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(PREFIX) + count
        writer = await resp.prepare(request)
        assert writer is not None
        await resp.write(PREFIX)  # may leave bytes in the transport's buffer
        fd = os.open(path, os.O_RDONLY)
        try:
            await send_file(request, writer, fd, offset, count)
        finally:
            os.close(fd)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                body = b""
                # Read slowly at first, so the server's buffer really fills up.
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                return body
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize(("offset", "count"), [(0, 20 * 1024 * 1024), (12345, 1000), (0, 1)])
def test_send_file_after_buffered_bytes(tmp_path: Path, loop_name: str, offset: int, count: int) -> None:
    data = os.urandom(20 * 1024 * 1024)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        body = runner.run(_roundtrip(path, offset, count))
    assert body == PREFIX + data[offset : offset + count]
