"""The connection level, below the app: what aiohttp's server would answer by itself, and the
guards a listener on a shared network needs, over raw sockets on loopback."""

from __future__ import annotations

import asyncio

import pytest

from proxy.web import keys
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


# --- slow and idle clients ---------------------------------------------------------------------


async def test_a_head_that_does_not_arrive_in_time_is_408(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(UNUSED, header_timeout=0.2)
    reader, writer = await open_raw(proxy.server.port or 0)
    try:
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")  # and no more
        async with asyncio.timeout(30):
            resp = await read_response(reader)
            rest = await reader.read()
    finally:
        writer.close()
    assert resp is not None and resp.status == 408 and resp.closes
    assert resp.oci_error_codes() == ["REQUEST_TIMEOUT"]
    assert rest == b""


async def test_idle_connections_are_closed(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(UNUSED, idle_timeout=0.2)
    port = proxy.server.port or 0
    # One that never sends a byte, and one that goes quiet after an answer.
    silent = await open_raw(port)
    used = await open_raw(port)
    try:
        used[1].write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(30):
            answer = await read_response(used[0])
            assert answer is not None and answer.status == 200 and not answer.closes
            assert await silent[0].read() == b""
            assert await used[0].read() == b""
    finally:
        silent[1].close()
        used[1].close()


async def test_a_connection_is_closed_after_its_last_allowed_request(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(UNUSED, max_requests_per_connection=3)
    reader, writer = await open_raw(proxy.server.port or 0)
    try:
        statuses = []
        async with asyncio.timeout(30):
            for _ in range(3):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                resp = await read_response(reader)
                assert resp is not None
                statuses.append((resp.status, resp.closes))
            assert await reader.read() == b""
    finally:
        writer.close()
    assert statuses == [(200, False), (200, False), (200, True)]


async def _answered(port: int, local: str) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection from ``local`` that has had one answer (so the proxy holds it)."""
    reader, writer = await open_raw(port, local=local)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    resp = await read_response(reader)
    assert resp is not None
    return resp.status, reader, writer


async def test_one_address_holds_at_most_its_share_of_connections(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(UNUSED, max_connections_per_address=3)
    port = proxy.server.port or 0
    held = []
    try:
        async with asyncio.timeout(30):
            for _ in range(3):
                status, reader, writer = await _answered(port, "127.0.0.2")
                assert status == 200
                held.append(writer)
            # The fourth from that address is refused at once, with the envelope.
            reader, writer = await open_raw(port, local="127.0.0.2")
            refused = await read_response(reader)
            writer.close()
            assert refused is not None and refused.status == 429 and refused.closes
            assert refused.oci_error_codes() == ["TOOMANYREQUESTS"]
            # Another address is not held back.
            status, _, other = await _answered(port, "127.0.0.3")
            other.close()
            assert status == 200
            # Once one closes, the address may open another (the close reaches the proxy
            # asynchronously: each attempt is answered, 429 until it has).
            held.pop().close()
            statuses = []
            for _ in range(1000):
                reader, writer = await open_raw(port, local="127.0.0.2")
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                resp = await read_response(reader)
                writer.close()
                statuses.append(None if resp is None else resp.status)
                if statuses[-1] == 200:
                    break
            assert statuses[-1] == 200 and set(statuses) <= {200, 429}
    finally:
        for writer in held:
            writer.close()
    metrics = proxy.app[keys.METRICS].render().decode()
    assert 'ocicache_connections_refused_total{reason="address_limit"}' in metrics
