"""The connection level, below the app: what aiohttp's server would answer by itself, and the
guards a listener on a shared network needs, over raw sockets on loopback."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import StartProxy
from tests.support.rawhttp import open_raw, read_response

UNUSED = {"docker.io": "http://127.0.0.1:9"}


@pytest.mark.parametrize(
    "request_line",
    [
        "GET /healthz HTTP/2.0",
        "GET /healthz HTTP/1.2",
        "GET /healthz HTTP/3.0",
        "GET /healthz",  # HTTP/0.9's form, though followed by headers
        "PRI * HTTP/2.0",
    ],
)
async def test_a_version_we_do_not_speak_is_400_in_http_1(start_proxy: StartProxy, request_line: str) -> None:
    # aiohttp answered these in the request's own version ("HTTP/2.0 404 Not Found" in text,
    # "HTTP/0.9 200 OK" with headers), which no client can read.
    proxy = await start_proxy(UNUSED)
    reader, writer = await open_raw(proxy.server.port or 0)
    try:
        writer.write(f"{request_line}\r\nHost: 127.0.0.1\r\n\r\n".encode())
        resp = await read_response(reader)
    finally:
        writer.close()
    assert resp is not None
    assert resp.version in ("HTTP/1.0", "HTTP/1.1")
    assert resp.status == 400
    assert resp.oci_error_codes() == ["REQUEST_INVALID"]
    assert resp.closes


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
async def test_http_1_0_and_1_1_are_answered(start_proxy: StartProxy, version: str) -> None:
    proxy = await start_proxy(UNUSED)
    reader, writer = await open_raw(proxy.server.port or 0)
    try:
        writer.write(f"GET /healthz {version}\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        resp = await read_response(reader)
    finally:
        writer.close()
    assert resp is not None and resp.status == 200
    assert resp.body == b'{"status": "ok"}'


@pytest.mark.parametrize("upgrade", ["h2c", "websocket", "TLS/1.2", "x" * 100])
async def test_an_upgrade_we_do_not_make_is_answered_and_the_connection_closed(
    start_proxy: StartProxy, upgrade: str
) -> None:
    # aiohttp's parser dropped what was pipelined behind a request asking for any upgrade but
    # websocket, and kept the connection open: the second request below was never answered.
    proxy = await start_proxy(UNUSED)
    reader, writer = await open_raw(proxy.server.port or 0)
    try:
        writer.write(
            f"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        async with asyncio.timeout(30):
            first = await read_response(reader)
            rest = await reader.read()  # the proxy closes: nothing hangs
    finally:
        writer.close()
    assert first is not None and first.status == 200 and first.closes
    # The second request was either answered or not, but never left waiting.
    assert rest == b"" or rest.startswith(b"HTTP/1.1 200 OK")
