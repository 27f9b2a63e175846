"""Cache policy: offline mode, tag rules and per-upstream TTLs, keeping tags upstream deleted,
pins, watermarks, max_unused, and a budget larger than the disk."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy.core.config import TagRule, UpstreamConfig
from proxy.core.reference import Digest
from proxy.web import keys
from tests.conftest import Proxy, StartProxy, make_settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, Image, make_image
from tests.support.proxyproc import serving
from tests.support.smallfs import small_fs

MiB = 1024 * 1024


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
        return resp.status, await resp.read()


async def pull_image(session: aiohttp.ClientSession, proxy: Proxy, repo: str, ref: str, image: Image) -> None:
    status, body = await get(session, f"{proxy.url}/v2/{repo}/manifests/{ref}")
    assert (status, body) == (200, image.manifest)
    for blob in image.blobs:
        status, body = await get(session, f"{proxy.url}/v2/{repo}/blobs/{blob.digest}")
        assert (status, body) == (200, blob.data)


def error(body: bytes) -> dict[str, object]:
    err: dict[str, object] = json.loads(body)["errors"][0]
    return err


async def test_offline_serves_what_it_holds_whatever_its_age_and_never_asks_upstream(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(seed=100)
    fake.add_image("library/app", image, tag="v1")
    other = make_image(seed=101)
    fake.add_image("library/app", other, tag="v2")
    cache = tmp_path / "cache"
    online = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    await pull_image(session, online, "library/app", "v1", image)
    await online.server.close()
    before = len(fake.seen)
    # Offline with a TTL long expired: the tag is answered from the catalogue all the same.
    proxy = await start_proxy({"docker.io": fake.url}, cache_dir=cache, offline=True, tag_ttl=0.0)
    await pull_image(session, proxy, "library/app", "v1", image)
    await pull_image(session, proxy, "library/app", image.manifest_digest, image)
    for path, code in (
        ("manifests/v2", "MANIFEST_UNKNOWN"),
        (f"manifests/{other.manifest_digest}", "MANIFEST_UNKNOWN"),
        (f"blobs/{other.layers[0].digest}", "BLOB_UNKNOWN"),
        # Held, but never confirmed for this repository: offline that cannot be asked.
        (f"blobs/{image.layers[0].digest}", "BLOB_UNKNOWN"),
    ):
        repo = "library/other" if path.endswith(image.layers[0].digest) else "library/app"
        status, body = await get(session, f"{proxy.url}/v2/{repo}/{path}")
        assert status == 404, path
        assert error(body)["code"] == code
        assert "offline" in str(error(body)["message"])
    async with session.head(f"{proxy.url}/v2/library/app/blobs/{other.layers[0].digest}") as resp:
        assert resp.status == 404
    status, body = await get(session, f"{proxy.url}/v2/library/app/tags/list")
    assert status == 200, body
    assert json.loads(body)["tags"] == ["v1"]
    assert len(fake.seen) == before  # not one connection


async def test_serve_says_it_is_offline(tmp_path: Path) -> None:
    async with serving(tmp_path / "cache", {"docker.io": "http://127.0.0.1:9"}, "--offline") as proxy:
        assert "offline" in proxy.banner


async def test_tag_rules_and_per_upstream_ttls(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    v1, v1_moved, latest = make_image(seed=102), make_image(seed=103), make_image(seed=104)
    fake.add_image("library/app", v1, tag="1.2.3")
    fake.add_image("library/app", latest, tag="latest")
    fake.add_image("library/app", latest, tag="edge")
    rules = (TagRule(re.compile(r"v?[0-9]+\.[0-9]+\.[0-9]+"), None), TagRule(re.compile("latest"), 0.0))
    settings = make_settings(tmp_path / "cache", {"docker.io": fake.url}, tag_ttl=3600.0, tag_rules=rules)
    proxy = await start_proxy(settings=settings)
    for tag in ("1.2.3", "latest", "edge"):
        assert (await get(session, f"{proxy.url}/v2/library/app/manifests/{tag}"))[0] == 200
    fake.add_image("library/app", v1_moved, tag="1.2.3")  # a release tag moved upstream
    heads = fake.count(method="HEAD", path_contains="/manifests/")
    for _ in range(3):
        # Trusted forever: the old answer, and upstream is not asked.
        assert await get(session, f"{proxy.url}/v2/library/app/manifests/1.2.3") == (200, v1.manifest)
        # TTL 0: revalidated every time; tag_ttl (an hour) for the rest.
        assert (await get(session, f"{proxy.url}/v2/library/app/manifests/latest"))[0] == 200
        assert (await get(session, f"{proxy.url}/v2/library/app/manifests/edge"))[0] == 200
    assert fake.count(method="HEAD", path_contains="/manifests/") == heads + 3
    assert fake.count(method="HEAD", path_contains="/manifests/latest") == 3
    # An upstream's own TTL beats the global one.
    assert settings.ttl_for(UpstreamConfig("x", "http://x", tag_ttl=5.0), "edge") == 5.0
    assert settings.ttl_for(UpstreamConfig("x", "http://x", tag_ttl_forever=True), "edge") is None
    assert settings.ttl_for(UpstreamConfig("x", "http://x", tag_ttl=5.0), "1.2.3") is None


@pytest.mark.parametrize("keep", [True, False])
async def test_a_tag_deleted_upstream(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keep: bool,
) -> None:
    image = make_image(seed=105)
    fake.add_image("library/app", image, tag="v1")
    ups = (UpstreamConfig("docker.io", fake.url, keep_deleted=keep),)
    settings = make_settings(tmp_path / "cache", {}, tag_ttl=0.0)
    proxy = await start_proxy(settings=replace(settings, upstreams=ups))
    assert await get(session, f"{proxy.url}/v2/library/app/manifests/v1") == (200, image.manifest)
    fake.delete_tag("library/app", "v1")
    status, body = await get(session, f"{proxy.url}/v2/library/app/manifests/v1")
    if keep:
        assert (status, body) == (200, image.manifest)
        assert "tag_deleted_upstream_kept" in capsys.readouterr().err
    else:
        assert status == 404  # faithful to upstream by default
        assert error(body)["code"] == "MANIFEST_UNKNOWN"


async def test_a_pinned_image_is_never_evicted(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    pinned = make_image(layer_sizes=(MiB, MiB), seed=106)
    fake.add_image("library/pinned", pinned, tag="v1")
    others = [make_image(layer_sizes=(MiB,), seed=107 + i) for i in range(6)]
    for i, image in enumerate(others):
        fake.add_image("library/other", image, tag=f"t{i}")
    proxy = await start_proxy(
        {"docker.io": fake.url}, max_cache_bytes=4 * MiB, pins=("docker.io/library/pinned:v1",)
    )
    await pull_image(session, proxy, "library/pinned", "v1", pinned)
    for i, image in enumerate(others):
        await pull_image(session, proxy, "library/other", f"t{i}", image)
    cached = await proxy.cached()
    assert {pinned.manifest_digest, *(b.digest for b in pinned.blobs)} <= cached
    assert others[0].layers[0].digest not in cached  # the unpinned oldest went
    assert proxy.app[keys.CACHE].total <= 4 * MiB


async def test_watermarks_set_where_eviction_starts_and_stops(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    blobs = [os.urandom(MiB) for _ in range(10)]
    digests = [fake.add_blob(b) for b in blobs]
    proxy = await start_proxy(
        {"docker.io": fake.url}, max_cache_bytes=10 * MiB, high_watermark=0.8, low_watermark=0.5
    )
    for digest in digests[:8]:
        assert (await get(session, f"{proxy.url}/v2/library/app/blobs/{digest}"))[0] == 200
        await proxy.cached()
    # At 8 MiB nothing happened yet (not above 80%); the ninth crosses it: down to 50%.
    assert proxy.app[keys.CACHE].total == 8 * MiB
    assert (await get(session, f"{proxy.url}/v2/library/app/blobs/{digests[8]}"))[0] == 200
    cached = await proxy.cached()
    assert proxy.app[keys.CACHE].total == 5 * MiB
    assert cached == set(digests[4:9])  # the oldest went first


async def test_max_unused_removes_what_nobody_asked_for(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    old, fresh = os.urandom(1000), os.urandom(1000)
    digests = [fake.add_blob(b) for b in (old, fresh)]
    proxy = await start_proxy({"docker.io": fake.url}, max_unused=3600.0)
    for digest in digests:
        assert (await get(session, f"{proxy.url}/v2/library/app/blobs/{digest}"))[0] == 200
    await proxy.cached()
    catalogue = proxy.app[keys.CATALOGUE]
    catalogue.blobs[digests[0]].last_used = time.time() - 7200  # as if last served two hours ago
    assert await proxy.app[keys.CACHE].sweep_unused() == 1
    assert await proxy.cached() == {digests[1]}


async def test_a_budget_larger_than_the_disk_is_lowered_to_it(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with small_fs(tmp_path / "disk", "4m") as disk:
        proxy = await start_proxy({"docker.io": fake.url}, cache_dir=disk / "cache")
        assert proxy.settings.max_cache_bytes == 20 * 1024**3
        assert proxy.app[keys.CACHE].max_bytes <= 4 * MiB
        assert "budget_exceeds_disk" in capsys.readouterr().err


async def test_an_evicted_manifest_takes_its_tags_with_it(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=120)
    fake.add_image("library/app", image, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url}, tag_ttl=3600.0)
    assert await get(session, f"{proxy.url}/v2/library/app/manifests/v1") == (200, image.manifest)
    await proxy.app[keys.CACHE].remove(Digest.parse(image.manifest_digest))
    assert proxy.app[keys.CATALOGUE].answers(("docker.io", "library/app", "v1")) == {}
    # The tag is a miss now, not an error: fetched again although its TTL has not run out.
    assert await get(session, f"{proxy.url}/v2/library/app/manifests/v1") == (200, image.manifest)
    assert fake.count(method="GET", path_contains="/manifests/v1") == 2
