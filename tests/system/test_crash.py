"""kill -9 at the worst moment: a restarted proxy serves only whole, verified blobs."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp

from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.proxyproc import serving

MiB = 1024 * 1024


async def test_kill_during_fill_leaves_nothing_half_written(
    fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=3 * MiB)
    cache = tmp_path / "cache"
    async with serving(cache, {"docker.io": fake.url}) as proxy:
        resp = await session.get(f"{proxy.url}/v2/library/app/blobs/{digest}")
        await resp.content.readexactly(MiB)
        await fake.faults[digest].stalled.wait()
        proxy.proc.kill()  # SIGKILL, mid-download
        await proxy.proc.wait()
        resp.close()
    # What the dead proxy left: a partial temp file, and no blob under its digest.
    assert list((cache / "tmp").iterdir()) != []
    assert not (cache / "blobs" / "sha256" / digest.split(":")[1]).exists()

    del fake.faults[digest]
    async with serving(cache, {"docker.io": fake.url}) as proxy:
        assert list((cache / "tmp").iterdir()) == []
        async with session.get(f"{proxy.url}/v2/library/app/blobs/{digest}") as again:
            assert again.status == 200
            assert await again.read() == data
    # The graceful stop on leaving let the verified download finish its commit.
    assert (cache / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == data
    assert list((cache / "tmp").iterdir()) == []
