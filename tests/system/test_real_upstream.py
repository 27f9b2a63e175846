"""A real client (skopeo) pulls through ocicache from a real upstream (Debian's docker-registry),
and a restarted ocicache serves what it cached with that upstream gone."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp

from tests.conftest import StartProxy
from tests.support.images import Index, make_image, make_index, push_image, push_index
from tests.support.layout import assert_image_in_layout, layout_blobs
from tests.support.proxyproc import serving
from tests.support.registry import Registry, running_registry

SKOPEO_TIMEOUT = 300


async def skopeo_copy(src: str, dest: Path, *extra: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        *extra,
        src,
        f"oci:{dest}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), SKOPEO_TIMEOUT)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_skopeo_pulls_through_the_proxy_and_the_second_pull_is_cached(
    start_proxy: StartProxy, registry: Registry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(layer_sizes=(2048, 3_000_000, 70_000), seed=11)
    await push_image(session, registry.url, "library/app", image, tag="v1")
    pushed_gets = registry.blob_gets()
    proxy = await start_proxy({"docker.io": registry.url})

    await skopeo_copy(f"docker://{proxy.host}/library/app:v1", tmp_path / "first")
    assert_image_in_layout(tmp_path / "first", image)
    registry.wait_for_requests(
        lambda reqs: (
            sum(1 for r in reqs if "/blobs/" in r.path and r.method == "GET")
            >= pushed_gets + len(image.blobs)
        )
    )
    after_first = registry.blob_gets()
    assert after_first - pushed_gets == len(image.blobs)  # one upstream GET per blob
    for blob in image.blobs:
        assert blob.digest in (await proxy.cached())

    # A one-component Docker Hub name gets "library/" like on Docker Hub.
    await skopeo_copy(f"docker://{proxy.host}/app:v1", tmp_path / "second")
    assert_image_in_layout(tmp_path / "second", image)
    assert registry.blob_gets() == after_first


async def test_skopeo_copies_a_multi_platform_index(
    start_proxy: StartProxy, registry: Registry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    amd, arm = make_image(seed=21, arch="amd64"), make_image(seed=22, arch="arm64")
    index = make_index([amd, arm])
    await push_index(session, registry.url, "library/multi", index, tag="v1")
    proxy = await start_proxy({"docker.io": registry.url})
    await skopeo_copy(f"docker://{proxy.host}/library/multi:v1", tmp_path / "all", "--all")
    blobs = layout_blobs(tmp_path / "all")
    assert blobs[index.digest] == index.manifest
    for image in (amd, arm):
        assert blobs[image.manifest_digest] == image.manifest
        assert_image_in_layout(tmp_path / "all", image)


async def test_restart_serves_the_cache_with_upstream_gone(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(layer_sizes=(1000, 200_000), seed=31)
    index: Index = make_index([make_image(seed=32), make_image(seed=33, arch="arm64")])
    cache = tmp_path / "cache"
    with running_registry(tmp_path / "registry") as registry:
        await push_image(session, registry.url, "library/app", image, tag="v1")
        await push_index(session, registry.url, "library/multi", index, tag="v1")
        upstreams = {"docker.io": registry.url}
        async with serving(cache, upstreams, "--tag-ttl", "3600") as proxy:
            await skopeo_copy(f"docker://{proxy.host}/library/app:v1", tmp_path / "warm")
            await skopeo_copy(f"docker://{proxy.host}/library/multi:v1", tmp_path / "warm-multi", "--all")
    # The upstream is gone now; the proxy starts anyway and serves from its cache.
    async with serving(cache, upstreams, "--tag-ttl", "3600") as proxy:
        await skopeo_copy(f"docker://{proxy.host}/library/app:v1", tmp_path / "by-tag")
        assert_image_in_layout(tmp_path / "by-tag", image)
        await skopeo_copy(
            f"docker://{proxy.host}/library/app@{image.manifest_digest}", tmp_path / "by-digest"
        )
        assert_image_in_layout(tmp_path / "by-digest", image)
        await skopeo_copy(f"docker://{proxy.host}/library/multi:v1", tmp_path / "multi", "--all")
        assert layout_blobs(tmp_path / "multi")[index.digest] == index.manifest
        async with session.get(f"{proxy.url}/v2/library/app/blobs/{image.layers[1].digest}") as resp:
            assert resp.status == 200
            assert await resp.read() == image.layers[1].data
        # Something never cached is an honest 503, not a hang or a 500.
        async with session.get(f"{proxy.url}/v2/library/other/manifests/v1") as resp:
            assert resp.status == 503
            assert json.loads(await resp.read())["errors"][0]["code"] == "UNAVAILABLE"
    assert not os.listdir(cache / "tmp")
