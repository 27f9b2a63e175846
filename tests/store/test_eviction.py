"""Eviction through the API: least recently used blobs go first, but never one being served."""

from __future__ import annotations

import os

import aiohttp

from proxy.web import keys
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream

MiB = 1024 * 1024


async def test_least_recently_used_blobs_are_evicted_but_not_one_being_served(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    # Blob 0 is larger than socket buffers take, so serving it stays in progress while its
    # client does not read.
    blobs = [os.urandom(16 * MiB)] + [os.urandom(MiB) for _ in range(4)]
    digests = [fake.add_blob(b) for b in blobs]
    budget = 19 * MiB + MiB // 2
    proxy = await start_proxy({"docker.io": fake.url}, max_cache_bytes=budget)
    url = f"{proxy.url}/v2/library/app/blobs/"

    async def pull(i: int) -> None:
        async with session.get(url + digests[i]) as resp:
            assert await resp.read() == blobs[i]

    for i in range(3):
        await pull(i)
    reader = await session.get(url + digests[0])
    await reader.content.readexactly(1000)
    await pull(3)
    await pull(4)  # 20 MiB > budget: evict down to 90% of it, oldest first: 1, 2, 0, 3, 4
    cached = await proxy.cached()
    # Without the pin, blobs 1, 2 and then 0 would go (0 is most of the bytes); with it, 0 stays.
    assert digests[0] in cached
    assert not {digests[1], digests[2]} & cached
    assert proxy.app[keys.CACHE].total <= budget
    assert await reader.content.read() == blobs[0][1000:]
    reader.close()
    # An evicted blob is simply fetched again.
    await pull(1)
    assert fake.count(method="GET", path_contains=digests[1]) == 2
