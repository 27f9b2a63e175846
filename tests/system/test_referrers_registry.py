"""Referrers with a real registry: Debian's docker-registry (distribution 2.8) has no referrers
API, so a client that attached a signature and an SBOM pushed the fallback tag index; the
proxy answers the referrers API from it, remembers the registry has no API, and answers the
same offline from what it holds; and the signatures cross an air gap with the real commands."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.conftest import StartProxy
from tests.support.containerd import Containerd
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
from tests.support.proxyproc import serving
from tests.support.registry import Registry
from tests.system.test_airgap import TIMEOUT, assert_image, ocicache, skopeo
from tests.system.test_clients import HOST_ARCH, blocking

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


async def test_signatures_cross_an_air_gap_from_a_real_registry(
    registry: Registry, containerd: Containerd, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The commands as the README walks them, with --with-referrers: a registry without the API,
    the archive read by skopeo and ctr too, imported, the registry stopped, served offline."""
    subject = make_image(seed=63, arch=HOST_ARCH)
    sig = make_referrer(subject, SIGNATURE_TYPE, b"signature", annotations={"created": "2026-01-01"})
    sbom = make_referrer(subject, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3"}')
    await push_image(session, registry.url, REPO, subject, tag="v1")
    index = make_referrers_index([sig, sbom])
    await push_index(session, registry.url, REPO, index, tag=fallback_tag(subject.manifest_digest))
    cache, site, archive = tmp_path / "cache", tmp_path / "site", tmp_path / "site.tar"
    upstream = ["--upstream", f"docker.io={registry.url}"]
    code, out = await ocicache(
        "export",
        "--with-referrers",
        "-o",
        str(archive),
        f"docker.io/{REPO}:v1",
        "--cache-dir",
        str(cache),
        *upstream,
    )
    assert code == 0, out
    code, out = await ocicache("import", str(archive), "--cache-dir", str(site), *upstream)
    assert code == 0, out
    assert "(1 served, 2 referrers)" in out
    await blocking(registry.stop)

    # Other tools read the archive with its unnamed referrer entries.
    got = await skopeo(f"oci-archive:{archive}:docker.io/{REPO}:v1", tmp_path / "skopeo", {})
    assert_image(got, subject)
    imported = await blocking(containerd.ctr, "images", "import", str(archive), timeout=TIMEOUT)
    assert imported.returncode == 0, imported.stdout
    assert await blocking(containerd.image_target, f"docker.io/{REPO}:v1") == subject.manifest_digest

    async with serving(site, {"docker.io": registry.url}, "--offline") as proxy:
        async with session.get(f"{proxy.url}/v2/{REPO}/referrers/{subject.manifest_digest}") as resp:
            assert resp.status == 200
            doc = json.loads(await resp.read())
        assert doc["manifests"] == [referrer_descriptor(sig), referrer_descriptor(sbom)]
        for referrer in (sig, sbom):
            async with session.get(
                f"{proxy.url}/v2/{REPO}/manifests/{referrer.manifest_digest}",
                headers={"Accept": MANIFEST_ACCEPT},
            ) as resp:
                assert await resp.read() == referrer.manifest
            async with session.get(f"{proxy.url}/v2/{REPO}/blobs/{referrer.layers[0].digest}") as resp:
                assert await resp.read() == referrer.layers[0].data
