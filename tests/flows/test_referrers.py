"""The referrers API through the proxy, against the fake upstream: pass-through with a stored
answer per subject, artifactType filtering and its header, paging, the fallback tag where
upstream has no API (remembered per upstream), the empty answer, stale and offline answers,
the fan-out bound, pins, and cosign's legacy tags as ordinary tags."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.core.config import UpstreamConfig
from proxy.web import keys
from tests.conftest import Proxy, StartProxy, make_settings
from tests.support.fake_upstream import FakeUpstream, ReferrersMode
from tests.support.images import (
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    SBOM_TYPE,
    SIGNATURE_TYPE,
    Image,
    fallback_tag,
    make_image,
    make_referrer,
    make_referrers_index,
    referrer_descriptor,
)

REPO = "library/app"
MiB = 1024 * 1024


def attach(fake: FakeUpstream, seed: int, repo: str = REPO) -> tuple[Image, Image, Image]:
    """A subject tagged v1 upstream, with a signature and an SBOM as its referrers."""
    subject = make_image(seed=seed)
    sig = make_referrer(
        subject, SIGNATURE_TYPE, b"signature", annotations={"dev.cosignproject.cosign/signature": "MEUC"}
    )
    sbom = make_referrer(subject, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3"}')
    fake.add_image(repo, subject, tag="v1")
    fake.add_image(repo, sig)
    fake.add_image(repo, sbom)
    return subject, sig, sbom


async def referrers(
    session: aiohttp.ClientSession,
    proxy: Proxy,
    digest: str,
    repo: str = REPO,
    query: Mapping[str, str] | None = None,
) -> tuple[int, Mapping[str, str], Any]:
    async with session.get(f"{proxy.url}/v2/{repo}/referrers/{digest}", params=query) as resp:
        body = await resp.read()
        return resp.status, resp.headers, json.loads(body)


async def pull(session: aiohttp.ClientSession, proxy: Proxy, ref: str, repo: str = REPO) -> bytes:
    async with session.get(
        f"{proxy.url}/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT}
    ) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


def listed(doc: Any) -> list[str]:
    return [d["digest"] for d in doc["manifests"]]


def upstream_referrers(fake: FakeUpstream) -> int:
    return fake.count(origin="registry", path_contains="/referrers/")


async def test_the_referrers_of_a_subject_pass_through_and_are_kept_like_a_tag(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject, sig, sbom = attach(fake, seed=1)
    proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=3600.0)
    await pull(session, proxy, "v1")
    status, headers, doc = await referrers(session, proxy, subject.manifest_digest)
    assert status == 200
    assert headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in headers
    assert doc == {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [referrer_descriptor(sig), referrer_descriptor(sbom)],
    }
    assert doc["manifests"] == fake.referrers_of(REPO, subject.manifest_digest)
    # Within referrers_ttl the stored answer is served: upstream is asked once.
    assert (await referrers(session, proxy, subject.manifest_digest))[2] == doc
    async with session.head(f"{proxy.url}/v2/{REPO}/referrers/{subject.manifest_digest}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == OCI_INDEX
        assert await resp.read() == b""
    assert upstream_referrers(fake) == 1
    # A client then pulls the signature by digest, as cosign does; it is indexed by subject.
    assert await pull(session, proxy, sig.manifest_digest) == sig.manifest
    catalogue = proxy.app[keys.CATALOGUE]
    assert catalogue.referrers_of[subject.manifest_digest] == {sig.manifest_digest}


async def test_the_answer_is_asked_again_once_its_ttl_has_passed(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject, sig, sbom = attach(fake, seed=2)
    proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=0.0)
    await pull(session, proxy, "v1")
    await referrers(session, proxy, subject.manifest_digest)
    later = make_referrer(subject, "application/vnd.in-toto+json", b"attestation")
    fake.add_image(REPO, later)
    _, _, doc = await referrers(session, proxy, subject.manifest_digest)
    assert listed(doc) == [sig.manifest_digest, sbom.manifest_digest, later.manifest_digest]
    assert upstream_referrers(fake) == 2


@pytest.mark.parametrize("upstream_filters", [True, False])
async def test_artifact_type_is_filtered_here_and_said_so(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, upstream_filters: bool
) -> None:
    fake.referrers_filter = upstream_filters
    subject, sig, sbom = attach(fake, seed=3)
    proxy = await start_proxy({"docker.io": fake.url})
    await pull(session, proxy, "v1")
    for wanted, expect in ((SBOM_TYPE, [sbom]), (SIGNATURE_TYPE, [sig]), ("application/x-none", [])):
        status, headers, doc = await referrers(
            session, proxy, subject.manifest_digest, query={"artifactType": wanted}
        )
        assert status == 200
        assert headers["OCI-Filters-Applied"] == "artifactType"
        assert doc["manifests"] == [referrer_descriptor(r) for r in expect]
    # One unfiltered upstream answer, stored per subject, served every filter.
    asked = [s for s in fake.seen if "/referrers/" in s.path]
    assert len(asked) == 1 and "artifactType" not in asked[0].query


async def test_a_malformed_filter_or_subject_is_a_400_and_never_reaches_upstream(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    digest = "sha256:" + "a" * 64
    for path, query, code in (
        (f"referrers/{digest}", {"artifactType": "not a type"}, "REQUEST_INVALID"),
        (f"referrers/{digest}", {"artifactType": "a/b\r\nX: y"}, "REQUEST_INVALID"),
        ("referrers/latest", {}, "DIGEST_INVALID"),
        ("referrers/sha256:abc", {}, "DIGEST_INVALID"),
        (f"referrers/sha256:{'A' * 64}", {}, "DIGEST_INVALID"),
        (f"referrers/md5:{'a' * 32}", {}, "DIGEST_INVALID"),
    ):
        async with session.get(f"{proxy.url}/v2/{REPO}/{path}", params=query) as resp:
            assert resp.status == 400, path
            assert (await resp.json())["errors"][0]["code"] == code
    async with session.get(
        f"{proxy.url}/v2/{REPO}/referrers/{digest}?artifactType=a/b&artifactType=c/d"
    ) as resp:
        assert resp.status == 400
    assert fake.seen == []


async def test_pages_are_followed_into_one_answer(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.referrers_page = 2
    subject, sig, sbom = attach(fake, seed=4)
    more = [make_referrer(subject, SIGNATURE_TYPE, f"sig {i}".encode()) for i in range(3)]
    for m in more:
        fake.add_image(REPO, m)
    proxy = await start_proxy({"docker.io": fake.url})
    await pull(session, proxy, "v1")
    status, headers, doc = await referrers(session, proxy, subject.manifest_digest)
    assert status == 200
    assert listed(doc) == [r.manifest_digest for r in (sig, sbom, *more)]
    assert "Link" not in headers  # the whole answer, at our own path
    assert upstream_referrers(fake) == 3
    pages = [s.query.get("last") for s in fake.seen if "/referrers/" in s.path]
    assert pages == [None, sbom.manifest_digest, more[1].manifest_digest]


async def test_the_fan_out_is_bounded(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fake.referrers_page = 4
    subject = make_image(seed=5)
    fake.add_image(REPO, subject, tag="v1")
    many = [make_referrer(subject, SIGNATURE_TYPE, f"sig {i}".encode()) for i in range(12)]
    for m in many:
        fake.add_image(REPO, m)
    cache = tmp_path / "cache"
    proxy = await start_proxy({"docker.io": fake.url}, cache_dir=cache, referrers_max=5)
    await pull(session, proxy, "v1")
    _, _, doc = await referrers(session, proxy, subject.manifest_digest)
    assert listed(doc) == [m.manifest_digest for m in many[:5]]
    # Two pages gave more than five: the rest were never asked for.
    assert upstream_referrers(fake) == 2
    for m in many:
        await pull(session, proxy, m.manifest_digest)
    await proxy.server.close()
    # Offline, the referrers held are bounded the same way.
    offline = await start_proxy({"docker.io": fake.url}, cache_dir=cache, referrers_max=5, offline=True)
    _, _, doc = await referrers(session, offline, subject.manifest_digest)
    assert len(doc["manifests"]) == 5


async def test_a_huge_page_keeps_the_bound_and_an_oversized_one_is_refused(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject = make_image(seed=6)
    fake.add_image(REPO, subject, tag="v1")
    entries = [
        {"mediaType": OCI_MANIFEST, "digest": f"sha256:{i:064x}", "size": 100, "artifactType": SIGNATURE_TYPE}
        for i in range(20_000)
    ]
    # 15,000 descriptors are 3.4 MB, under a page's 4 MiB.
    bodies = {
        "huge": json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries[:15_000]}
        ).encode(),
        "oversized": json.dumps(
            {"schemaVersion": 2, "manifests": [{**e, "annotations": {"pad": "x" * 200}} for e in entries]}
        ).encode(),
    }
    which = ["huge"]

    def hook(request: Any, name: str, digest: str) -> Any:
        from aiohttp import web

        return web.Response(body=bodies[which[0]], content_type=OCI_INDEX)

    fake.referrers_hook = hook
    proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=0.0)
    await pull(session, proxy, "v1")
    status, _, doc = await referrers(session, proxy, subject.manifest_digest)
    assert status == 200
    assert len(doc["manifests"]) == 1024  # the default bound
    which[0] = "oversized"  # over 4 MiB: not read to its end, not served
    assert len(bodies["oversized"]) > 4 * MiB
    status, _, doc = await referrers(session, proxy, subject.manifest_digest)
    # Upstream failed, so the stored answer is served stale, not the oversized one.
    assert status == 200 and len(doc["manifests"]) == 1024


@pytest.mark.parametrize("mode", ["404", "405", "redirect-404"])
async def test_without_the_api_the_fallback_tag_answers_and_that_is_remembered(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, mode: ReferrersMode
) -> None:
    fake.referrers_mode = mode
    subject, sig, sbom = attach(fake, seed=7)
    index = make_referrers_index([sig, sbom])
    fake.add_manifest(REPO, index.manifest, OCI_INDEX, tag=fallback_tag(subject.manifest_digest))
    bare = make_image(seed=8)
    fake.add_image(REPO, bare, tag="bare")
    proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=3600.0)
    await pull(session, proxy, "v1")
    status, headers, doc = await referrers(session, proxy, subject.manifest_digest)
    assert status == 200
    assert doc["manifests"] == [referrer_descriptor(sig), referrer_descriptor(sbom)]
    _, headers, doc = await referrers(
        session, proxy, subject.manifest_digest, query={"artifactType": SBOM_TYPE}
    )
    assert headers["OCI-Filters-Applied"] == "artifactType"
    assert doc["manifests"] == [referrer_descriptor(sbom)]
    # No fallback tag: no referrers, and an empty index says so.
    status, _, doc = await referrers(session, proxy, bare.manifest_digest)
    assert (status, doc["manifests"]) == (200, [])
    # The API was asked once: the upstream is known to lack it for a while.
    assert fake.count(path_contains="/referrers/") == 1
    tags = {s.path.rsplit("/", 1)[1] for s in fake.seen if "/manifests/sha256-" in s.path}
    assert tags == {fallback_tag(subject.manifest_digest), fallback_tag(bare.manifest_digest)}


async def test_whether_an_upstream_has_the_api_is_asked_again_after_a_while(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.referrers_mode = "404"
    subject, sig, sbom = attach(fake, seed=9)
    proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=0.0, referrers_api_ttl=0.0)
    await pull(session, proxy, "v1")
    _, _, doc = await referrers(session, proxy, subject.manifest_digest)
    assert doc["manifests"] == []
    fake.referrers_mode = "api"  # upstream upgraded
    _, _, doc = await referrers(session, proxy, subject.manifest_digest)
    assert listed(doc) == [sig.manifest_digest, sbom.manifest_digest]


async def test_the_empty_answer(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    lonely = make_image(seed=10)
    fake.add_image(REPO, lonely, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    for digest in (lonely.manifest_digest, "sha256:" + "f" * 64):  # held, and not held at all
        status, headers, doc = await referrers(session, proxy, digest)
        assert status == 200
        assert headers["Content-Type"] == OCI_INDEX
        assert doc == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


async def test_a_failing_upstream_gets_the_stored_answer_stale(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject, _sig, _sbom = attach(fake, seed=11)
    other = make_image(seed=12)
    fake.add_image(REPO, other, tag="other")
    proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=0.0)
    await pull(session, proxy, "v1")
    await pull(session, proxy, "other")
    _, _, fresh = await referrers(session, proxy, subject.manifest_digest)
    fake.rate_limit_next = 10
    status, _, doc = await referrers(session, proxy, subject.manifest_digest)
    assert (status, doc) == (200, fresh)
    # Nothing stored and nothing held for it: upstream's failure is the answer, not "none".
    async with session.get(f"{proxy.url}/v2/{REPO}/referrers/{other.manifest_digest}") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == str(fake.retry_after)


async def test_offline_answers_the_referrers_it_holds(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    subject, sig, _sbom = attach(fake, seed=13)
    unasked, unasked_sig, _ = attach(fake, seed=14, repo="library/other")
    cache = tmp_path / "cache"
    online = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    await pull(session, online, "v1")
    await referrers(session, online, subject.manifest_digest)
    await pull(session, online, sig.manifest_digest)
    # Another subject whose referrers list was never asked for, but whose signature was pulled.
    await pull(session, online, "v1", repo="library/other")
    await pull(session, online, unasked_sig.manifest_digest, repo="library/other")
    await online.server.close()
    before = len(fake.seen)
    offline = await start_proxy({"docker.io": fake.url}, cache_dir=cache, offline=True, referrers_ttl=0.0)
    # Upstream listed two; only the signature is held, so only it is listed.
    status, _, doc = await referrers(session, offline, subject.manifest_digest)
    assert status == 200
    assert doc["manifests"] == [referrer_descriptor(sig)]
    _, headers, doc = await referrers(
        session, offline, subject.manifest_digest, query={"artifactType": SBOM_TYPE}
    )
    assert (headers["OCI-Filters-Applied"], doc["manifests"]) == ("artifactType", [])
    # From the manifests it holds, by their subject field.
    _, _, doc = await referrers(session, offline, unasked.manifest_digest, repo="library/other")
    assert doc["manifests"] == [referrer_descriptor(unasked_sig)]
    # Not for a repository never confirmed to hold them.
    _, _, doc = await referrers(session, offline, unasked.manifest_digest, repo="library/third")
    assert doc["manifests"] == []
    assert len(fake.seen) == before


async def test_offline_answers_from_a_fallback_tag_it_holds(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fake.referrers_mode = "404"
    subject = make_image(seed=15)
    # A signature written before subjects existed (no subject field): only the tag lists it.
    legacy = make_image(seed=16)
    fake.add_image(REPO, subject, tag="v1")
    fake.add_image(REPO, legacy)
    index = make_referrers_index([legacy])
    fake.add_manifest(REPO, index.manifest, OCI_INDEX, tag=fallback_tag(subject.manifest_digest))
    cache = tmp_path / "cache"
    online = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    await pull(session, online, "v1")
    _, _, doc = await referrers(session, online, subject.manifest_digest)
    assert listed(doc) == [legacy.manifest_digest]
    await pull(session, online, legacy.manifest_digest)
    await online.server.close()
    offline = await start_proxy({"docker.io": fake.url}, cache_dir=cache, offline=True)
    _, _, doc = await referrers(session, offline, subject.manifest_digest)
    assert listed(doc) == [legacy.manifest_digest]


async def test_pins_keep_a_pinned_images_signature_and_others_stay_lru(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    pinned = make_image(layer_sizes=(MiB,), seed=17)
    loose = make_image(layer_sizes=(MiB,), seed=18)
    fake.add_image("library/pinned", pinned, tag="v1")
    fake.add_image(REPO, loose, tag="v1")
    pinned_sig = make_referrer(pinned, SIGNATURE_TYPE, b"pinned sig")
    loose_sig = make_referrer(loose, SIGNATURE_TYPE, b"loose sig")
    fake.add_image("library/pinned", pinned_sig)
    fake.add_image(REPO, loose_sig)
    fillers = [make_image(layer_sizes=(MiB,), seed=19 + i) for i in range(5)]
    for i, image in enumerate(fillers):
        fake.add_image("library/filler", image, tag=f"t{i}")
    proxy = await start_proxy(
        {"docker.io": fake.url}, max_cache_bytes=3 * MiB, pins=("docker.io/library/pinned:v1",)
    )
    for repo, sig in (("library/pinned", pinned_sig), (REPO, loose_sig)):
        await pull(session, proxy, "v1", repo=repo)
        await pull(session, proxy, sig.manifest_digest, repo=repo)
        async with session.get(f"{proxy.url}/v2/{repo}/blobs/{sig.layers[0].digest}") as resp:
            assert resp.status == 200
    for i in range(len(fillers)):
        await pull(session, proxy, f"t{i}", repo="library/filler")
        async with session.get(f"{proxy.url}/v2/library/filler/blobs/{fillers[i].layers[0].digest}") as resp:
            assert resp.status == 200
    cached = await proxy.cached()
    assert {pinned_sig.manifest_digest, pinned_sig.layers[0].digest} <= cached
    assert loose_sig.manifest_digest not in cached and loose_sig.layers[0].digest not in cached


async def test_cosign_legacy_tags_are_ordinary_tags(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    subject = make_image(seed=25)
    fake.add_image(REPO, subject, tag="v1")
    legacy = {suffix: make_image(seed=26 + i) for i, suffix in enumerate((".sig", ".att", ".sbom"))}
    base = fallback_tag(subject.manifest_digest)
    for suffix, image in legacy.items():
        fake.add_image(REPO, image, tag=base + suffix)
    cache = tmp_path / "cache"
    # tag_ttl, not referrers_ttl, decides: the tags are cached for the hour.
    proxy = await start_proxy({"docker.io": fake.url}, cache_dir=cache, tag_ttl=3600.0, referrers_ttl=0.0)
    for _ in range(2):
        for suffix, image in legacy.items():
            assert await pull(session, proxy, base + suffix) == image.manifest
    assert fake.count(path_contains="/manifests/sha256-") == 3
    async with session.get(f"{proxy.url}/v2/{REPO}/tags/list") as resp:
        assert sorted((await resp.json())["tags"]) == sorted([base + s for s in legacy] + ["v1"])
    await proxy.server.close()
    offline = await start_proxy({"docker.io": fake.url}, cache_dir=cache, offline=True)
    for suffix, image in legacy.items():
        assert await pull(session, offline, base + suffix) == image.manifest


async def test_referrers_through_a_token_upstream(
    start_proxy: StartProxy, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with FakeUpstream(auth="bearer") as fake:
        fake.referrers_page = 1
        subject, sig, sbom = attach(fake, seed=30)
        # The token service is on another port: trusted like Docker Hub's auth.docker.io.
        up = UpstreamConfig("docker.io", fake.url, realm_hosts=(fake.token_url.removeprefix("http://"),))
        proxy = await start_proxy(settings=replace(make_settings(tmp_path / "cache", {}), upstreams=(up,)))
        await pull(session, proxy, "v1")
        status, _, doc = await referrers(session, proxy, subject.manifest_digest)
        assert (status, listed(doc)) == (200, [sig.manifest_digest, sbom.manifest_digest])
        # Every page carried the token (the first page's 401 fetched one scoped to the repository).
        pages = [s for s in fake.seen if "/referrers/" in s.path and "authorization" in s.headers]
        assert len(pages) == 2
