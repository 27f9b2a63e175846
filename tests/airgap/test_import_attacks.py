"""Import refuses what is not whole and true, and leaves nothing of it in the cache; what is
whole but partial (an index missing a platform) or not servable (an unconfigured registry) is
imported and said so."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from proxy.airgap.importer import ArchiveRefused, import_layout, name_to_reference
from proxy.core.mediatypes import accept_key
from proxy.flows.engine import Engine
from tests.airgap.conftest import OpenEngine
from tests.airgap.layouts import Layout, data_offset, end_of_members, sha256, tar_bytes, zst
from tests.support.images import make_image, make_index

UPSTREAMS = {"docker.io": "http://127.0.0.1:9", "ghcr.io": "http://127.0.0.1:9"}


def whole() -> tuple[Layout, list[tuple[str, bytes]]]:
    layout = Layout()
    image = make_image(layer_sizes=(4096, 400_000), seed=7)
    layout.add_image(image, "docker.io/library/app:v1")
    return layout, layout.members()


def assert_nothing_left(engine: Engine) -> None:
    assert not engine.catalogue.blobs
    assert not engine.catalogue.tags
    assert not list(engine.storage.tmp.iterdir())
    assert not list((engine.storage.blobs / "sha256").iterdir())


async def refused(engine: Engine, path: Path, *words: str) -> str:
    with pytest.raises(ArchiveRefused) as info:
        await import_layout(engine, path)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert_nothing_left(engine)
    return message


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _cuts(archive: bytes) -> dict[str, bytes]:
    start, size = data_offset(archive, [n for n, _ in whole()[1]][-1])
    return {
        "in the last blob": archive[: start + size // 2],
        "right before the end marker": archive[: end_of_members(archive)],
        "in a header": archive[: start - 300],
        "half": archive[: len(archive) // 2],
        "empty": b"",
    }


@pytest.mark.parametrize(
    "cut", ["in the last blob", "right before the end marker", "in a header", "half", "empty"]
)
@pytest.mark.parametrize("compress", [False, True])
async def test_a_truncated_archive_is_refused(
    open_engine: OpenEngine, tmp_path: Path, cut: str, compress: bool
) -> None:
    _, members = whole()
    plain = tar_bytes(members)
    data = _cuts(plain)[cut]
    if compress:
        data = zst(plain)[: max(0, len(zst(plain)) * len(data) // len(plain))] if data else b""
    path = tmp_path / ("cut.tar.zst" if compress else "cut.tar")
    path.write_bytes(data)
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "refused")


@pytest.mark.parametrize("where", ["blob", "header", "zstd"])
async def test_a_bit_flipped_archive_is_refused(open_engine: OpenEngine, tmp_path: Path, where: str) -> None:
    _, members = whole()
    plain = tar_bytes(members)
    start, size = data_offset(plain, members[-1][0])
    if where == "blob":
        data = _flip(plain, start + size // 2)
    elif where == "header":
        data = _flip(plain, start - 512 + 10)  # inside the last member's name
    else:
        packed = zst(plain)
        data = _flip(packed, len(packed) // 2)
    path = tmp_path / ("flipped.tar.zst" if where == "zstd" else "flipped.tar")
    path.write_bytes(data)
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "refused")


async def test_a_blob_whose_digest_lies_is_refused(open_engine: OpenEngine, tmp_path: Path) -> None:
    _, members = whole()
    name, data = members[-1]
    members[-1] = (name, data[:-1] + b"x")  # the same name, other bytes
    path = tmp_path / "lies.tar"
    path.write_bytes(tar_bytes(members))
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "do not match its digest", name)


@pytest.mark.parametrize("which", ["layer", "root"])
async def test_index_json_naming_a_missing_blob_is_refused(
    open_engine: OpenEngine, tmp_path: Path, which: str
) -> None:
    layout = Layout()
    image = make_image(seed=8)
    layout.add_image(image, "app:v1")
    missing = image.layers[0].digest if which == "layer" else image.manifest_digest
    del layout.blobs[missing]
    path = tmp_path / "missing.tar"
    path.write_bytes(tar_bytes(layout.members()))
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, missing, "not in it")


@pytest.mark.parametrize(
    "name",
    ["../evil", "/etc/ocicache-test", "blobs/sha256/../../../tmp/x", "blobs/sha256/notadigest", "a\\b"],
)
async def test_path_traversal_and_bad_names_are_refused(
    open_engine: OpenEngine, tmp_path: Path, name: str
) -> None:
    _, members = whole()
    path = tmp_path / "names.tar"
    path.write_bytes(tar_bytes([(name, b"x"), *members]))
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "name")
    assert not (tmp_path.parent / "evil").exists()


async def test_links_in_an_archive_are_refused(open_engine: OpenEngine, tmp_path: Path) -> None:
    _, members = whole()
    name = members[-1][0]
    path = tmp_path / "links.tar"
    path.write_bytes(tar_bytes(members, kinds={name: (tarfile.SYMTYPE, "/etc/passwd")}))
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "not a regular file")


async def test_a_huge_index_json_is_refused_before_it_is_read(
    open_engine: OpenEngine, tmp_path: Path
) -> None:
    _, members = whole()
    huge = b" " * (16 * 1024 * 1024 + 1)
    members = [(n, huge if n == "index.json" else d) for n, d in members]
    path = tmp_path / "huge.tar"
    path.write_bytes(tar_bytes(members))
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "index.json is", "more than")


@pytest.mark.parametrize("lie", ["size", "media type", "reference digest"])
async def test_descriptors_that_lie_are_refused(open_engine: OpenEngine, tmp_path: Path, lie: str) -> None:
    layout = Layout()
    image = make_image(seed=9)
    d = layout.add_image(image, None)
    from dataclasses import replace

    if lie == "size":
        layout.refs.append((replace(d, size=d.size + 1), "app:v1"))
    elif lie == "media type":
        layout.refs.append((replace(d, media_type="application/vnd.oci.image.index.v1+json"), "app:v1"))
    else:
        layout.refs.append((d, f"app@{sha256(b'other')}"))
    path = tmp_path / "lie.tar"
    path.write_bytes(tar_bytes(layout.members()))
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "refused")


async def test_a_layout_directory_read_through_no_symlink(open_engine: OpenEngine, tmp_path: Path) -> None:
    layout, _ = whole()
    root = layout.write_dir(tmp_path / "layout")
    blob = sorted((root / "blobs" / "sha256").iterdir())[0]
    real = tmp_path / "elsewhere"
    real.write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(real)
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, root, "symlink")
    # The blobs directory itself a symlink: refused as well.
    layout2, _ = whole()
    root2 = layout2.write_dir(tmp_path / "layout2")
    os.rename(root2 / "blobs", tmp_path / "real-blobs")
    (root2 / "blobs").symlink_to(tmp_path / "real-blobs")
    async with open_engine(UPSTREAMS, cache_dir=tmp_path / "cache2") as engine:
        await refused(engine, root2, "symlink")


async def test_a_fifo_posing_as_a_blob_in_a_directory_is_refused_not_read(
    open_engine: OpenEngine, tmp_path: Path
) -> None:
    layout, _ = whole()
    root = layout.write_dir(tmp_path / "layout")
    blob = sorted((root / "blobs" / "sha256").iterdir())[0]
    blob.unlink()
    os.mkfifo(blob)
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, root, "not a regular file")


async def test_a_directory_layout_as_skopeo_writes_it_imports(
    open_engine: OpenEngine, tmp_path: Path
) -> None:
    layout, _ = whole()
    root = layout.write_dir(tmp_path / "layout")
    (root / "blobs" / "sha256" / ("f" * 64)).write_bytes(b"an unrelated blob, never read")
    async with open_engine(UPSTREAMS) as engine:
        report = await import_layout(engine, root)
        assert [r.served for r in report.references] == [True]
        assert "sha256:" + "f" * 64 not in engine.catalogue.blobs
        assert ("docker.io", "library/app", "v1") in engine.catalogue.tags


async def test_an_index_missing_a_platform_is_imported_and_says_so(
    open_engine: OpenEngine, tmp_path: Path
) -> None:
    amd, arm = make_image(seed=11), make_image(arch="arm64", seed=12)
    index = make_index([amd, arm])
    layout = Layout()
    layout.add_index(index, "docker.io/library/multi:v1")
    for blob in (*arm.blobs,):
        del layout.blobs[blob.digest]
    del layout.blobs[arm.manifest_digest]
    path = tmp_path / "partial.tar"
    path.write_bytes(tar_bytes([(f"./{n}", d) for n, d in layout.members()]))  # ./ as some tools write
    async with open_engine(UPSTREAMS) as engine:
        report = await import_layout(engine, path)
        assert report.references[0].served
        assert any("linux/arm64" in n and "not served" in n for n in report.notes), report.notes
        assert amd.manifest_digest in engine.catalogue.manifests
        assert arm.manifest_digest not in engine.catalogue.blobs


async def test_an_unconfigured_registry_is_imported_not_served_until_configured(
    open_engine: OpenEngine, tmp_path: Path
) -> None:
    layout = Layout()
    image = make_image(seed=13)
    layout.add_image(image, "quay.io/org/tool:1.0")
    other = make_image(seed=14)
    layout.add_image(other, "tool:2.0")  # no registry: the default upstream
    path = tmp_path / "quay.tar"
    path.write_bytes(tar_bytes(layout.members()))
    cache = tmp_path / "cache"
    async with open_engine(UPSTREAMS, cache_dir=cache) as engine:
        report = await import_layout(engine, path)
        quay, hub = report.references
        assert not quay.served and quay.note is not None and "'quay.io' is not configured" in quay.note
        assert hub.served and str(hub.reference) == "docker.io/library/tool:2.0"
        assert image.manifest_digest in engine.catalogue.manifests
    async with open_engine({**UPSTREAMS, "quay.io": "http://127.0.0.1:9"}, cache_dir=cache) as engine:
        answers = engine.catalogue.answers(("quay.io", "org/tool", "1.0"))
        assert answers[accept_key(None)].digest == image.manifest_digest
        assert await engine.catalogue.holds("quay.io", "org/tool", image.layers[0].digest)


@pytest.mark.parametrize(
    ("name", "served"),
    [
        ("docker.io/library/alpine:3.20", "docker.io/library/alpine:3.20"),
        ("alpine", "docker.io/library/alpine:latest"),
        ("ghcr.io/org/app:1.2", "ghcr.io/org/app:1.2"),
    ],
)
def test_names_in_index_json_resolve_like_references(name: str, served: str) -> None:
    ref, note = name_to_reference(name, list(UPSTREAMS), "docker.io")
    assert (str(ref), note) == (served, None)


def test_a_name_that_is_no_reference_is_held_not_served() -> None:
    ref, note = name_to_reference("Not A Name!", list(UPSTREAMS), "docker.io")
    assert ref is None and note is not None and "not served" in note


async def test_an_archive_cut_between_members_is_refused_not_taken_for_a_partial_index(
    open_engine: OpenEngine, tmp_path: Path
) -> None:
    # index.json comes first, so a cut after the amd64 members loses only the arm64 platform,
    # which an index may lack: without its end-of-archive marker the archive must still go.
    amd, arm = make_image(seed=15), make_image(arch="arm64", seed=16)
    index = make_index([amd, arm])
    layout = Layout()
    layout.add_index(index, "docker.io/library/multi:v1")
    head = layout.members()[:2]
    blobs = dict(layout.members()[2:])

    def member(digest: str) -> tuple[str, bytes]:
        name = f"blobs/sha256/{digest.partition(':')[2]}"
        return name, blobs[name]

    amd_part = [member(index.digest), member(amd.manifest_digest), *(member(b.digest) for b in amd.blobs)]
    arm_part = [member(arm.manifest_digest), *(member(b.digest) for b in arm.blobs)]
    plain = tar_bytes([*head, *amd_part, *arm_part])
    start, size = data_offset(plain, amd_part[-1][0])
    cut = start + -(-size // 512) * 512
    path = tmp_path / "cut.tar"
    path.write_bytes(plain[:cut])  # right after the last amd64 member
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "end-of-archive marker")


async def test_an_archive_of_too_many_members_is_refused(
    open_engine: OpenEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.airgap import sources

    monkeypatch.setattr(sources, "MEMBERS_MAX", 100)
    _, members = whole()
    path = tmp_path / "many.tar"
    path.write_bytes(tar_bytes([*((f"junk/{i}", b"") for i in range(101)), *members]))
    async with open_engine(UPSTREAMS) as engine:
        await refused(engine, path, "more than 100 members")


async def test_an_archive_larger_than_the_budget_is_refused_before_it_fills_the_disk(
    open_engine: OpenEngine, tmp_path: Path
) -> None:
    # A blob that claims a terabyte, of zeros: a few KiB of zstd, unbounded once unpacked.
    import zstandard

    header = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
    header.size = 1 << 40
    head = header.tobuf(tarfile.PAX_FORMAT)
    stream = zstandard.ZstdCompressor().compressobj()
    data = (
        stream.compress(head) + b"".join(stream.compress(bytes(1 << 20)) for _ in range(64)) + stream.flush()
    )
    path = tmp_path / "bomb.tar.zst"
    path.write_bytes(data)
    async with open_engine(UPSTREAMS, max_cache_bytes=8 * 1024 * 1024) as engine:
        await refused(engine, path, "more than the cache's budget")
