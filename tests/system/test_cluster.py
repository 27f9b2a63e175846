"""Replicas as real processes (``python -m proxy serve --redis``) sharing Debian's redis-server,
on loopback ports: one upstream GET per blob across them, a lease holder killed mid-fill, Redis
stopped and started again, skopeo pulling through every replica at once, and the other set-up,
a node cache chained to a site cache."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.images import make_image
from tests.support.layout import layout_blobs
from tests.support.proxyproc import ProxyProcess, serving
from tests.support.redisserver import RedisServer
from tests.system.test_clients import run_tool

MiB = 1024 * 1024
TOKEN = "cluster-token-for-tests-0123456789"
CLIENTS = 30


@pytest.fixture(autouse=True)
def _cluster_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CLUSTER_TOKEN", TOKEN)


def cluster_env(lease_ttl: float = 3.0) -> str:
    return f"{{token_env: TEST_CLUSTER_TOKEN, lease_ttl: {lease_ttl}, timeout: 0.5}}"


@asynccontextmanager
async def replicas(
    n: int, upstream: str, redis: RedisServer, tmp_path: Path, *, lease_ttl: float = 3.0
) -> AsyncIterator[list[ProxyProcess]]:
    os.environ["OCICACHE_CLUSTER"] = cluster_env(lease_ttl)
    try:
        async with AsyncExitStack() as stack:
            procs = [
                await stack.enter_async_context(
                    serving(tmp_path / f"cache{i}", {"docker.io": upstream}, "--redis", redis.url, logs=True)
                )
                for i in range(n)
            ]
            yield procs
    finally:
        del os.environ["OCICACHE_CLUSTER"]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_gets(fake: FakeUpstream) -> int:
    return fake.count(origin="registry", method="GET", path_contains="/blobs/")


async def metric(session: aiohttp.ClientSession, proxy: ProxyProcess, name: str) -> float:
    async with session.get(f"{proxy.url}/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Client:
    """One client's pull of a blob: headers first (then it is attached to a download), then the
    body, which either verifies or ends with the connection aborted."""

    def __init__(self, session: aiohttp.ClientSession, url: str, digest: str) -> None:
        self.session, self.url, self.digest = session, url, digest
        self.attached = asyncio.Event()
        self.received = 0
        self.progress = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> str:
        """'verified', or 'aborted'; a clean end of a wrong body fails the test."""
        hasher = hashlib.sha256()
        try:
            async with self.session.get(self.url) as resp:
                assert resp.status == 200, await resp.text()
                self.attached.set()
                async for chunk in resp.content.iter_any():
                    hasher.update(chunk)
                    self.received += len(chunk)
                    self.progress.set()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return "aborted"
        assert "sha256:" + hasher.hexdigest() == self.digest, "a clean end of a wrong body"
        return "verified"

    async def got(self, n: int) -> None:
        while self.received < n:
            self.progress.clear()
            await self.progress.wait()


def spread(
    session: aiohttp.ClientSession, procs: list[ProxyProcess], digest: str, n: int = CLIENTS
) -> list[tuple[ProxyProcess, Client]]:
    placed = []
    for i in range(n):
        proxy = procs[i % len(procs)]
        placed.append((proxy, Client(session, f"{proxy.url}/v2/library/app/blobs/{digest}", digest)))
    return placed


async def test_three_replicas_thirty_clients_one_cold_blob_one_upstream_get(
    fake: FakeUpstream, redis_server: RedisServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=4 * MiB)
    async with replicas(3, fake.url, redis_server, tmp_path) as procs:
        clients = spread(session, procs, digest)
        # Every client has its headers while upstream is stalled half-way: all 30, on three
        # replicas, hang on the one download.
        await fake.faults[digest].stalled.wait()
        await asyncio.gather(*(c.attached.wait() for _, c in clients))
        fake.faults[digest].resume()
        outcomes = await asyncio.gather(*(c.task for _, c in clients))
        assert outcomes == ["verified"] * CLIENTS
        assert blob_gets(fake) == 1
        served = [
            await metric(session, p, 'ocicache_cluster_total{event="peer_served_bytes"}') for p in procs
        ]
        fetched = [
            await metric(session, p, 'ocicache_cluster_total{event="peer_fetched_blobs"}') for p in procs
        ]
        taken = [await metric(session, p, 'ocicache_cluster_total{event="lease_taken"}') for p in procs]
        # One replica fetched it from upstream; the other two streamed it from that one.
        assert sorted(taken) == [0, 0, 1]
        assert sorted(fetched) == [0, 1, 1]
        assert sum(served) == 2 * len(data)


async def test_lease_holder_killed_mid_fill_the_others_take_over_and_every_body_verifies_or_aborts(
    fake: FakeUpstream, redis_server: RedisServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=4 * MiB)
    async with replicas(3, fake.url, redis_server, tmp_path) as procs:
        clients = spread(session, procs, digest, n=9)
        await fake.faults[digest].stalled.wait()
        await asyncio.gather(*(c.attached.wait() for _, c in clients))
        redis = aioredis.Redis.from_url(redis_server.url)
        try:
            raw = await redis.get(f"ocicache:lease:{digest}")
        finally:
            await redis.aclose()
        assert isinstance(raw, bytes)
        holder_url = raw.decode().split(" ", 1)[1]
        [holder] = [p for p in procs if p.url == holder_url]
        survivors = [p for p in procs if p is not holder]
        # The survivors' clients have bytes that came through the holder: the takeover resumes.
        await asyncio.gather(*(c.got(MiB) for p, c in clients if p is not holder))
        holder.proc.kill()  # SIGKILL, its lease left to expire
        await holder.proc.wait()
        fake.faults[digest].resume()  # what upstream sends from here on flows
        outcomes: dict[str, list[str]] = {p.url: [] for p in procs}
        for p, c in clients:
            outcomes[p.url].append(await c.task)
        assert set(outcomes[holder.url]) <= {"aborted", "verified"}
        for p in survivors:
            assert outcomes[p.url] == ["verified"] * 3, outcomes
        # The original GET, and one replica's resumption at the offset it had, with Range.
        gets = [s for s in fake.seen if s.method == "GET" and "/blobs/" in s.path]
        assert len(gets) == 2
        assert gets[1].headers["range"].startswith("bytes=") and not gets[1].headers["range"].startswith(
            "bytes=0-"
        )
        over = [
            await metric(session, p, 'ocicache_cluster_total{event="lease_taken_over"}') for p in survivors
        ]
        assert sorted(over) == [0, 1]


def logged(event: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(e.get("event") == event for e in events)


def logged_times(event: str, n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: sum(1 for e in events if e.get("event") == event) >= n


async def test_redis_stopped_every_replica_serves_its_cache_and_rejoins_when_it_returns(
    fake: FakeUpstream, redis_server: RedisServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    warm, cold, later = (os.urandom(MiB + i) for i in range(3))
    warm_digest, cold_digest, later_digest = (fake.add_blob(b) for b in (warm, cold, later))
    async with replicas(3, fake.url, redis_server, tmp_path) as procs:
        for proxy in procs:  # the first fetches it, the others stream it from there
            async with session.get(f"{proxy.url}/v2/library/app/blobs/{warm_digest}") as resp:
                assert await resp.read() == warm
        assert blob_gets(fake) == 1

        redis_server.stop()
        before = blob_gets(fake)
        for proxy in procs:
            async with session.get(f"{proxy.url}/v2/library/app/blobs/{warm_digest}") as resp:
                assert resp.status == 200
                assert await resp.read() == warm
        assert blob_gets(fake) == before  # from each replica's own cache
        # A cold blob now: each replica is a cache of its own, says so, and serves it.
        for proxy in procs:
            async with session.get(f"{proxy.url}/v2/library/app/blobs/{cold_digest}") as resp:
                assert resp.status == 200
                assert await resp.read() == cold
            await proxy.logged(logged("cluster_redis_down"))
            assert await metric(session, proxy, "ocicache_cluster_redis_up") == 0
            async with session.get(f"{proxy.url}/readyz") as resp:  # still taking traffic
                assert resp.status == 200
                ready = await resp.json()
            assert ready["cluster"]["mode"] == "degraded" and ready["cluster"]["redis"] == "down"

        redis_server.start()  # the same port, empty
        for proxy in procs:
            await proxy.logged(logged_times("cluster_redis_up", 2))
            assert await metric(session, proxy, "ocicache_cluster_redis_up") == 1
            async with session.get(f"{proxy.url}/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["cluster"] == {
                    "mode": "cluster",
                    "redis": "up",
                    "advertise": proxy.url,
                }
        # Single-flight across replicas again.
        fake.faults[later_digest] = BlobFaults(stall_at=MiB // 2)
        before = blob_gets(fake)
        clients = spread(session, procs, later_digest, n=6)
        await fake.faults[later_digest].stalled.wait()
        await asyncio.gather(*(c.attached.wait() for _, c in clients))
        fake.faults[later_digest].resume()
        assert await asyncio.gather(*(c.task for _, c in clients)) == ["verified"] * 6
        assert blob_gets(fake) == before + 1


async def test_skopeo_pulls_one_cold_image_through_every_replica_at_once(
    fake: FakeUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    image = make_image(layer_sizes=(3 * MiB, 700_000, 20_000), seed=1401)
    fake.add_image("library/app", image, tag="v1")
    async with replicas(3, fake.url, redis_server, tmp_path) as procs:
        pulls = [
            run_tool(
                "skopeo",
                "copy",
                "--src-tls-verify=false",
                f"docker://{proxy.host}/library/app:v1",
                f"oci:{tmp_path / f'layout{i}'}",
                env=dict(os.environ),
            )
            for i, proxy in enumerate(procs)
        ]
        for code, out in await asyncio.gather(*pulls):
            assert code == 0, out
    for i in range(3):
        blobs = layout_blobs(tmp_path / f"layout{i}")
        for blob in image.blobs:
            assert blobs[blob.digest] == blob.data
    for blob in image.blobs:
        assert fake.count(origin="registry", method="GET", path_contains=f"/blobs/{blob.digest}") == 1


async def test_node_caches_chained_to_a_site_cache_cost_upstream_one_get(
    fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    digest = fake.add_blob(data)
    async with serving(tmp_path / "site", {"docker.io": fake.url}) as site:
        async with (
            serving(tmp_path / "node1", {"docker.io": site.url}) as node1,
            serving(tmp_path / "node2", {"docker.io": site.url}) as node2,
        ):
            for node in (node1, node2):
                async with session.get(f"{node.url}/v2/library/app/blobs/{digest}") as resp:
                    assert resp.status == 200
                    assert sha(await resp.read()) == digest
    assert blob_gets(fake) == 1
