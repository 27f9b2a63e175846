"""Referrers across an air gap: prefetch and export ``with_referrers`` bring the referrers of
every manifest they carry (a signature of an index, an SBOM of a platform manifest) with their
blobs, and not referrers of referrers; import restores them, indexed by subject and confirmed
for the reference's repository; then an offline proxy answers the referrers API from them,
whether upstream had the API or only the fallback tag."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.airgap.exporter import export
from proxy.airgap.importer import import_layout
from proxy.airgap.layout import INDEX_JSON
from proxy.airgap.prefetch import prefetch
from proxy.flows.engine import Engine
from tests.airgap.conftest import OpenEngine, ref
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream, ReferrersMode
from tests.support.images import (
    MANIFEST_ACCEPT,
    OCI_INDEX,
    SBOM_TYPE,
    SIGNATURE_TYPE,
    Image,
    Index,
    fallback_tag,
    make_image,
    make_index,
    make_referrer,
    make_referrers_index,
    referrer_descriptor,
)

REPO = "library/multi"


class Signed:
    """A two-platform index signed as a whole, an SBOM of its amd64 manifest, and a signature
    of that SBOM (a referrer of a referrer: never carried)."""

    def __init__(self, fake: FakeUpstream, mode: ReferrersMode = "api") -> None:
        self.amd, self.arm = make_image(seed=71), make_image(arch="arm64", seed=72)
        self.index: Index = make_index([self.amd, self.arm])
        self.sig = make_referrer(self.index, SIGNATURE_TYPE, b"signature of the index")
        self.sbom = make_referrer(self.amd, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3"}')
        self.sbom_sig = make_referrer(self.sbom, SIGNATURE_TYPE, b"signature of the sbom")
        fake.referrers_mode = mode
        for image in (self.amd, self.arm, self.sig, self.sbom, self.sbom_sig):
            fake.add_image(REPO, image)
        fake.add_manifest(REPO, self.index.manifest, self.index.media_type, tag="v1")
        if mode != "api":
            for subject, referrers in (
                (self.index.digest, [self.sig]),
                (self.amd.manifest_digest, [self.sbom]),
                (self.sbom.manifest_digest, [self.sbom_sig]),
            ):
                listing = make_referrers_index(referrers)
                fake.add_manifest(REPO, listing.manifest, OCI_INDEX, tag=fallback_tag(subject))

    def carried(self) -> list[Image]:
        return [self.sig, self.sbom]


def held(engine: Engine, image: Image) -> bool:
    return image.manifest_digest in engine.catalogue.manifests and all(
        b.digest in engine.catalogue.blobs for b in image.blobs
    )


async def test_prefetch_with_referrers_brings_them_with_their_blobs_and_not_further(
    open_engine: OpenEngine, fake: FakeUpstream
) -> None:
    signed = Signed(fake)
    async with open_engine({"docker.io": fake.url}) as engine:
        refs = [ref(engine, "multi:v1")]
        plain = await prefetch(engine, refs)
        assert plain.ok and plain.references[0].referrers == 0
        assert not held(engine, signed.sig)
        report = await prefetch(engine, refs, with_referrers=True)
        assert report.ok, report.references[0].error
        assert report.references[0].referrers == 2
        assert "(2 of them referrers)" in report.summary()
        assert held(engine, signed.sig) and held(engine, signed.sbom)
        assert signed.sbom_sig.manifest_digest not in engine.catalogue.manifests
        assert engine.catalogue.referrers_of[signed.index.digest] == {signed.sig.manifest_digest}


async def test_prefetch_with_referrers_follows_only_the_platforms_asked_for(
    open_engine: OpenEngine, fake: FakeUpstream
) -> None:
    signed = Signed(fake)
    async with open_engine({"docker.io": fake.url}) as engine:
        report = await prefetch(
            engine, [ref(engine, "multi:v1")], platforms=frozenset({"linux/arm64"}), with_referrers=True
        )
        assert report.ok and report.references[0].referrers == 1
        assert held(engine, signed.sig) and not held(engine, signed.sbom)


async def test_a_referrer_upstream_lists_but_cannot_give_fails_the_reference(
    open_engine: OpenEngine, fake: FakeUpstream
) -> None:
    signed = Signed(fake)
    gone = make_referrer(signed.index, SIGNATURE_TYPE, b"deleted upstream")
    listing = [referrer_descriptor(signed.sig), referrer_descriptor(gone)]

    def answer(request: web.Request, name: str, subject: str) -> web.StreamResponse | None:
        entries = listing if subject == signed.index.digest else []
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        return web.Response(text=body, content_type=OCI_INDEX)

    fake.referrers_hook = answer
    async with open_engine({"docker.io": fake.url}) as engine:
        report = await prefetch(engine, [ref(engine, "multi:v1")], with_referrers=True)
        assert not report.ok
        assert f"referrer {gone.manifest_digest}" in str(report.references[0].error)


@pytest.mark.parametrize("mode", ["api", "404"])
async def test_export_and_import_carry_referrers_and_an_offline_proxy_answers_them(
    open_engine: OpenEngine,
    fake: FakeUpstream,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    mode: ReferrersMode,
) -> None:
    signed = Signed(fake, mode)
    archive = tmp_path / "signed.tar"
    async with open_engine({"docker.io": fake.url}) as engine:
        # The export asks upstream for the referrers itself: nothing was prefetched.
        report = await export(engine, [ref(engine, "multi:v1")], archive, with_referrers=True)
        assert report.prefetched is not None and report.prefetched.references[0].referrers == 2
    with tarfile.open(archive) as tar:
        member = tar.extractfile(INDEX_JSON)
        assert member is not None
        entries = json.load(member)["manifests"]
    # The reference, then its referrers without a name (as OCI layouts carry untagged manifests).
    assert [e["digest"] for e in entries] == [
        signed.index.digest,
        signed.sig.manifest_digest,
        signed.sbom.manifest_digest,
    ]
    assert [("annotations" in e) for e in entries] == [True, False, False]

    fresh = tmp_path / "fresh"
    async with open_engine({"docker.io": fake.url}, cache_dir=fresh) as engine:
        imported = await import_layout(engine, archive)
        assert [str(r.reference) for r in imported.references] == ["docker.io/library/multi:v1"]
        assert sorted(str(r.reference) for r in imported.referrers) == sorted(
            f"docker.io/{REPO}@{r.manifest_digest}" for r in signed.carried()
        )
        assert "2 referrers" in imported.summary()
        assert engine.catalogue.referrers_of[signed.amd.manifest_digest] == {signed.sbom.manifest_digest}

    before = len(fake.seen)
    proxy = await start_proxy({"docker.io": fake.url}, cache_dir=fresh, offline=True)
    base = f"{proxy.url}/v2/{REPO}"
    for subject, expect in (
        (signed.index.digest, [signed.sig]),
        (signed.amd.manifest_digest, [signed.sbom]),
        (signed.arm.manifest_digest, []),
        (signed.sbom.manifest_digest, []),  # its own signature was not carried
    ):
        async with session.get(f"{base}/referrers/{subject}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == OCI_INDEX
            assert (await resp.json(content_type=None))["manifests"] == [
                referrer_descriptor(r) for r in expect
            ]
    async with session.get(
        f"{base}/referrers/{signed.amd.manifest_digest}", params={"artifactType": SIGNATURE_TYPE}
    ) as resp:
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"
        assert (await resp.json(content_type=None))["manifests"] == []
    # And a verifier gets the signatures and their blobs, offline.
    for referrer in signed.carried():
        async with session.get(
            f"{base}/manifests/{referrer.manifest_digest}", headers={"Accept": MANIFEST_ACCEPT}
        ) as resp:
            assert await resp.read() == referrer.manifest
        for blob in referrer.blobs:
            async with session.get(f"{base}/blobs/{blob.digest}") as resp:
                assert await resp.read() == blob.data
    assert len(fake.seen) == before


async def test_an_offline_export_carries_the_referrers_the_cache_holds(
    open_engine: OpenEngine, fake: FakeUpstream, tmp_path: Path
) -> None:
    signed = Signed(fake)
    cache = tmp_path / "cache"
    async with open_engine({"docker.io": fake.url}, cache_dir=cache) as engine:
        assert (await prefetch(engine, [ref(engine, "multi:v1")], with_referrers=True)).ok
    before = len(fake.seen)
    archive = tmp_path / "offline.tar.zst"
    async with open_engine({"docker.io": fake.url}, cache_dir=cache, offline=True) as engine:
        report = await export(engine, [ref(engine, "multi:v1")], archive, with_referrers=True)
        assert report.prefetched is None
        carried = {d for p in report.references for d in p.referrers}
        assert carried == {signed.sig.manifest_digest, signed.sbom.manifest_digest}
        assert all(b.digest in report.references[0].digests for r in signed.carried() for b in r.blobs)
    assert len(fake.seen) == before


async def test_an_unnamed_referrer_of_nothing_imported_is_held_not_served(
    open_engine: OpenEngine, fake: FakeUpstream, tmp_path: Path
) -> None:
    Signed(fake)
    archive = tmp_path / "signed.tar"
    async with open_engine({"docker.io": fake.url}) as engine:
        await export(engine, [ref(engine, "multi:v1")], archive, with_referrers=True)
    # Keep only the referrers' entries: their subject is not among what is imported.
    layout = tmp_path / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    doc = json.loads((layout / INDEX_JSON).read_text())
    doc["manifests"] = doc["manifests"][1:]
    (layout / INDEX_JSON).write_text(json.dumps(doc))
    async with open_engine({"docker.io": fake.url}, cache_dir=tmp_path / "fresh") as engine:
        imported = await import_layout(engine, layout)
        assert imported.referrers == []
        assert [(r.served, r.note) for r in imported.references] == [
            (False, "no reference name in index.json: held, not served")
        ] * 2
