"""The shaping relay (loadtests/shaper.py): bytes pass intact both ways and are counted, in its
shared-link mode and in its per-connection mode, in process and as its own process. Whether it
keeps to its rate is a timing, which these tests do not judge."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from loadtests.shaper import MB, Counters, Relay, ShaperProcess

MiB = 1024 * 1024
TIMEOUT = 30


async def _echo_digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads to EOF (so the relay must pass the client's half-close on), then answers the
    digest of what it got followed by a large body."""
    got = await reader.read()
    writer.write(hashlib.sha256(got).digest() + ANSWER)
    await writer.drain()
    writer.close()


ANSWER = os.urandom(3 * MiB)


@pytest.fixture
async def target_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo_digest, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


@pytest.mark.parametrize("per_connection", [False, True])
async def test_relay_passes_both_directions_intact_and_counts_them(
    target_port: int, per_connection: bool
) -> None:
    requests = [os.urandom(300 * 1024), os.urandom(200 * 1024)]
    async with Relay(("127.0.0.1", target_port), 100 * MB, per_connection=per_connection) as relay:
        # Two connections at once: in either mode each gets its own stream, whole and in order.
        replies = await asyncio.gather(*(_exchange(relay.port, r) for r in requests))
        for request, reply in zip(requests, replies, strict=True):
            assert reply == hashlib.sha256(request).digest() + ANSWER
        assert relay.counters == Counters(
            down=sum(len(r) for r in replies), up=sum(len(r) for r in requests), connections=2
        )


@pytest.mark.parametrize(("per_connection", "shared"), [(False, True), (True, False)])
def test_connections_share_the_link_or_each_have_their_own(per_connection: bool, shared: bool) -> None:
    """A shared link hands every connection the same two buckets; a per-connection cap, fresh ones."""
    relay = Relay(("127.0.0.1", 1), 10 * MB, per_connection=per_connection)
    first, second = relay.buckets_for_connection(), relay.buckets_for_connection()
    assert (first["down"] is second["down"]) is shared
    assert (first["up"] is second["up"]) is shared
    assert first["down"] is not first["up"]
    assert first["down"].rate == 10 * MB


async def test_relay_process_passes_its_mode_on(target_port: int) -> None:
    """``python -m loadtests.shaper --per-connection``: the child relays, and counts what it relayed."""
    request = os.urandom(100 * 1024)
    async with ShaperProcess(("127.0.0.1", target_port), 50 * MB, per_connection=True) as link:
        assert link.port is not None
        reply = await _exchange(link.port, request)
        assert reply == hashlib.sha256(request).digest() + ANSWER
        assert await link.counters() == Counters(down=len(reply), up=len(request), connections=1)
