"""Export and import stream: memory stays small whatever a blob weighs; a failed export leaves
no archive; .tar.gz imports too."""

from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import pytest

from proxy.airgap.exporter import ExportError, export, write_archive
from proxy.airgap.graph import Descriptor
from proxy.airgap.importer import import_layout
from proxy.airgap.prefetch import prefetch
from proxy.airgap.sources import read_archive, read_directory
from proxy.airgap.staging import Staging
from proxy.core.reference import Digest
from proxy.store.storage import Storage
from tests.airgap.conftest import OpenEngine, ref
from tests.airgap.layouts import Layout, tar_bytes
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import make_image

MiB = 1024 * 1024
BIG = 48 * MiB


def _big_blob(storage: Storage) -> tuple[Digest, int]:
    import hashlib

    hasher = hashlib.sha256()
    temp = storage.new_temp()
    with open(temp, "wb") as f:
        for i in range(BIG // MiB):
            chunk = bytes([i % 251]) * MiB
            hasher.update(chunk)
            f.write(chunk)
    digest = Digest("sha256", hasher.hexdigest())
    storage.commit(temp, digest)
    return digest, BIG


@pytest.mark.parametrize("name", ["big.tar", "big.tar.zst"])
def test_export_writes_a_large_blob_with_bounded_memory(tmp_path: Path, name: str) -> None:
    storage = Storage(tmp_path / "cache")
    storage.prepare()
    digest, size = _big_blob(storage)
    entries = [(Descriptor(str(digest), "application/octet-stream", size), "docker.io/library/x:1")]
    tracemalloc.start()
    try:
        write_archive(storage, entries, {str(digest): size}, tmp_path / name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, peak


def test_import_reads_a_large_blob_with_bounded_memory(tmp_path: Path) -> None:
    source = Storage(tmp_path / "source")
    source.prepare()
    digest, size = _big_blob(source)
    archive = tmp_path / "big.tar.zst"
    entries = [(Descriptor(str(digest), "application/octet-stream", size), "docker.io/library/x:1")]
    write_archive(source, entries, {str(digest): size}, archive)
    target = Storage(tmp_path / "target")
    target.prepare()
    staging = Staging(target, {})
    tracemalloc.start()
    try:
        read_archive(archive, staging)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        staging.discard()
    assert peak < 8 * MiB, peak
    assert not list(target.tmp.iterdir())


async def test_a_blob_rotted_on_disk_stops_the_export_and_leaves_no_archive(
    open_engine: OpenEngine, fake: FakeUpstream, tmp_path: Path
) -> None:
    image = make_image(layer_sizes=(100_000,), seed=81)
    fake.add_image("library/app", image, tag="v1")
    out = tmp_path / "out.tar"
    async with open_engine({"docker.io": fake.url}) as engine:
        refs = [ref(engine, "app:v1")]
        assert (await prefetch(engine, refs)).ok
        path = engine.storage.blob_path(Digest.parse(image.layers[0].digest))
        with open(path, "r+b") as f:  # same size, other bytes
            f.seek(500)
            f.write(b"rot")
        with pytest.raises(ExportError, match="no longer matches its digest"):
            await export(engine, refs, out)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


async def test_a_tar_gz_layout_imports(open_engine: OpenEngine, tmp_path: Path) -> None:
    layout = Layout()
    image = make_image(seed=82)
    layout.add_image(image, "docker.io/library/app:v1")
    path = tmp_path / "layout.tar.gz"
    path.write_bytes(gzip.compress(tar_bytes(layout.members())))
    async with open_engine({"docker.io": "http://127.0.0.1:9"}) as engine:
        report = await import_layout(engine, path)
        assert report.references[0].served
        assert all(b.digest in engine.catalogue.blobs for b in image.blobs)


def test_a_layout_directory_is_read_with_bounded_memory(tmp_path: Path) -> None:
    source = Storage(tmp_path / "source")
    source.prepare()
    digest, _ = _big_blob(source)
    layout = Layout()
    image = make_image(seed=83)
    layout.add_image(image, "docker.io/library/app:v1")
    root = layout.write_dir(tmp_path / "layout")
    os.link(source.blob_path(digest), root / "blobs" / "sha256" / digest.hex)
    target = Storage(tmp_path / "target")
    target.prepare()
    staging = Staging(target, {})
    tracemalloc.start()
    try:
        _, fetch = read_directory(root, staging)
        assert fetch(str(digest))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        staging.discard()
    assert peak < 8 * MiB, peak


def test_an_archive_of_many_members_is_read_in_bounded_memory(tmp_path: Path) -> None:
    layout = Layout()
    layout.add_image(make_image(seed=84), "docker.io/library/app:v1")
    junk = [(f"junk/{i}", b"") for i in range(20_000)]
    path = tmp_path / "many.tar"
    path.write_bytes(tar_bytes([*junk, *layout.members()]))
    target = Storage(tmp_path / "target")
    target.prepare()
    staging = Staging(target, {})
    tracemalloc.start()
    try:
        assert len(read_archive(path, staging)) == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        staging.discard()
    assert peak < 4 * MiB, peak
