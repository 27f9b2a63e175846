"""kill -9 at the worst moment: a restarted proxy serves only whole, verified blobs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, Image, make_image
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


ROUNDS = 20


def catalogue_rows(cache: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{cache / 'index.db'}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT digest, size FROM blobs"))
    finally:
        conn.close()


def files_on_disk(cache: Path) -> dict[str, bytes]:
    return {f"sha256:{p.name}": p.read_bytes() for p in (cache / "blobs" / "sha256").iterdir()}


async def pull(session: aiohttp.ClientSession, url: str, repo: str, image: Image, tag: str) -> None:
    async with session.get(f"{url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}) as resp:
        assert resp.status == 200
        assert await resp.read() == image.manifest
    for blob in image.blobs:
        async with session.get(f"{url}/v2/{repo}/blobs/{blob.digest}") as resp:
            assert resp.status == 200
            assert await resp.read() == blob.data


def committed(digests: set[str]) -> Callable[[list[dict[str, Any]]], bool]:
    """A log predicate: every one of ``digests`` has been committed."""

    def check(events: list[dict[str, Any]]) -> bool:
        return digests <= {e.get("digest") for e in events if e.get("event") == "fill_committed"}

    return check


def after_requests(fake: FakeUpstream, n: int) -> asyncio.Event:
    """Set once the fake upstream has seen ``n`` requests in all."""
    reached = asyncio.Event()
    fake.observers.append(lambda _: reached.set() if len(fake.seen) >= n else None)
    return reached


async def pull_until_killed(
    session: aiohttp.ClientSession, url: str, repo: str, image: Image, tag: str
) -> None:
    """A pull that may be cut by the kill: whatever arrives whole must be right."""
    with contextlib.suppress(aiohttp.ClientError, AssertionError, asyncio.TimeoutError):
        await pull(session, url, repo, image, tag)


async def test_kill_9_at_varied_moments_leaves_a_cache_that_agrees_with_itself(
    fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    upstreams = {"docker.io": fake.url}
    gone = {"docker.io": "http://127.0.0.1:9"}
    last: tuple[str, Image] | None = None
    for r in range(ROUNDS):
        # Each round: one image pulled to the end (and committed), then several at once, one
        # of them slow, and the proxy killed at the r-th upstream request of that burst.
        done = make_image(layer_sizes=(30_000, 200_000), seed=1000 + r)
        fake.add_image(f"library/done{r}", done, tag="v1")
        burst = [make_image(layer_sizes=(50_000, 300_000 + i), seed=2000 + 10 * r + i) for i in range(3)]
        for i, image in enumerate(burst):
            fake.add_image(f"library/burst{r}-{i}", image, tag="v1")
        fake.faults[burst[0].layers[1].digest] = BlobFaults(throttle_bps=2 * MiB)
        async with serving(cache, upstreams, logs=True) as proxy:
            await pull(session, proxy.url, f"library/done{r}", done, "v1")
            await proxy.logged(committed({b.digest for b in done.blobs}))
            last = (f"library/done{r}", done)
            reached = after_requests(fake, len(fake.seen) + 1 + r % 7)
            pulls = [
                asyncio.create_task(
                    pull_until_killed(session, proxy.url, f"library/burst{r}-{i}", image, "v1")
                )
                for i, image in enumerate(burst)
            ]
            await reached.wait()
            fake.observers.clear()
            proxy.proc.kill()
            await proxy.proc.wait()
            await asyncio.gather(*pulls)
        # Restarted with the upstream gone: the cache must agree with itself.
        async with serving(cache, gone) as proxy:
            assert list((cache / "tmp").iterdir()) == []
            rows, files = catalogue_rows(cache), files_on_disk(cache)
            assert rows == {d: len(data) for d, data in files.items()}
            for digest, data in files.items():
                assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
            assert last is not None
            await pull(session, proxy.url, last[0], last[1], "v1")
