"""Large cold blobs fetched as several ranged GETs at once; lazy ranges far ahead of a
download fetched for their client alone; several ranges of a cached blob at once. Correctness
only: the speed is loadtests' business."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP

import aiohttp
import pytest
import structlog

from proxy.core.reference import Digest
from proxy.flows.coverage import plan_parts
from proxy.web import keys
from tests.conftest import Proxy, StartProxy
from tests.support.fake_upstream import BlobFaults, FakeUpstream, Seen

MiB = 1024 * 1024
# Small numbers keep the tests quick; the mechanism is the same at 32 MiB.
SETTINGS = {"parallel_fill_threshold": 2 * MiB, "fill_connections": 4, "fill_chunk": 2 * MiB}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_gets(fake: FakeUpstream, digest: str) -> list[Seen]:
    return [s for s in fake.seen if s.method == "GET" and s.path.endswith(digest)]


def range_of(seen: Seen) -> tuple[int, int | None]:
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", seen.headers.get("range", ""))
    assert m is not None, seen.headers
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


async def fetch(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> bytes:
    async with session.get(url, headers=headers) as resp:
        assert resp.status in (200, 206), await resp.text()
        return await resp.read()


def url(proxy: Proxy, digest: str) -> str:
    return f"{proxy.url}/v2/library/app/blobs/{digest}"


async def test_a_large_blob_comes_in_parts_each_byte_once(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(11 * MiB + 12345)
    digest = fake.add_blob(data)
    proxy = await start_proxy({"docker.io": fake.url}, **SETTINGS)
    assert await fetch(session, url(proxy, digest)) == data
    spans = sorted(range_of(g) for g in blob_gets(fake, digest))
    # The first chunk, then chunks in order (the last one takes the crumb), each asked once.
    assert spans == [(p.start, p.end - 1) for p in plan_parts(len(data), 2 * MiB, 2 * MiB)]
    assert spans[:2] == [(0, 2 * MiB - 1), (2 * MiB, 4 * MiB - 1)]
    assert spans[-1][1] == len(data) - 1
    assert fake.sent_bytes[digest] == len(data)  # upstream sent each byte once
    assert digest in await proxy.cached()


async def test_a_broken_part_is_retried_alone(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(11 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(reset_at=7 * MiB, reset_times=1)  # inside the chunk [6, 8) MiB
    proxy = await start_proxy({"docker.io": fake.url}, **SETTINGS)
    assert await fetch(session, url(proxy, digest)) == data
    gets = blob_gets(fake, digest)
    chunks = len(plan_parts(len(data), 2 * MiB, 2 * MiB))
    assert len(gets) == chunks + 1
    resumed = range_of(gets[-1])
    # From where that chunk broke (what arrived of it, at most the 7 MiB sent), to its end.
    assert 6 * MiB < resumed[0] <= 7 * MiB
    assert resumed[1] == 8 * MiB - 1
    # Only what the broken connection lost in flight was sent twice.
    assert fake.sent_bytes[digest] == len(data) + (7 * MiB - resumed[0])


async def test_an_upstream_that_ignores_range_is_one_stream(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(9 * MiB)
    digest = fake.add_blob(data)
    fake.ignore_ranges = True
    proxy = await start_proxy({"docker.io": fake.url}, **SETTINGS)
    assert await fetch(session, url(proxy, digest)) == data
    assert len(blob_gets(fake, digest)) == 1
    assert fake.sent_bytes[digest] == len(data)
    assert digest in await proxy.cached()


async def test_a_corrupt_byte_in_a_later_part_aborts_every_client_and_caches_nothing(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(11 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(corrupt_at=10 * MiB)
    proxy = await start_proxy({"docker.io": fake.url}, **SETTINGS)
    for _ in range(2):
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(url(proxy, digest)) as resp:
                await resp.read()
    assert await proxy.cached() == set()
    assert proxy.temp_files() == []


async def test_readers_at_every_offset_get_the_right_bytes_while_parts_arrive(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    size = 10 * MiB
    data = os.urandom(size)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=5 * MiB)  # one part waits mid-way
    proxy = await start_proxy({"docker.io": fake.url}, **SETTINGS, lazy_range_gap=64 * MiB)
    whole = asyncio.create_task(fetch(session, url(proxy, digest)))
    await fake.faults[digest].stalled.wait()
    offsets = [
        0,
        1,
        2 * MiB - 1,
        2 * MiB,
        2 * MiB + 1,
        4 * MiB,
        5 * MiB - 1,
        5 * MiB,
        7 * MiB,
        size - 2,
        size - 1,
    ]
    spans = [(a, min(size - 1, a + 300_000)) for a in offsets] + [(3 * MiB, size - 1), (0, size - 1)]
    ranged = [
        asyncio.create_task(fetch(session, url(proxy, digest), {"Range": f"bytes={a}-{b}"})) for a, b in spans
    ]
    fake.faults[digest].resume()
    for (a, b), task in zip(spans, ranged, strict=True):
        assert await task == data[a : b + 1], (a, b)
    assert await whole == data
    assert fake.sent_bytes[digest] == size


async def test_a_range_far_ahead_of_a_cold_download_is_fetched_for_its_client(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    size = 12 * MiB
    data = os.urandom(size)
    digest = fake.add_blob(data)
    # Every part stalls one byte in: the download has started but is nowhere near 10 MiB.
    fake.faults[digest] = BlobFaults(stall_at=1)
    proxy = await start_proxy({"docker.io": fake.url}, parallel_fill_threshold=64 * MiB, lazy_range_gap=MiB)
    whole = asyncio.create_task(fetch(session, url(proxy, digest)))
    await fake.faults[digest].stalled.wait()
    first, last = 10 * MiB, 11 * MiB - 1
    fake.faults[digest].stall_at = None  # the lazy read's own request is not held up
    async with session.get(url(proxy, digest), headers={"Range": f"bytes={first}-{last}"}) as resp:
        assert resp.status == 206
        assert await resp.read() == data[first : last + 1]
        assert "ETag" not in resp.headers
    assert range_of(blob_gets(fake, digest)[-1]) == (first, last)
    fake.faults[digest].resume()
    assert await whole == data
    await proxy.cached()
    assert digest in await proxy.cached()


async def test_several_ranges_of_a_cached_blob_are_one_multipart_answer(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(3 * MiB)
    digest = fake.add_blob(data)
    proxy = await start_proxy({"docker.io": fake.url})
    assert await fetch(session, url(proxy, digest)) == data
    await proxy.cached()
    header = "bytes=0-9, 1000-1999, 1500-2500, 3145000-"
    async with session.get(url(proxy, digest), headers={"Range": header}) as resp:
        assert resp.status == 206
        assert resp.headers["ETag"] == f'"{digest}"'
        content_type = resp.headers["Content-Type"]
        assert content_type.startswith("multipart/byteranges; boundary=")
        body = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(body)
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = [(p["Content-Range"], p.get_payload(decode=True)) for p in message.iter_parts()]
    size = len(data)
    # Overlapping ranges are coalesced; the parts come in order.
    assert parts == [
        (f"bytes 0-9/{size}", data[0:10]),
        (f"bytes 1000-2500/{size}", data[1000:2501]),
        (f"bytes 3145000-{size - 1}/{size}", data[3145000:]),
    ]
    assert proxy.app[keys.CATALOGUE].entry(str(Digest.parse(digest))) is not None


async def test_a_range_in_a_chunk_no_connection_took_yet_is_fetched_for_its_client(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    # In parts, the first one alone (timed) and stalled: the chunk holding the range starts
    # less than the gap before it, and no connection has taken it (behind a shared link one
    # connection works through them all in order). Waiting would take the whole blob up to
    # there; it was judged "near" and joined.
    size = 24 * MiB
    data = os.urandom(size)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=1)
    proxy = await start_proxy({"docker.io": fake.url}, **SETTINGS, lazy_range_gap=4 * MiB)
    whole = asyncio.create_task(fetch(session, url(proxy, digest)))
    await fake.faults[digest].stalled.wait()
    first, last = 21 * MiB, 22 * MiB - 1  # 1 MiB into the chunk at 20 MiB
    fake.faults[digest].stall_at = None
    async with asyncio.timeout(60):  # joined, it would wait for the stalled download: a failure
        async with session.get(url(proxy, digest), headers={"Range": f"bytes={first}-{last}"}) as resp:
            assert resp.status == 206
            assert await resp.read() == data[first : last + 1]
    assert range_of(blob_gets(fake, digest)[-1]) == (first, last)
    fake.faults[digest].resume()
    assert await whole == data
    assert digest in await proxy.cached()


def attaching(monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[int]:
    """Each reader that joins a download, as it joins (where it starts): the moment a range
    request has chosen to wait for the download rather than fetch its bytes itself."""
    from proxy.flows.fill import Fill

    joined: asyncio.Queue[int] = asyncio.Queue()
    original = Fill.attach

    def attach(self: Fill, reader: int, at: int) -> None:
        original(self, reader, at)
        joined.put_nowait(at)

    monkeypatch.setattr(Fill, "attach", attach)
    return joined


@dataclass
class Stalled:
    """A whole-body pull of a cold blob whose download is stalled one byte in."""

    proxy: Proxy
    data: bytes
    digest: str
    whole: asyncio.Task[bytes]
    joined: asyncio.Queue[int]


async def stalled_download(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    **settings: object,
) -> Stalled:
    data = os.urandom(size)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=1)
    joined = attaching(monkeypatch)
    proxy = await start_proxy({"docker.io": fake.url}, parallel_fill_threshold=64 * MiB, **settings)
    whole = asyncio.create_task(fetch(session, url(proxy, digest)))
    await fake.faults[digest].stalled.wait()
    assert await joined.get() == 0  # the whole-body reader
    return Stalled(proxy, data, digest, whole, joined)


async def test_a_long_range_far_ahead_joins_the_download_instead_of_a_second_copy(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    info_logs: None,
) -> None:
    # containerd's 8 MiB chunks are a pull in parts: relaying each would fetch the blob twice
    # over the same link (the lazy-range scenario: 1.92 blobs upstream, 1.20x the time).
    run = await stalled_download(
        start_proxy, fake, session, monkeypatch, 12 * MiB, lazy_range_gap=MiB, lazy_range_max=MiB // 2
    )
    proxy, data, digest, whole, joined = run.proxy, run.data, run.digest, run.whole, run.joined
    first, last = 10 * MiB, 11 * MiB - 1  # 1 MiB: longer than lazy_range_max
    with structlog.testing.capture_logs() as logs:
        ranged = asyncio.create_task(fetch(session, url(proxy, digest), {"Range": f"bytes={first}-{last}"}))
        async with asyncio.timeout(60):  # it waits for the download, while it is stalled
            assert await joined.get() == first
        fake.faults[digest].resume()
        assert await ranged == data[first : last + 1]
        assert await whole == data
    assert (first, last) not in [range_of(s) for s in blob_gets(fake, digest) if "range" in s.headers]
    assert [e["cache"] for e in logs if e.get("event") == "request" and e["status"] == 206] == ["join"]


async def test_lazy_reads_of_one_download_stop_at_an_eighth_of_the_blob(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 16 MiB: an eighth is 2 MiB of lazy reads.
    run = await stalled_download(start_proxy, fake, session, monkeypatch, 16 * MiB, lazy_range_gap=MiB)
    proxy, data, digest, whole, joined = run.proxy, run.data, run.digest, run.whole, run.joined
    fake.faults[digest].stall_at = None  # the lazy reads' own requests are not held up
    spans = [(n * MiB, (n + 1) * MiB - 1) for n in (10, 12)]
    for first, last in spans:  # both fit in the share: each fetched for its client, at once
        got = await fetch(session, url(proxy, digest), {"Range": f"bytes={first}-{last}"})
        assert got == data[first : last + 1]
    assert [range_of(s) for s in blob_gets(fake, digest)][-2:] == spans
    first, last = 14 * MiB, 15 * MiB - 1  # past the share: it joins the download
    third = asyncio.create_task(fetch(session, url(proxy, digest), {"Range": f"bytes={first}-{last}"}))
    async with asyncio.timeout(60):  # fetched on its own instead, it never joins: a failure
        assert await joined.get() == first
    fake.faults[digest].resume()
    assert await third == data[first : last + 1]
    assert await whole == data
    assert (first, last) not in [range_of(s) for s in blob_gets(fake, digest) if "range" in s.headers]


async def test_a_lazy_read_upstream_would_not_range_leaves_the_share_to_the_next(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 16 MiB: an eighth is 2 MiB of lazy reads.
    run = await stalled_download(start_proxy, fake, session, monkeypatch, 16 * MiB, lazy_range_gap=MiB)
    proxy, data, digest, whole, joined = run.proxy, run.data, run.digest, run.whole, run.joined
    fake.faults[digest].stall_at = None
    fake.ignore_ranges = True  # the first lazy read's own request gets the whole blob: not relayed
    first, last = 8 * MiB, 9 * MiB - 1
    waiting = asyncio.create_task(fetch(session, url(proxy, digest), {"Range": f"bytes={first}-{last}"}))
    async with asyncio.timeout(60):
        assert await joined.get() == first  # it waits for the download instead
    fake.ignore_ranges = False
    spans = [(n * MiB, (n + 1) * MiB - 1) for n in (10, 12)]
    for lo, hi in spans:  # the share holds what was relayed, not what was asked: both relayed
        got = await fetch(session, url(proxy, digest), {"Range": f"bytes={lo}-{hi}"})
        assert got == data[lo : hi + 1]
    assert [range_of(s) for s in blob_gets(fake, digest)][-2:] == spans
    fake.faults[digest].resume()
    assert await waiting == data[first : last + 1]
    assert await whole == data
