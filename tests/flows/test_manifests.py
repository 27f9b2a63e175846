"""Manifests through the proxy against the fake upstream: what a body is decides its type,
what is not a manifest is never stored or served as one, a layer is never read as a manifest,
and a full disk does not cost the client its manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp
import pytest

from proxy.core.mediatypes import accept_key
from proxy.core.reference import Digest
from proxy.flows.manifests import choose_answer
from proxy.store.catalogue import TagAnswer
from proxy.store.storage import Storage
from proxy.web import keys
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    make_image,
    make_index,
)
from tests.support.smallfs import fill_up, small_fs

MiB = 1024 * 1024


def _answer(digest: str, media_type: str, fetched: float = 1.0) -> TagAnswer:
    return TagAnswer(digest, media_type, fetched)


def test_a_single_manifest_answer_serves_only_its_own_accept_set() -> None:
    amd = _answer("sha256:amd", DOCKER_MANIFEST)
    answers = {accept_key(frozenset({DOCKER_MANIFEST})): amd}
    assert choose_answer(answers, frozenset({DOCKER_MANIFEST})) == amd
    assert choose_answer(answers, frozenset({DOCKER_MANIFEST, DOCKER_LIST})) is None
    assert choose_answer(answers, None) is None


def test_an_answer_to_a_set_with_every_index_type_is_the_stored_manifest() -> None:
    single = _answer("sha256:one", OCI_MANIFEST)
    answers = {accept_key(None): single}
    # Upstream had no index to give a client that accepted both kinds: this is the tag's own.
    assert choose_answer(answers, frozenset({OCI_MANIFEST})) == single
    assert choose_answer(answers, frozenset({OCI_MANIFEST, OCI_INDEX})) == single
    assert choose_answer(answers, frozenset({DOCKER_MANIFEST})) is None


def test_an_index_answer_serves_every_set_that_accepts_its_type() -> None:
    listed = _answer("sha256:list", DOCKER_LIST)
    answers = {accept_key(frozenset({DOCKER_MANIFEST, DOCKER_LIST})): listed}
    assert choose_answer(answers, None) == listed
    assert choose_answer(answers, frozenset({DOCKER_LIST, OCI_INDEX})) == listed
    assert choose_answer(answers, frozenset({DOCKER_MANIFEST})) is None


async def get_manifest(
    session: aiohttp.ClientSession, url: str, accept: str | None = MANIFEST_ACCEPT
) -> tuple[int, str, bytes]:
    headers = {"Accept": accept} if accept is not None else {}
    async with session.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["errors"][0]["code"]
    return code


async def test_a_captive_portal_page_is_refused_and_not_stored(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    page = b"<html><body>Please log in to the hotel wifi</body></html>"
    fake.add_manifest("library/app", page, "text/html", tag="v1")
    proxy = await start_proxy({"docker.io": fake.url}, tag_ttl=3600)
    for _ in range(2):
        status, content_type, body = await get_manifest(
            session, f"{proxy.url}/v2/library/app/manifests/v1", accept=OCI_MANIFEST
        )
        assert status == 502
        assert content_type.startswith("application/json")
        assert error_code(body) == "UPSTREAM_ERROR"
    # Nothing was kept: each request went upstream again, and no file holds the page.
    assert fake.count(method="GET", path_contains="/manifests/") == 2
    assert await proxy.cached() == set()


@pytest.mark.parametrize("header", ["application/octet-stream", "application/json", "text/plain", ""])
async def test_the_content_type_is_the_manifests_own(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, header: str
) -> None:
    image = make_image(seed=41)
    digest = fake.add_manifest("library/app", image.manifest, header, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    for ref in ("v1", digest, "v1"):  # miss, by digest (stored), then a hit by tag
        status, content_type, body = await get_manifest(
            session, f"{proxy.url}/v2/library/app/manifests/{ref}"
        )
        assert status == 200
        assert content_type == OCI_MANIFEST
        assert body == image.manifest


async def test_an_oci_manifest_without_media_type_is_typed_by_its_shape(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=42)
    doc = json.loads(image.manifest)
    del doc["mediaType"]
    body = json.dumps(doc).encode()
    fake.add_manifest("library/app", body, "application/octet-stream", tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    status, content_type, got = await get_manifest(session, f"{proxy.url}/v2/library/app/manifests/v1")
    assert (status, content_type, got) == (200, OCI_MANIFEST, body)


async def test_an_upstream_that_ignores_accept_never_gets_an_unaccepted_type_to_the_client(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    # The fake does no negotiation: it answers its OCI index whatever the client accepts.
    index = make_index([make_image(seed=43), make_image(seed=44, arch="arm64")])
    fake.add_manifest("library/multi", index.manifest, OCI_INDEX, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url}, tag_ttl=3600)
    url = f"{proxy.url}/v2/library/multi/manifests/v1"
    status, _, body = await get_manifest(session, url, accept=DOCKER_MANIFEST)
    assert status == 404
    assert error_code(body) == "MANIFEST_UNKNOWN"
    # A client that accepts the index gets it, and the refusal above did not stick to the tag.
    status, content_type, body = await get_manifest(session, url)
    assert (status, content_type, body) == (200, OCI_INDEX, index.manifest)
    status, _, _ = await get_manifest(session, url, accept=DOCKER_MANIFEST)
    assert status == 404


async def test_a_layer_asked_for_as_a_manifest_is_never_read_or_served_as_one(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = os.urandom(5 * MiB)  # over the manifest size limit
    small = os.urandom(64 * 1024)  # under it
    digests = [fake.add_blob(big), fake.add_blob(small)]
    proxy = await start_proxy({"docker.io": fake.url})
    for digest in digests:
        async with session.get(f"{proxy.url}/v2/library/app/blobs/{digest}") as resp:
            assert resp.status == 200
            await resp.read()
    assert set(digests) <= await proxy.cached()

    def no_reads(self: Storage, *args: object) -> bytes | None:
        raise AssertionError("a cached blob was read as a manifest")

    monkeypatch.setattr(Storage, "read_bytes", no_reads)
    for digest in digests:
        for repo in ("library/app", "library/other"):
            status, content_type, body = await get_manifest(
                session, f"{proxy.url}/v2/{repo}/manifests/{digest}"
            )
            # Upstream has no such manifest, and says so; the layer's bytes never go out.
            assert status == 404, body[:200]
            assert error_code(body) == "MANIFEST_UNKNOWN"
            assert content_type.startswith("application/json")


async def test_a_stored_manifest_changed_on_disk_is_fetched_again_not_served(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(seed=45)
    digest = fake.add_manifest("library/app", image.manifest, OCI_MANIFEST, tag="v1")
    cache = tmp_path / "cache"
    first = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    assert (await get_manifest(session, f"{first.url}/v2/library/app/manifests/{digest}"))[0] == 200
    stored = first.app[keys.STORAGE].blob_path(Digest.parse(digest))
    await first.server.close()
    stored.write_bytes(image.manifest[:-10] + b"0" * 10)  # same size, other bytes
    # A fresh process (nothing in memory) reads the changed file: it must not serve it.
    second = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    status, _, body = await get_manifest(session, f"{second.url}/v2/library/app/manifests/{digest}")
    assert (status, body) == (200, image.manifest)
    assert fake.count(method="GET", path_contains=f"/manifests/{digest}") == 2


async def test_a_full_disk_still_serves_a_verified_manifest_and_leaves_no_temp_file(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(seed=46)
    digest = fake.add_manifest("library/app", image.manifest, OCI_MANIFEST, tag="v1")
    with small_fs(tmp_path / "disk", "1m") as disk:
        proxy = await start_proxy({"docker.io": fake.url}, cache_dir=disk / "cache")
        fill_up(disk)
        for ref in ("v1", digest):
            status, content_type, body = await get_manifest(
                session, f"{proxy.url}/v2/library/app/manifests/{ref}"
            )
            assert (status, content_type, body) == (200, OCI_MANIFEST, image.manifest)
        assert proxy.temp_files() == []
        assert await proxy.cached() == set()


async def test_a_manifest_asked_for_as_a_blob_is_what_upstream_says_not_the_cached_bytes(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=47)
    digest = fake.add_manifest("library/app", image.manifest, OCI_MANIFEST, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    assert (await get_manifest(session, f"{proxy.url}/v2/library/app/manifests/v1"))[0] == 200
    assert digest in await proxy.cached()
    for method in ("GET", "HEAD"):
        async with session.request(method, f"{proxy.url}/v2/library/app/blobs/{digest}") as resp:
            # The fake, like distribution, has no blob of that digest.
            assert resp.status == 404
    assert fake.count(path_contains=f"/blobs/{digest}") == 2
