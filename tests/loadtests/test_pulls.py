"""The many-pulls engine (loadtests/pulls.py) against an in-process server: whole pullers count
every byte, the verifying one checks the sha256, stalled ones stop after the head and a few
bytes, and a body cut short is an error, never a pull. Counts and verdicts only, no timings."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from loadtests import pulls

BODY = os.urandom(3 * 1024 * 1024)
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()
TIMEOUT = 60.0


async def good(request: web.Request) -> web.StreamResponse:
    return web.Response(body=BODY, content_type="application/octet-stream")


async def wrong(request: web.Request) -> web.StreamResponse:
    return web.Response(body=bytes(len(BODY)), content_type="application/octet-stream")


async def short(request: web.Request) -> web.StreamResponse:
    # What ocicache does with a download that fails: half the body, then the connection cut.
    resp = web.StreamResponse()
    resp.content_length = len(BODY)
    await resp.prepare(request)
    await resp.write(BODY[: len(BODY) // 2])
    assert request.transport is not None
    request.transport.abort()
    return resp


async def missing(request: web.Request) -> web.StreamResponse:
    return web.Response(status=404, text="no")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/good", good)
    app.router.add_get("/wrong", wrong)
    app.router.add_get("/short", short)
    app.router.add_get("/missing", missing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    finally:
        await runner.cleanup()


async def pull(port: int, path: str, whole: int, stalled: int = 0, verify: int = 1) -> list[pulls.Puller]:
    return await asyncio.to_thread(
        pulls.run,
        port,
        path,
        size=len(BODY),
        digest=DIGEST,
        whole=whole,
        stalled=stalled,
        verify=verify,
        timeout=TIMEOUT,
    )


async def test_whole_pullers_get_every_byte_and_stalled_ones_stop_after_a_few(port: int) -> None:
    got = await pull(port, "/good", whole=3, stalled=2)

    assert [p.kind for p in got] == ["verify", "whole", "whole", "stalled", "stalled"]
    assert [p.error for p in got] == [None] * 5
    for p in got[:3]:
        assert (p.status, p.received) == (200, len(BODY))
        assert p.done is not None and p.first_byte is not None
    for p in got[3:]:
        assert p.status == 200
        assert 1 <= p.received <= pulls.STALL_BYTES
        assert p.done is None


async def test_the_verifying_puller_catches_wrong_bytes_that_only_counting_ones_cannot(port: int) -> None:
    verify, count = await pull(port, "/wrong", whole=2)

    assert verify.error is not None and "bad body" in verify.error
    assert count.error is None and count.received == len(BODY)


async def test_a_body_cut_short_is_an_error_not_a_pull(port: int) -> None:
    got = await pull(port, "/short", whole=2, verify=1)

    for p in got:
        assert p.error is not None and "ended after" in p.error, p
        assert p.done is None and p.received < len(BODY)


async def test_an_error_status_is_reported(port: int) -> None:
    (p,) = await pull(port, "/missing", whole=1)

    assert p.status == 404 and p.error is not None and "status 404" in p.error


def test_response_heads_are_parsed() -> None:
    assert pulls.parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\ncontent-length: 12") == (200, 12)
    assert pulls.parse_head(b"HTTP/1.1 206 Partial Content\r\nX: y") == (206, None)
    with pytest.raises(ValueError, match="not an HTTP response"):
        pulls.parse_head(b"SSH-2.0-OpenSSH\r\n")
