"""Upstream bodies (manifests, tags lists, token answers) are read to their end, whatever the
packets, and refused past their limit: never cut short and passed on as if whole."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.core.config import UpstreamConfig
from proxy.upstream import client as upstream_client
from tests.conftest import StartProxy, make_settings
from tests.support.fake_upstream import BlobFaults, FakeUpstream, tags_key
from tests.support.images import MANIFEST_ACCEPT, OCI_MANIFEST, make_image


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
        return resp.status, await resp.read()


def tag_names(count: int) -> list[str]:
    return [f"release-{i:05d}-" + "x" * 100 for i in range(count)]


async def test_a_tags_list_that_arrives_in_pieces_is_passed_on_whole(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    manifest = make_image(seed=70).manifest
    names = tag_names(1500)
    for name in names:
        fake.add_manifest("library/app", manifest, OCI_MANIFEST, tag=name)
    # Upstream sends the first 100 KB, then waits: one read sees only part of the body.
    faults = fake.faults[tags_key("library/app")] = BlobFaults(stall_at=100_000)
    proxy = await start_proxy({"docker.io": fake.url}, tags_page_max=5000)
    request = asyncio.create_task(fetch(session, f"{proxy.url}/v2/library/app/tags/list?n=5000"))
    await faults.stalled.wait()
    faults.resume()
    status, body = await request
    assert status == 200
    assert json.loads(body)["tags"] == sorted(names)


async def test_a_tags_list_cut_by_upstream_is_not_passed_on(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    manifest = make_image(seed=71).manifest
    for name in tag_names(500):
        fake.add_manifest("library/app", manifest, OCI_MANIFEST, tag=name)
    fake.faults[tags_key("library/app")] = BlobFaults(reset_at=20_000, reset_times=100)
    proxy = await start_proxy({"docker.io": fake.url})
    async with session.get(f"{proxy.url}/v2/library/app/tags/list") as resp:
        assert resp.status == 503
        assert json.loads(await resp.read())["errors"][0]["code"] == "UNAVAILABLE"


async def test_a_tags_list_over_the_limit_or_not_json_is_502(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = make_image(seed=72).manifest
    for name in tag_names(200):
        fake.add_manifest("library/app", manifest, OCI_MANIFEST, tag=name)
    monkeypatch.setattr(upstream_client, "TAGS_MAX", 10_000)
    proxy = await start_proxy({"docker.io": fake.url})
    async with session.get(f"{proxy.url}/v2/library/app/tags/list") as resp:
        assert resp.status == 502
        assert json.loads(await resp.read())["errors"][0]["code"] == "UPSTREAM_ERROR"
    monkeypatch.setattr(upstream_client, "TAGS_MAX", 4 * 1024 * 1024)
    fake.add_manifest("library/broken", manifest, OCI_MANIFEST, tag="v1")
    real = fake._tags_list

    async def not_json(request: aiohttp.web.Request, name: str) -> aiohttp.web.StreamResponse:
        if name == "library/broken":
            return aiohttp.web.Response(body=b"<html>maintenance</html>", content_type="text/html")
        return await real(request, name)

    monkeypatch.setattr(fake, "_tags_list", not_json)
    async with session.get(f"{proxy.url}/v2/library/broken/tags/list") as resp:
        assert resp.status == 502


async def test_a_manifest_that_arrives_in_pieces_is_whole(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(layer_sizes=[100] * 3000, seed=73)  # a manifest of about 500 KB
    digest = fake.add_manifest("library/app", image.manifest, OCI_MANIFEST, tag="v1")
    faults = fake.faults[digest] = BlobFaults(stall_at=len(image.manifest) // 2)
    proxy = await start_proxy({"docker.io": fake.url})
    request = asyncio.create_task(fetch(session, f"{proxy.url}/v2/library/app/manifests/v1"))
    await faults.stalled.wait()
    faults.resume()
    assert await request == (200, image.manifest)


async def test_a_token_answer_over_its_limit_is_refused(
    start_proxy: StartProxy, session: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_client, "TOKEN_MAX", 16)
    async with FakeUpstream(auth="bearer") as fake:
        fake.add_manifest("library/app", make_image(seed=74).manifest, OCI_MANIFEST, tag="v1")
        ups = (UpstreamConfig("docker.io", fake.url, realm_hosts=("127.0.0.1",)),)
        proxy = await start_proxy(settings=replace(make_settings(tmp_path / "cache", {}), upstreams=ups))
        async with session.get(
            f"{proxy.url}/v2/library/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        ) as resp:
            assert resp.status == 502
            assert json.loads(await resp.read())["errors"][0]["code"] == "UPSTREAM_ERROR"


# Deeper than json.loads recurses: it raised RecursionError, which no caller expected, and a
# hostile upstream turned the pull into a 500.
DEEP = b"[" * 100_000


async def test_a_manifest_nested_too_deeply_is_an_upstream_error(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.add_manifest("library/app", DEEP, OCI_MANIFEST, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    status, body = await fetch(session, f"{proxy.url}/v2/library/app/manifests/v1")
    assert status == 502
    assert json.loads(body)["errors"][0]["code"] == "UPSTREAM_ERROR"


async def test_a_tags_list_nested_too_deeply_is_an_upstream_error(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.add_manifest("library/app", make_image(seed=72).manifest, OCI_MANIFEST, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    # The fake's tags list is its own JSON; serve the deep one in its place.
    fake.add_manifest("library/deep", DEEP, OCI_MANIFEST, tag="v1")
    original = fake._tags_list

    async def deep_tags(request: web.Request, name: str) -> web.StreamResponse:
        if name == "library/deep":
            return web.Response(body=DEEP, content_type="application/json")
        return await original(request, name)

    fake._tags_list = deep_tags  # type: ignore[method-assign]
    status, body = await fetch(session, f"{proxy.url}/v2/library/deep/tags/list")
    assert status == 502
    assert json.loads(body)["errors"][0]["code"] == "UPSTREAM_ERROR"
