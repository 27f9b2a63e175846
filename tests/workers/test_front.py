"""A front worker and its primary in this process: the primary on a loopback port and its
Unix socket, the worker's app on a port of its own (as ``serve --workers 2`` runs them, less
the second process and SO_REUSEPORT; tests/system/test_workers.py has those)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from proxy.core.authconfig import parse_auth
from proxy.web import keys
from proxy.web.accesslog import AccessLog
from proxy.web.workerlink import REPORT_PATH
from proxy.workers import front, internal
from proxy.workers.relay import Relay
from tests.conftest import Proxy, ProxyTestServer, StartProxy
from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, Image, make_image

ACCEPT = {"Accept": MANIFEST_ACCEPT}


class Lines:
    """An access log that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, fields: dict[str, Any]) -> None:
        self.lines.append(dict(fields))

    def flush(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pair:
    primary: Proxy
    worker_url: str
    front: front.Front
    log: Lines
    clock: Clock
    socket_path: str
    unix: web.UnixSite

    async def stop_primary_socket(self) -> None:
        """From here on the worker cannot reach the primary: the socket is gone, and so are
        the connections its pool kept open."""
        await self.unix.stop()
        kept = self.front.primary
        self.front.primary = Relay(f"{self.socket_path}.gone", kept.index, 60.0)
        await self.front.primary.open()
        await kept.close()


StartPair = Callable[..., Awaitable[Pair]]


@pytest.fixture
async def start_pair(start_proxy: StartProxy) -> AsyncIterator[StartPair]:
    servers: list[ProxyTestServer] = []
    dirs: list[str] = []

    async def start(upstreams: dict[str, str], **overrides: Any) -> Pair:
        primary = await start_proxy(upstreams, workers=2, **overrides)
        where = tempfile.mkdtemp(prefix="oc-")  # a socket path is at most 107 bytes
        dirs.append(where)
        socket_path = f"{where}/primary.sock"
        assert primary.server.runner is not None
        unix = web.UnixSite(primary.server.runner, socket_path)
        await unix.start()
        log = Lines()
        access: AccessLog = log
        clock = Clock()
        secret = primary.app[keys.WORKER_SECRET]
        app = front.create_app(primary.settings, socket_path, access, secret=secret, clock=clock)
        server = ProxyTestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        the_front = app[front.FRONT]
        the_front.runner = server.runner
        return Pair(primary, f"http://127.0.0.1:{server.port}", the_front, log, clock, socket_path, unix)

    yield start
    for server in servers:
        await server.close()
    for where in dirs:
        shutil.rmtree(where, ignore_errors=True)


def manifest_gets(fake: FakeUpstream) -> int:
    return fake.count(method="GET", path_contains="/manifests/")


async def tag_fetched(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession, seed: int
) -> tuple[Pair, Image, str]:
    """A pair (tag_ttl 3600) whose worker has relayed one pull of library/app:v1: the pair, the
    image and the tag's URL at the worker."""
    image = make_image(seed=seed)
    fake.add_image("library/app", image, tag="v1")
    pair = await start_pair({"docker.io": fake.url}, tag_ttl=3600)
    url = f"{pair.worker_url}/v2/library/app/manifests/v1"
    async with session.get(url, headers=ACCEPT) as resp:
        assert resp.status == 200
    return pair, image, url


async def sent_by_worker(pair: Pair, session: aiohttp.ClientSession, digest: str, data: bytes) -> str:
    """The blob's URL at the worker, once relayed (a miss), committed by the primary, and then
    sent by the worker itself from the cache's file."""
    url = f"{pair.worker_url}/v2/library/app/blobs/{digest}"
    async with session.get(url) as resp:
        assert await resp.read() == data
    await pair.primary.cached()
    async with session.get(url) as resp:
        assert await resp.read() == data
    assert pair.log.lines[-1]["cache"] == "hit"
    return url


async def test_a_warm_manifest_is_answered_by_the_worker_until_its_reuse_time_is_up(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=70)
    fake.add_image("library/app", image, tag="v1")
    pair = await start_pair({"docker.io": fake.url}, tag_ttl=3600)
    url = f"{pair.worker_url}/v2/library/app/manifests/v1"
    async with session.get(url, headers=ACCEPT) as resp:
        assert resp.status == 200 and await resp.read() == image.manifest
        assert not [h for h in resp.headers if h.lower().startswith(internal.PREFIX)]
    assert pair.log.lines == []  # relayed: the primary wrote that line
    await pair.stop_primary_socket()  # from here on the primary cannot be asked
    for _ in range(3):
        async with session.get(url, headers=ACCEPT) as resp:
            assert resp.status == 200 and await resp.read() == image.manifest
            assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
            assert not [h for h in resp.headers if h.lower().startswith(internal.PREFIX)]
    async with session.head(url, headers=ACCEPT) as resp:
        assert resp.status == 200 and resp.content_length == len(image.manifest)
    assert [(line["cache"], line["worker"]) for line in pair.log.lines] == [("hit", 1)] * 4
    pair.clock.now += internal.REUSE_MAX
    async with session.get(url, headers=ACCEPT) as resp:
        assert resp.status == 503  # its time is up: asked the primary, which is gone
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert manifest_gets(fake) == 1


async def test_another_accept_or_reference_is_not_the_same_request(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    pair, _, url = await tag_fetched(start_pair, fake, session, seed=71)
    await pair.stop_primary_socket()
    for headers in ({"Accept": "application/vnd.oci.image.index.v1+json"}, {}):
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 503
    async with session.get(f"{pair.worker_url}/v2/library/other/manifests/v1", headers=ACCEPT) as resp:
        assert resp.status == 503


async def test_a_tag_with_no_ttl_left_is_never_reused_by_a_worker(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=72)
    fake.add_image("library/app", image, tag="v1")
    pair = await start_pair({"docker.io": fake.url}, tag_ttl=0)
    url = f"{pair.worker_url}/v2/library/app/manifests/v1"
    for _ in range(3):
        async with session.get(url, headers=ACCEPT) as resp:
            assert resp.status == 200 and await resp.read() == image.manifest
    # Every one went to the primary, which asked upstream every time (tag_ttl 0).
    assert fake.count(path_contains="/manifests/v1") == 3
    assert len(pair.front.manifests) == 0


async def test_a_purge_reaches_the_worker_within_its_reuse_time(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=73)
    fake.add_image("library/app", image, tag="v1")
    pair = await start_pair({"docker.io": fake.url}, tag_ttl=3600)
    url = f"{pair.worker_url}/v2/library/app/manifests/{image.manifest_digest}"
    async with session.get(url, headers=ACCEPT) as resp:
        assert resp.status == 200
    await pair.primary.app[keys.CACHE].remove(_digest(image.manifest_digest), purge=True)
    fake.delete_tag("library/app", "v1")
    fake._manifests.clear()  # upstream no longer has it either
    async with session.get(url, headers=ACCEPT) as resp:
        assert resp.status == 200  # within the second the primary allowed
    pair.clock.now += internal.REUSE_MAX
    async with session.get(url, headers=ACCEPT) as resp:
        assert resp.status == 404


def _digest(text: str) -> Any:
    from proxy.core.reference import Digest

    return Digest.parse(text)


async def test_a_cached_blob_is_sent_by_the_worker_from_the_cache_file(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = bytes(range(256)) * 4096
    digest = fake.add_blob(data)
    pair = await start_pair({"docker.io": fake.url})
    url = f"{pair.worker_url}/v2/library/app/blobs/{digest}"
    async with session.get(url) as resp:
        assert resp.status == 200 and await resp.read() == data
    assert pair.log.lines == []  # a miss: relayed, logged by the primary
    await pair.primary.cached()
    async with session.get(url) as resp:
        assert resp.status == 200 and await resp.read() == data
        assert resp.headers["ETag"] == f'"{digest}"'
    async with session.get(url, headers={"Range": "bytes=100-199,1000-1009"}) as resp:
        assert resp.status == 206 and resp.content_type == "multipart/byteranges"
        body = await resp.read()
        assert data[100:200] in body and data[1000:1010] in body
    async with session.head(url) as resp:
        assert resp.status == 200 and resp.content_length == len(data)
    assert [(line["status"], line["cache"]) for line in pair.log.lines] == [
        (200, "hit"),
        (206, "hit"),
        (200, "hit"),
    ]
    assert fake.count(method="GET", path_contains="/blobs/") == 1


async def test_a_blob_cached_for_one_repository_is_not_the_workers_to_send_for_another(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = b"team layer" * 10_000
    digest = fake.add_blob(data, repos=["team/app"])
    pair = await start_pair({"docker.io": fake.url})
    async with session.get(f"{pair.worker_url}/v2/team/app/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == data
    await pair.primary.cached()
    async with session.get(f"{pair.worker_url}/v2/other/app/blobs/{digest}") as resp:
        assert resp.status == 404
        assert await resp.read() != data
    assert pair.log.lines == []  # refused by the primary (its line), never sent by the worker


async def test_a_cached_file_cut_short_while_the_worker_sends_it_aborts_the_client(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = b"x" * (4 * 1024 * 1024)
    digest = fake.add_blob(data)
    pair = await start_pair({"docker.io": fake.url})
    url = f"{pair.worker_url}/v2/library/app/blobs/{digest}"
    async with session.get(url) as resp:
        assert await resp.read() == data
    await pair.primary.cached()
    async with session.get(url, headers={"Range": "bytes=0-9"}) as resp:
        assert resp.status == 206  # confirmed: the worker holds the file open now
    path = pair.primary.app[keys.STORAGE].blob_path(_digest(digest))
    with open(path, "r+b") as f:
        f.truncate(1024 * 1024)
    async with session.get(url) as resp:
        assert resp.status == 200 and resp.content_length == len(data)
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_a_body_the_primary_cuts_short_is_cut_short_for_the_client(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = bytes(range(256)) * 8192
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(corrupt_at=1000)
    pair = await start_pair({"docker.io": fake.url}, blob_retries=0)
    async with session.get(f"{pair.worker_url}/v2/library/app/blobs/{digest}") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_clients_cannot_speak_for_a_worker(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = b"layer" * 1000
    digest = fake.add_blob(data)
    pair = await start_pair({"docker.io": fake.url})
    spoof = {internal.PROBE: "1", internal.CLIENT: "10.9.8.7", internal.REUSE: "1", internal.WORKER: "7"}
    # Through the worker: the client's own internal headers are dropped before the relay.
    async with session.get(f"{pair.worker_url}/v2/library/app/blobs/{digest}", headers=spoof) as resp:
        assert resp.status == 200 and await resp.read() == data
        assert internal.FILE not in resp.headers
    # Straight to the primary's port: they mean nothing there.
    async with session.head(f"{pair.primary.url}/v2/library/app/blobs/{digest}", headers=spoof) as resp:
        assert resp.status == 200 and internal.FILE not in resp.headers
    async with session.get(f"{pair.primary.url}/v2/library/app/manifests/nope", headers=spoof) as resp:
        assert internal.REUSE not in resp.headers
    async with session.post(f"{pair.primary.url}{REPORT_PATH}", data=b'{"requests": []}') as resp:
        assert resp.status == 404


async def test_the_workers_answers_are_counted_in_the_primarys_metrics(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    pair, _, url = await tag_fetched(start_pair, fake, session, seed=74)
    for _ in range(3):
        async with session.get(url, headers=ACCEPT) as resp:
            assert resp.status == 200
    await pair.front.report()
    async with session.get(f"{pair.worker_url}/metrics") as resp:  # relayed like the rest
        text = await resp.text()
    hits = 'ocicache_requests_total{cache="hit",kind="manifests",status="200",upstream="docker.io"}'
    misses = 'ocicache_requests_total{cache="miss",kind="manifests",status="200",upstream="docker.io"}'
    assert f"{hits} 3.0" in text and f"{misses} 1.0" in text
    top = pair.primary.app[keys.PULLS].top(1)
    assert top[0][0] == ("docker.io", "library/app", "v1") and top[0][1].pulls == 4


async def test_a_report_that_is_not_one_is_refused(start_pair: StartPair, fake: FakeUpstream) -> None:
    pair = await start_pair({"docker.io": fake.url})
    conn = aiohttp.UnixConnector(path=pair.socket_path)
    secret = {internal.SECRET: pair.front.secret}
    async with aiohttp.ClientSession(connector=conn) as unix:
        # Over the primary's socket, but without this run's secret: not a worker's.
        for headers in ({}, {internal.SECRET: "guess"}):
            async with unix.post(f"http://ocicache{REPORT_PATH}", data=b"{}", headers=headers) as resp:
                assert resp.status == 404
        for body in (b"[[[[" * 5000, b'{"requests": [["a", "b", true, "c", 1, 1]]}', b"{}", b"\xff"):
            async with unix.post(f"http://ocicache{REPORT_PATH}", data=body, headers=secret) as resp:
                assert resp.status in (204, 400), body
                if resp.status == 400:
                    assert (await resp.json())["errors"][0]["code"] == "REQUEST_INVALID"


async def test_with_client_auth_an_answer_is_reused_only_for_the_same_credentials(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(seed=75)
    fake.add_image("library/app", image, tag="v1")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'ci-pw', bcrypt.gensalt(4)).decode()}\n")
    auth = parse_auth("auth", {"htpasswd": str(htpasswd), "anonymous": False})
    pair = await start_pair({"docker.io": fake.url}, tag_ttl=3600, auth=auth)
    url = f"{pair.worker_url}/v2/library/app/manifests/v1"
    ci = {"Authorization": "Basic " + base64.b64encode(b"ci:ci-pw").decode(), **ACCEPT}
    async with session.get(url, headers=ci) as resp:
        assert resp.status == 200
    for headers in (ACCEPT, {"Authorization": "Basic " + base64.b64encode(b"ci:wrong").decode(), **ACCEPT}):
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 401, headers
    async with session.get(url, headers=ci) as resp:
        assert resp.status == 200 and await resp.read() == image.manifest
    assert [(line["user"], line["cache"]) for line in pair.log.lines] == [("ci", "hit")]


async def test_the_primary_gone_is_a_503_envelope(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    pair = await start_pair({"docker.io": fake.url})
    await pair.stop_primary_socket()
    async with session.get(f"{pair.worker_url}/v2/") as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        doc = json.loads(await resp.read())
        assert doc["errors"][0]["code"] == "UNAVAILABLE"
    assert pair.log.lines[-1]["status"] == 503


async def test_the_workers_connections_are_counted_in_the_primarys(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    pair = await start_pair({"docker.io": fake.url})
    port = int(pair.worker_url.rpartition(":")[2])
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    try:
        async with session.get(f"{pair.worker_url}/v2/") as resp:
            assert resp.status == 200  # the worker has taken all six by now
        await pair.front.report()
        async with session.get(f"{pair.primary.url}/metrics") as resp:
            text = await resp.text()
        # The worker's five idle ones and the session's, and the primary's own (this one).
        assert float(re.search(r"^ocicache_connections (\S+)$", text, re.M)[1]) >= 7  # type: ignore[index]
    finally:
        for _, writer in idle:
            writer.close()
