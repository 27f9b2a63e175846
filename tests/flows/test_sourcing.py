"""Replicas in one process (two apps on one redis-server), attacked: a lease that expires while its
holder still fills, a peer that sends wrong bytes, peer requests without the cluster token, a
lease that names this very replica, and Redis slow under a replica."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.cluster.cluster import Cluster
from proxy.cluster.keys import lease_key, locations_key
from proxy.core.authconfig import AuthConfig
from proxy.core.clusterconfig import ClusterConfig
from proxy.core.config import UpstreamConfig
from proxy.core.peering import MISS_HEADER, PEER_HEADER
from proxy.core.reference import Digest
from proxy.flows.engine import running
from proxy.web import keys
from tests.conftest import Proxy, StartProxy, make_settings
from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image
from tests.support.redisserver import RedisServer
from tests.support.tcprelay import Relay

MiB = 1024 * 1024
TOKEN = "a-cluster-token-of-some-length"


def cluster_cfg(url: str, lease_ttl: float = 1.5, timeout: float = 0.5) -> ClusterConfig:
    return ClusterConfig(redis=url, token_env="T", token=TOKEN, lease_ttl=lease_ttl, timeout=timeout)


async def replica(
    start_proxy: StartProxy, fake: FakeUpstream, url: str, tmp_path: Path, name: str, **kw: object
) -> Proxy:
    return await start_proxy(
        {"docker.io": fake.url}, cache_dir=tmp_path / name, cluster=cluster_cfg(url), fill_connections=1, **kw
    )


def cluster_of(proxy: Proxy) -> Cluster:
    return proxy.app[keys.CLUSTER]


def event(proxy: Proxy, name: str) -> asyncio.Event:
    happened = asyncio.Event()
    cluster_of(proxy).observers.append(lambda e, _: happened.set() if e == name else None)
    return happened


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def body_or_abort(session: aiohttp.ClientSession, url: str) -> bytes | None:
    """The body, or None when the connection was aborted; a clean end of a wrong body fails."""
    try:
        async with session.get(url) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()
    except aiohttp.ClientPayloadError:
        return None


def blob_gets(fake: FakeUpstream) -> int:
    return fake.count(origin="registry", method="GET", path_contains="/blobs/")


async def test_a_holder_whose_lease_expired_and_was_taken_stops_fetching_and_follows_the_new_one(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=2 * MiB)
    a = await replica(start_proxy, fake, redis_server.url, tmp_path, "a")
    b = await replica(start_proxy, fake, redis_server.url, tmp_path, "b")
    lost = event(a, "lease_lost")
    first = asyncio.create_task(body_or_abort(session, f"{a.url}/v2/library/app/blobs/{digest}"))
    await fake.faults[digest].stalled.wait()
    # A's renewals did not get through in time (Redis slow, the loop blocked): its lease
    # expired, and B, asked for the blob, takes it and fetches from upstream itself.
    await cluster_of(a).state.client.delete(lease_key(digest))
    second = asyncio.create_task(body_or_abort(session, f"{b.url}/v2/library/app/blobs/{digest}"))
    await lost.wait()
    # A noticed at its next renewal, closed its upstream stream and follows B from where it is.
    fill = a.app[keys.FILLS].get(Digest.parse(digest))
    assert fill is not None
    fake.faults[digest].resume()
    assert await first == data
    assert await second == data
    assert fill.upstream_gets == 1 and fill.peer_gets >= 1
    assert blob_gets(fake) == 2  # A's first GET and B's: no third, and A asked upstream no more
    assert digest in await a.cached() and digest in await b.cached()


async def test_a_peer_that_sends_wrong_bytes_is_caught_and_not_asked_again(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    data = os.urandom(MiB)
    digest = fake.add_blob(data)
    asked: list[str] = []

    async def liar(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Authorization", ""))
        return web.Response(
            body=os.urandom(len(data)),
            headers={"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"},
        )

    app = web.Application()
    app.router.add_get("/v2/{tail:.*}", liar)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    liar_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        a = await replica(start_proxy, fake, redis_server.url, tmp_path, "a")
        await cluster_of(a).state.client.sadd(locations_key(digest), liar_url)
        # The first client gets the lie cut off, never a clean end.
        assert await body_or_abort(session, f"{a.url}/v2/library/app/blobs/{digest}") is None
        assert asked == [f"Bearer {TOKEN}"]
        assert liar_url.encode() not in await cluster_of(a).state.client.smembers(locations_key(digest))
        # The next one is fetched from upstream, verified, and the liar is not asked again.
        await cluster_of(a).state.client.sadd(locations_key(digest), liar_url)
        assert await body_or_abort(session, f"{a.url}/v2/library/app/blobs/{digest}") == data
        assert len(asked) == 1
        assert blob_gets(fake) == 1
        metrics = await (await session.get(f"{a.url}/metrics")).text()
        assert 'ocicache_cluster_total{event="peer_bad_bytes"} 1.0' in metrics
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("auth", [False, True])
async def test_peer_requests_need_the_cluster_token_and_nothing_else(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    auth: bool,
) -> None:
    data = os.urandom(100_000)
    digest = fake.add_blob(data)
    # With client auth on, anonymous clients are refused: a peer passes on its token alone.
    extra = {"auth": AuthConfig(anonymous=False, tokens_env="T", env_tokens="ci:" + "c" * 20)} if auth else {}
    a = await replica(start_proxy, fake, redis_server.url, tmp_path, "a", **extra)
    url = f"{a.url}/v2/library/app/blobs/{digest}?ns=docker.io"
    me = {PEER_HEADER: "http://127.0.0.1:1"}
    for headers in (
        me,
        {**me, "Authorization": "Bearer wrong-token-of-some-length"},
        {**me, "Authorization": "Basic eDp5"},
    ):
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    # With the token: a peer is not a client. It is told we have nothing (and nothing is fetched
    # for it), then served once we hold it, whatever the client rules say.
    peer = {**me, "Authorization": f"Bearer {TOKEN}"}
    async with session.get(url, headers=peer) as resp:
        assert resp.status == 404 and resp.headers[MISS_HEADER] == "1"
    assert blob_gets(fake) == 0
    client = {"Authorization": "Bearer " + "c" * 20} if auth else {}
    async with session.get(url, headers=client) as resp:
        assert await resp.read() == data
    async with session.get(url, headers=peer) as resp:
        assert resp.status == 200 and await resp.read() == data
    metrics = await (await session.get(f"{a.url}/metrics", headers=client)).text()
    assert 'ocicache_cluster_total{event="peer_refused"} 3.0' in metrics
    assert 'ocicache_cluster_total{event="peer_served_blobs"} 1.0' in metrics


async def test_a_lease_naming_this_replica_is_not_followed_into_itself(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    data = os.urandom(MiB)
    digest = fake.add_blob(data)
    a = await replica(start_proxy, fake, redis_server.url, tmp_path, "a")
    # A lease from another process that advertised our own address (our previous life, or a
    # replica given our --advertise): following it would be asking ourselves.
    await cluster_of(a).state.client.set(lease_key(digest), f"previous {cluster_of(a).me}".encode(), px=1000)
    assert await body_or_abort(session, f"{a.url}/v2/library/app/blobs/{digest}") == data
    assert blob_gets(fake) == 1
    metrics = await (await session.get(f"{a.url}/metrics")).text()
    assert "peer_served" not in metrics and 'cache="peer-miss"' not in metrics
    assert 'ocicache_cluster_total{event="lease_taken"} 1.0' in metrics


async def test_a_replica_with_redis_stalled_serves_alone(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    data = os.urandom(MiB)
    digest = fake.add_blob(data)
    async with Relay(redis_server.port) as relay:
        a = await replica(start_proxy, fake, relay.url, tmp_path, "a")
        relay.set("stall")
        assert await body_or_abort(session, f"{a.url}/v2/library/app/blobs/{digest}") == data
        metrics = await (await session.get(f"{a.url}/metrics")).text()
        assert "ocicache_cluster_redis_up 0.0" in metrics
        relay.set("pass")


async def test_a_command_line_engine_does_not_join_the_cluster(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # prefetch, import and rm run an engine of their own: listed as holding what they fetched,
    # they would send peers to an address nobody serves.
    settings = make_settings(
        tmp_path / "cache", {"docker.io": "http://127.0.0.1:9"}, cluster=cluster_cfg(redis_server.url)
    )
    async with running(settings) as engine:
        assert engine.cluster is None
    async with running(settings, serving=True) as engine:
        assert engine.cluster is not None


async def test_tag_answers_manifests_and_tokens_are_shared_between_replicas(
    start_proxy: StartProxy, redis_server: RedisServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with FakeUpstream(auth="bearer") as fake:
        image = make_image(layer_sizes=(10_000,), seed=1402)
        fake.add_image("library/app", image, tag="v1")
        ups = (UpstreamConfig("docker.io", fake.url, realm_hosts=("127.0.0.1",)),)
        a, b = [
            await start_proxy(
                settings=replace(
                    make_settings(tmp_path / name, {}, cluster=cluster_cfg(redis_server.url)), upstreams=ups
                )
            )
            for name in ("a", "b")
        ]
        url = "/v2/library/app/manifests/v1"
        async with session.get(a.url + url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
            assert await resp.read() == image.manifest
        tokens = fake.count(origin="token")
        manifests = fake.count(path_contains="/manifests/")
        async with session.get(b.url + url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
            assert await resp.read() == image.manifest
            assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
        # B answered from what A shared: no manifest request upstream, no token either.
        assert fake.count(path_contains="/manifests/") == manifests
        assert fake.count(origin="token") == tokens
        # A blob B must fetch itself... it streams from A if A holds it; here nobody does, so B
        # fetches it, with A's token for the scope.
        layer = image.layers[0]
        async with session.get(f"{b.url}/v2/library/app/blobs/{layer.digest}") as resp:
            assert await resp.read() == layer.data
        assert fake.count(origin="token") == tokens
