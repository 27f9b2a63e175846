"""Referrers with a real registry: Debian's docker-registry (distribution 2.8) has no referrers
API, so a client that attached a signature and an SBOM pushed the fallback tag index; the
proxy answers the referrers API from it, remembers the registry has no API, and answers the
same offline from what it holds."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.conftest import StartProxy
from tests.support.images import (
    MANIFEST_ACCEPT,
    OCI_INDEX,
    SBOM_TYPE,
    SIGNATURE_TYPE,
    fallback_tag,
    make_image,
    make_referrer,
    make_referrers_index,
    push_image,
    push_index,
    referrer_descriptor,
)
from tests.support.registry import Registry

REPO = "library/signed"


async def test_the_fallback_tag_of_a_real_registry_answers_the_referrers_api(
    start_proxy: StartProxy, registry: Registry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    subject = make_image(seed=61)
    unsigned = make_image(seed=62)
    sig = make_referrer(subject, SIGNATURE_TYPE, b"signature", annotations={"created": "2026-01-01"})
    sbom = make_referrer(subject, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3"}')
    await push_image(session, registry.url, REPO, subject, tag="v1")
    await push_image(session, registry.url, REPO, unsigned, tag="unsigned")
    # What a client does on a registry without the API: the referrers by digest, then the
    # index of them under the subject's fallback tag.
    index = make_referrers_index([sig, sbom])
    await push_index(session, registry.url, REPO, index, tag=fallback_tag(subject.manifest_digest))
    async with session.get(f"{registry.url}/v2/{REPO}/referrers/{subject.manifest_digest}") as resp:
        assert resp.status == 404  # distribution 2.8 has no referrers API

    cache = tmp_path / "cache"
    proxy = await start_proxy({"docker.io": registry.url}, cache_dir=cache)
    url = f"{proxy.url}/v2/{REPO}/referrers"
    async with session.get(
        f"{proxy.url}/v2/{REPO}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
    ) as resp:
        assert resp.status == 200
    async with session.get(f"{url}/{subject.manifest_digest}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == OCI_INDEX
        doc = json.loads(await resp.read())
    assert doc == {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [referrer_descriptor(sig), referrer_descriptor(sbom)],
    }
    async with session.get(
        f"{url}/{subject.manifest_digest}", params={"artifactType": SIGNATURE_TYPE}
    ) as resp:
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"
        assert (await resp.json(content_type=None))["manifests"] == [referrer_descriptor(sig)]
    async with session.get(f"{url}/{unsigned.manifest_digest}") as resp:
        assert resp.status == 200
        assert (await resp.json(content_type=None))["manifests"] == []
    # The proxy asked the registry for its referrers API once (the test itself once before):
    # then it knew the registry lacks it, and asked only for fallback tags.
    logged = registry.wait_for_requests(
        lambda reqs: sum(1 for r in reqs if "/manifests/sha256-" in r.path) >= 2
    )
    assert sum(1 for r in logged if "/referrers/" in r.path) == 2

    # A verifier pulls the signature by digest; offline, the proxy lists what it holds.
    async with session.get(
        f"{proxy.url}/v2/{REPO}/manifests/{sig.manifest_digest}", headers={"Accept": MANIFEST_ACCEPT}
    ) as resp:
        assert await resp.read() == sig.manifest
    await proxy.server.close()
    offline = await start_proxy({"docker.io": registry.url}, cache_dir=cache, offline=True)
    async with session.get(f"{offline.url}/v2/{REPO}/referrers/{subject.manifest_digest}") as resp:
        assert resp.status == 200
        assert (await resp.json(content_type=None))["manifests"] == [referrer_descriptor(sig)]
