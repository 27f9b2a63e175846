"""500 slow and idle connections do not starve a normal client (issue 13).

The proxy runs as its own process (``python -m proxy serve``) on its default connection
settings, so its resident memory can be read from ``/proc``. From ten other loopback
addresses, 500 connections hang around: slowloris heads that gain a byte a second, bodies
trickled behind complete heads, and idle keep-alive connections after one answer. While they
do, a normal client pulls an image's manifest and every blob and gets every byte right. The
memory check is a sanity bound, not a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import aiohttp

from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image
from tests.support.proxyproc import serving
from tests.support.rawhttp import open_raw, read_response

HOSTILE = 500
ADDRESSES = [f"127.0.0.{i}" for i in range(2, 12)]  # 50 connections from each
MiB = 1024 * 1024
# 500 connections' buffers and handler state: a few MiB; the bound only catches something
# per connection that grows with what a client sends.
RSS_GROWTH_BOUND = 128 * MiB


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


async def open_connections(metrics_url: str, session: aiohttp.ClientSession) -> int:
    """The proxy's count of open client connections."""
    async with session.get(metrics_url) as resp:
        text = await resp.text()
    match = re.search(r"^ocicache_connections ([0-9.e+]+)$", text, re.M)
    assert match is not None, text[:500]
    return int(float(match.group(1)))


async def hostile(port: int, i: int, stop: asyncio.Event) -> None:
    reader, writer = await open_raw(port, local=ADDRESSES[i % len(ADDRESSES)])
    try:
        kind = i % 3
        if kind == 0:  # slowloris: a head that never ends
            writer.write(b"GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            trickle = b"a"
        elif kind == 1:  # a complete head, its body trickled
            writer.write(b"PUT /v2/library/app/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            writer.write(b"Content-Length: 1000000\r\n\r\n")
            trickle = b"b"
        else:  # one answer, then idle on keep-alive
            writer.write(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await read_response(reader)
            trickle = b""
        while not stop.is_set():
            if trickle:
                writer.write(trickle)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)  # a byte a second, the pace of the attack
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the proxy may close it (its timeouts); that is its right
    finally:
        writer.close()


async def test_500_slow_and_idle_connections_do_not_starve_a_normal_client(
    fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(layer_sizes=(50_000, 2 * MiB), seed=1350)
    fake.add_image("library/app", image, tag="v1")
    async with serving(tmp_path / "cache", {"docker.io": fake.url}) as proxy:
        port = int(proxy.host.rpartition(":")[2])
        before = rss(proxy.proc.pid)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(hostile(port, i, stop)) for i in range(HOSTILE)]
        try:
            # Wait until the proxy holds them all (each look is an answered request).
            for _ in range(10_000):
                if await open_connections(f"{proxy.url}/metrics", session) >= HOSTILE:
                    break
            assert await open_connections(f"{proxy.url}/metrics", session) >= HOSTILE
            during = rss(proxy.proc.pid)

            # A normal client, meanwhile: the manifest by tag and by digest, and every blob.
            for ref in ("v1", image.manifest_digest):
                url = f"{proxy.url}/v2/library/app/manifests/{ref}"
                async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
                    assert resp.status == 200
                    assert await resp.read() == image.manifest
            for blob in image.blobs:
                async with session.get(f"{proxy.url}/v2/library/app/blobs/{blob.digest}") as resp:
                    assert resp.status == 200
                    assert await resp.read() == blob.data
            assert proxy.proc.returncode is None
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        print(f"proxy RSS: {before / MiB:.1f} MiB before, {during / MiB:.1f} MiB with {HOSTILE} connections")
        assert during - before < RSS_GROWTH_BOUND
