"""A full disk under a download: room is made by evicting, else the blob is streamed through
to every client without being cached. On real small file systems (tmpfs), not mocks."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import aiohttp

from proxy.web import keys
from tests.conftest import Proxy, StartProxy
from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.smallfs import fill_up, small_fs

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def pull(session: aiohttp.ClientSession, proxy: Proxy, digest: str) -> bytes:
    async with session.get(f"{proxy.url}/v2/library/app/blobs/{digest}") as resp:
        assert resp.status == 200
        return await resp.read()


async def test_a_layer_larger_than_the_disk_streams_to_every_client_uncached(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: object,
) -> None:
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=MiB)
    with small_fs(tmp_path / "disk", "3m") as disk:
        proxy = await start_proxy({"docker.io": fake.url}, cache_dir=disk / "cache")
        clients = [asyncio.create_task(pull(session, proxy, digest)) for _ in range(5)]
        await fake.faults[digest].stalled.wait()
        fake.faults[digest].resume()
        bodies = await asyncio.gather(*clients)
        assert all(sha(body) == digest for body in bodies)
        assert fake.count(method="GET", path_contains="/blobs/") == 1  # still one download
        assert await proxy.cached() == set()
        assert proxy.temp_files() == []
        metrics = (await (await session.get(f"{proxy.url}/metrics")).read()).decode()
        assert 'ocicache_fills_total{outcome="uncached"} 1.0' in metrics
        # It keeps serving: a small blob that fits is cached as usual.
        small = os.urandom(100_000)
        small_digest = fake.add_blob(small)
        assert await pull(session, proxy, small_digest) == small
        assert small_digest in await proxy.cached()


async def test_a_full_disk_makes_room_by_evicting_least_recently_used(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    olds = [os.urandom(MiB) for _ in range(4)]
    new = os.urandom(MiB)
    old_digests = [fake.add_blob(b) for b in olds]
    new_digest = fake.add_blob(new)
    with small_fs(tmp_path / "disk", "16m") as disk:
        proxy = await start_proxy({"docker.io": fake.url}, cache_dir=disk / "cache")
        for digest, data in zip(old_digests, olds, strict=True):
            assert await pull(session, proxy, digest) == data
            await proxy.cached()
        # Something else fills the disk: the next layer fits only once the oldest go.
        fill_up(disk)
        assert await pull(session, proxy, new_digest) == new
        cached = await proxy.cached()
        assert new_digest in cached
        # The rest of the blob and a margin were freed, oldest first; the younger ones stay.
        assert old_digests[0] not in cached
        assert old_digests[-1] in cached
        assert proxy.app[keys.CACHE].total == sum(b.size for b in proxy.app[keys.STORAGE].scan())
