"""Prefetch, export (.tar and .tar.zst), import into a fresh cache, then an offline proxy
serves what was carried: every digest as upstream had it, to clients of every kind."""

from __future__ import annotations

import tarfile
from pathlib import Path

import aiohttp
import pytest

from proxy.airgap.exporter import export
from proxy.airgap.importer import import_layout
from proxy.airgap.prefetch import prefetch
from proxy.core.mediatypes import accept_key
from tests.airgap.conftest import OpenEngine, ref
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import (
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    Image,
    Index,
    make_image,
    make_index,
)


def images() -> tuple[Image, Index]:
    single = make_image(layer_sizes=(4096, 80_000), seed=1)
    index = make_index([make_image(seed=2), make_image(arch="arm64", seed=3)])
    return single, index


def publish(fake: FakeUpstream, single: Image, index: Index) -> None:
    fake.add_image("library/single", single, tag="v1")
    for img in index.images:
        fake.add_image("library/multi", img)
    fake.add_manifest("library/multi", index.manifest, index.media_type, tag="v2")


@pytest.mark.parametrize("suffix", [".tar", ".tar.zst"])
async def test_export_then_import_into_a_fresh_cache_serves_offline(
    open_engine: OpenEngine,
    fake: FakeUpstream,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    suffix: str,
) -> None:
    single, index = images()
    publish(fake, single, index)
    archive = tmp_path / f"images{suffix}"
    async with open_engine({"docker.io": fake.url}) as engine:
        refs = [ref(engine, "single:v1"), ref(engine, "docker.io/library/multi:v2")]
        assert (await prefetch(engine, refs)).ok
        report = await export(engine, refs, archive)
    assert report.blobs == 1 + len(single.blobs) + 1 + sum(1 + len(i.blobs) for i in index.images)
    assert archive.exists() and not list(tmp_path.glob(".*.part"))
    fresh = tmp_path / "fresh"
    async with open_engine({"docker.io": fake.url}, cache_dir=fresh) as engine:
        imported = await import_layout(engine, archive)
        assert [r.served for r in imported.references] == [True, True]
        assert [str(r.reference) for r in imported.references] == [
            "docker.io/library/single:v1",
            "docker.io/library/multi:v2",
        ]
        assert engine.catalogue.answers(("docker.io", "library/multi", "v2"))[accept_key(None)].digest == (
            index.digest
        )
        assert not list(engine.storage.tmp.iterdir())
    before = len(fake.seen)
    proxy = await start_proxy({"docker.io": fake.url}, cache_dir=fresh, offline=True)
    for repo, tag, image in [
        ("library/single", "v1", single),
        *(("library/multi", i.manifest_digest, i) for i in index.images),
    ]:
        for accept in (MANIFEST_ACCEPT, DOCKER_MANIFEST + ", " + OCI_INDEX):
            async with session.get(
                f"{proxy.url}/v2/{repo}/manifests/{tag}", headers={"Accept": accept}
            ) as resp:
                if image.media_type in accept:
                    assert resp.status == 200, await resp.text()
                    assert await resp.read() == image.manifest
        for blob in image.blobs:
            async with session.get(f"{proxy.url}/v2/{repo}/blobs/{blob.digest}") as resp:
                assert resp.status == 200
                assert await resp.read() == blob.data
    async with session.get(
        f"{proxy.url}/v2/library/multi/manifests/v2", headers={"Accept": MANIFEST_ACCEPT}
    ) as resp:
        assert resp.status == 200 and await resp.read() == index.manifest
    assert len(fake.seen) == before

    with tarfile.open(archive) if suffix == ".tar" else _zst(archive) as tar:
        names = tar.getnames()
    assert names[:4] == ["blobs", "blobs/sha256", "oci-layout", "index.json"]


def _zst(path: Path) -> tarfile.TarFile:
    import io

    import zstandard

    data = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    return tarfile.open(fileobj=io.BytesIO(data))
