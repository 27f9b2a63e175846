"""Single-flight fills: one upstream GET per blob, streamed to every client that waits for it,
verified before the last byte, resumed when upstream breaks, cleaned up when it fails."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass

import aiohttp
import pytest

from proxy.core.reference import Digest
from proxy.flows.fills import Fill
from proxy.web import keys
from tests.conftest import Proxy, StartProxy
from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, OCI_MANIFEST, make_image

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def users_reached(proxy: Proxy, n: int) -> asyncio.Event:
    """An event set once some fill has ``n`` readers at the same time."""
    reached = asyncio.Event()

    def observe(fill: Fill) -> None:
        if fill.users >= n:
            reached.set()

    proxy.app[keys.FILLS].join_observers.append(observe)
    return reached


async def fetch(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> bytes:
    async with session.get(url, headers=headers) as resp:
        assert resp.status in (200, 206), await resp.text()
        return await resp.read()


async def fetch_expecting_abort(session: aiohttp.ClientSession, url: str) -> int:
    """Read until the connection breaks; returns how many bytes arrived. Fails on a clean end."""
    got = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(url) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                got += len(chunk)
    return got


def blob_url(proxy: Proxy, digest: str) -> str:
    return f"{proxy.url}/v2/library/app/blobs/{digest}"


async def test_fifty_concurrent_clients_share_one_upstream_get(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=4 * MiB)
    proxy = await start_proxy({"docker.io": fake.url})
    url = blob_url(proxy, digest)
    all_joined = users_reached(proxy, 50)
    clients = [asyncio.create_task(fetch(session, url)) for _ in range(50)]
    # Every client is attached to the one download before upstream sends the second half.
    await all_joined.wait()
    await fake.faults[digest].stalled.wait()
    fake.faults[digest].resume()
    bodies = await asyncio.gather(*clients)
    assert all(sha(body) == digest for body in bodies)
    assert fake.count(origin="registry", method="GET", path_contains="/blobs/") == 1
    assert digest in (await proxy.cached())
    metrics = (await (await session.get(f"{proxy.url}/metrics")).read()).decode()
    assert 'ocicache_requests_total{cache="join",kind="blobs",status="200"} 49.0' in metrics
    assert 'ocicache_requests_total{cache="miss",kind="blobs",status="200"} 1.0' in metrics


async def test_headers_and_first_bytes_arrive_before_the_download_ends(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=1 * MiB)
    proxy = await start_proxy({"docker.io": fake.url})
    url = blob_url(proxy, digest)
    async with session.get(url) as first, session.get(url) as joiner:
        for resp in (first, joiner):
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(data))
            # Upstream is stalled at 1 MiB, yet both already receive bytes.
            assert await resp.content.readexactly(512 * 1024) == data[: 512 * 1024]
        async with session.head(url) as head:  # HEAD under fill answers from the fill's size
            assert head.status == 200
            assert head.headers["Content-Length"] == str(len(data))
        fake.faults[digest].resume()
        assert await first.content.read() == data[512 * 1024 :]
        assert await joiner.content.read() == data[512 * 1024 :]


async def test_first_client_leaving_early_does_not_stop_the_others(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(10 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=2 * MiB)
    proxy = await start_proxy({"docker.io": fake.url})
    url = blob_url(proxy, digest)
    joined = users_reached(proxy, 4)
    leaver = await session.get(url)
    others = [asyncio.create_task(fetch(session, url)) for _ in range(3)]
    await joined.wait()
    await leaver.content.readexactly(MiB)  # 10%, then it hangs up
    leaver.close()
    fake.faults[digest].resume()
    assert all(body == data for body in await asyncio.gather(*others))
    assert digest in (await proxy.cached())


@dataclass
class Reading:
    """A client part-way through a cold blob whose upstream is stalled at 1 MiB."""

    proxy: Proxy
    data: bytes
    digest: str
    url: str
    resp: aiohttp.ClientResponse
    fill: Fill
    task: asyncio.Task[None]


async def stalled_reading(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, **settings: object
) -> Reading:
    data = os.urandom(3 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=MiB)
    proxy = await start_proxy({"docker.io": fake.url}, **settings)
    url = blob_url(proxy, digest)
    resp = await session.get(url)
    await resp.content.readexactly(1000)
    fill = proxy.app[keys.FILLS].get(Digest.parse(digest))
    assert fill is not None and fill.task is not None
    return Reading(proxy, data, digest, url, resp, fill, fill.task)


async def test_fill_completes_when_every_client_has_left(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    r = await stalled_reading(start_proxy, fake, session)
    r.resp.close()
    fake.faults[r.digest].resume()
    await r.task
    assert r.digest in (await r.proxy.cached())
    assert await fetch(session, r.url) == r.data
    assert fake.count(origin="registry", method="GET", path_contains="/blobs/") == 1


async def test_abandoned_fill_is_cancelled_when_configured(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    r = await stalled_reading(start_proxy, fake, session, cancel_abandoned_fills=True)
    r.resp.close()
    with pytest.raises(asyncio.CancelledError):
        await r.task
    assert r.digest not in (await r.proxy.cached())
    assert r.proxy.temp_files() == []


async def test_upstream_reset_midway_is_resumed_with_range(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(6 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(reset_at=3 * MiB, reset_times=1)
    proxy = await start_proxy({"docker.io": fake.url})
    url = blob_url(proxy, digest)
    bodies = await asyncio.gather(*(fetch(session, url) for _ in range(3)))
    assert all(body == data for body in bodies)
    gets = [s for s in fake.seen if s.method == "GET" and "/blobs/" in s.path]
    assert len(gets) == 2
    # The first asks from 0 (for the first part of a blob that might be large); the resume
    # asks for the rest, from where the reset left it.
    assert gets[0].headers["range"].startswith("bytes=0-")
    start = int(gets[1].headers["range"].removeprefix("bytes=").partition("-")[0])
    assert 0 < start <= 3 * MiB
    assert digest in (await proxy.cached())


async def test_upstream_failing_for_good_aborts_every_client(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(2 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(reset_at=MiB, reset_times=100)
    proxy = await start_proxy({"docker.io": fake.url}, blob_retries=2)
    url = blob_url(proxy, digest)
    got = await asyncio.gather(*(fetch_expecting_abort(session, url) for _ in range(3)))
    assert all(n < len(data) for n in got)
    assert digest not in (await proxy.cached())
    assert proxy.temp_files() == []
    assert fake.count(origin="registry", method="GET", path_contains="/blobs/") == 3  # 1 + 2 retries


async def test_corrupt_byte_aborts_every_client_and_nothing_is_cached(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(3 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(corrupt_at=2 * MiB, stall_at=MiB)
    proxy = await start_proxy({"docker.io": fake.url})
    url = blob_url(proxy, digest)
    joined = users_reached(proxy, 5)
    clients = [asyncio.create_task(fetch_expecting_abort(session, url)) for _ in range(5)]
    await joined.wait()
    fake.faults[digest].resume()
    got = await asyncio.gather(*clients)
    # Everything but the held-back final byte may have arrived; never the whole body.
    assert all(n < len(data) for n in got)
    assert digest not in (await proxy.cached())
    assert proxy.temp_files() == []
    # Upstream mends its storage: the next pull starts a fresh fill and succeeds.
    del fake.faults[digest]
    assert await fetch(session, url) == data
    assert digest in (await proxy.cached())
    assert fake.count(origin="registry", method="GET", path_contains="/blobs/") == 2


async def test_parallel_ranges_of_a_cold_blob_share_one_download(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    size = 8 * MiB
    data = os.urandom(size)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=MiB)
    proxy = await start_proxy({"docker.io": fake.url})
    url = blob_url(proxy, digest)
    quarter = size // 4
    spans = [(i * quarter, (i + 1) * quarter - 1) for i in range(4)]
    joined = users_reached(proxy, 32)
    clients = [
        asyncio.create_task(fetch(session, url, {"Range": f"bytes={a}-{b}"}))
        for _ in range(8)
        for a, b in spans
    ]
    await joined.wait()
    fake.faults[digest].resume()
    parts = await asyncio.gather(*clients)
    for i, part in enumerate(parts):
        a, b = spans[i % 4]
        assert part == data[a : b + 1]
    assert fake.count(origin="registry", method="GET", path_contains="/blobs/") == 1


async def test_a_stalled_reader_holds_back_neither_the_fill_nor_fast_readers(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(32 * MiB)
    digest = fake.add_blob(data)
    proxy = await start_proxy({"docker.io": fake.url})
    url = blob_url(proxy, digest)
    slow = await session.get(url)
    await slow.content.readexactly(1024)  # then reads nothing more while the rest run
    fast = await asyncio.gather(*(fetch(session, url) for _ in range(3)))
    assert all(body == data for body in fast)
    # The download finished and committed with the slow reader still attached.
    assert digest in (await proxy.cached())
    assert proxy.app[keys.FILLS].get(Digest.parse(digest)) is None
    rest = await slow.content.read()
    assert data[:1024] + rest == data
    slow.close()


async def test_no_temp_file_remains_after_a_hundred_failed_or_abandoned_fills(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url}, blob_retries=0, cancel_abandoned_fills=True)
    for i in range(100):
        data = os.urandom(256 * 1024 + i)
        digest = fake.add_blob(data)
        url = blob_url(proxy, digest)
        if i % 2:
            fake.faults[digest] = BlobFaults(corrupt_at=i)
            await fetch_expecting_abort(session, url)
        else:
            fake.faults[digest] = BlobFaults(stall_at=1000)
            resp = await session.get(url)
            await resp.content.readexactly(100)
            fill = proxy.app[keys.FILLS].get(Digest.parse(digest))
            assert fill is not None and fill.task is not None
            resp.close()
            with pytest.raises(asyncio.CancelledError):
                await fill.task
    assert proxy.temp_files() == []
    assert (await proxy.cached()) == set()
    assert len(proxy.app[keys.FILLS]) == 0


async def test_no_task_is_left_when_the_app_shuts_down(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    r = await stalled_reading(start_proxy, fake, session)
    await r.proxy.server.close()
    assert r.task.done()
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.resp.content.read()  # cut off, not a clean short end
    fill_tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("fill ")]
    assert fill_tasks == []
    assert r.proxy.temp_files() == []


async def test_with_cancel_abandoned_fills_every_finished_download_is_cached(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    # A client that got the verified last byte leaves while the fill still fsyncs and renames:
    # that fill must not be cancelled as abandoned.
    proxy = await start_proxy({"docker.io": fake.url}, cancel_abandoned_fills=True)
    blobs = {fake.add_blob(os.urandom(MiB + i)): i for i in range(20)}
    for digest in blobs:
        assert sha(await fetch(session, blob_url(proxy, digest))) == digest
    cached = await proxy.cached()
    assert set(blobs) <= cached
    # The index knows every file on disk, and nothing else.
    cache = proxy.app[keys.CACHE]
    assert len(cache) == len(cached)
    assert cache.total == sum(b.size for b in proxy.app[keys.STORAGE].scan())
    metrics = (await (await session.get(f"{proxy.url}/metrics")).read()).decode()
    assert 'ocicache_fills_total{outcome="committed"} 20.0' in metrics


async def range_during_stall(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    faults: BlobFaults,
    **settings: object,
) -> tuple[Proxy, bytes, str, asyncio.Task[int]]:
    """A cold 1 MiB blob whose fill is stalled upstream at 512 KiB, with one whole-body reader."""
    data = os.urandom(MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = faults
    proxy = await start_proxy({"docker.io": fake.url}, **settings)
    whole = asyncio.create_task(fetch_expecting_abort(session, blob_url(proxy, digest)))
    await faults.stalled.wait()
    return proxy, data, digest, whole


async def test_a_range_of_a_fill_is_served_early_but_promises_nothing_and_is_reported(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    faults = BlobFaults(stall_at=512 * 1024, corrupt_at=10)
    proxy, data, digest, whole = await range_during_stall(start_proxy, fake, session, faults)
    headers = {"Range": "bytes=0-99", "User-Agent": "lazy-puller/1.0"}
    async with session.get(blob_url(proxy, digest), headers=headers) as resp:
        assert resp.status == 206
        assert await resp.read() != data[:100]  # upstream's bad bytes, sent before the check
        assert "ETag" not in resp.headers
        assert "immutable" not in resp.headers.get("Cache-Control", "")
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Docker-Content-Digest"] == digest
    faults.resume()
    assert await whole < len(data)  # the whole body is aborted, as ever
    await proxy.app[keys.FILLS].settled()
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "unverified_ranges_of_failed_fill" in line)
    assert "lazy-puller/1.0" in line and "127.0.0.1" in line
    assert digest not in await proxy.cached()


async def test_verified_ranges_only_waits_for_the_digest(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    faults = BlobFaults(stall_at=512 * 1024, corrupt_at=10)
    proxy, _, digest, whole = await range_during_stall(
        start_proxy, fake, session, faults, verified_ranges_only=True
    )
    ranged = asyncio.create_task(session.get(blob_url(proxy, digest), headers={"Range": "bytes=0-99"}))
    faults.resume()
    resp = await ranged
    # The fill failed before anything was sent: an honest error, not bad bytes.
    assert resp.status == 502
    resp.release()
    await whole
    # A good blob: the range arrives after verification, with the verified headers.
    del fake.faults[digest]
    good = BlobFaults(stall_at=512 * 1024)
    other = fake.add_blob(os.urandom(MiB))
    fake.faults[other] = good
    whole2 = asyncio.create_task(fetch(session, blob_url(proxy, other)))
    await good.stalled.wait()
    ranged = asyncio.create_task(session.get(blob_url(proxy, other), headers={"Range": "bytes=0-99"}))
    good.resume()
    resp = await ranged
    assert resp.status == 206
    assert resp.headers["ETag"] == f'"{other}"'
    assert sha(await whole2) == other
    resp.release()


async def test_downloads_beyond_the_connection_limit_wait_their_turn_and_manifests_do_not(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    limit, extra = 4, 3
    blobs = [fake.add_blob(os.urandom(256 * 1024 + i)) for i in range(limit + extra)]
    for digest in blobs:
        fake.faults[digest] = BlobFaults(stall_at=1000)
    manifest = make_image(seed=80).manifest
    fake.add_manifest("library/app", manifest, OCI_MANIFEST, tag="v1")
    # A connect timeout far shorter than the wait: waiting for a turn is not connecting.
    proxy = await start_proxy(
        {"docker.io": fake.url}, upstream_blob_connections=limit, blob_connect_timeout=0.05
    )
    slots = proxy.app[keys.UPSTREAMS]["docker.io"].blob_slots
    queued = asyncio.Event()
    slots.observers.append(lambda s: queued.set() if s.waiting == extra and s.busy == limit else None)
    clients = [asyncio.create_task(fetch(session, blob_url(proxy, d))) for d in blobs]
    await queued.wait()
    # Every connection is busy with a stalled blob; a manifest still gets through at once.
    async with session.get(
        f"{proxy.url}/v2/library/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == manifest
    for digest in blobs:
        fake.faults[digest].resume()
    bodies = await asyncio.gather(*clients)
    assert [sha(b) for b in bodies] == blobs
    assert fake.count(method="GET", path_contains="/blobs/") == limit + extra
