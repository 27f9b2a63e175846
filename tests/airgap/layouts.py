"""OCI layouts and archives made by hand, whole or broken on purpose."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from proxy.airgap.graph import Descriptor
from proxy.airgap.layout import index_json, layout_file
from tests.support.images import Image, Index


@dataclass
class Layout:
    """Members in order: (name, bytes); index.json built from ``refs`` unless given."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    refs: list[tuple[Descriptor, str]] = field(default_factory=list)

    def add_image(self, image: Image, name: str | None) -> Descriptor:
        for blob in image.blobs:
            self.blobs[blob.digest] = blob.data
        self.blobs[image.manifest_digest] = image.manifest
        d = Descriptor(image.manifest_digest, image.media_type, len(image.manifest))
        if name is not None:
            self.refs.append((d, name))
        return d

    def add_index(self, index: Index, name: str) -> Descriptor:
        for image in index.images:
            self.add_image(image, None)
        self.blobs[index.digest] = index.manifest
        d = Descriptor(index.digest, index.media_type, len(index.manifest))
        self.refs.append((d, name))
        return d

    def members(self) -> list[tuple[str, bytes]]:
        found = [("oci-layout", layout_file()), ("index.json", index_json(self.refs))]
        found += [(f"blobs/sha256/{d.partition(':')[2]}", data) for d, data in self.blobs.items()]
        return found

    def write_dir(self, root: Path) -> Path:
        for name, data in self.members():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return root


def tar_bytes(
    members: list[tuple[str, bytes]], *, kinds: dict[str, tuple[bytes, str]] | None = None
) -> bytes:
    """A tar of ``members``; ``kinds`` turns a name into a link (type, target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if kinds and name in kinds:
                info.type, info.linkname = kinds[name]
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def data_offset(archive: bytes, name: str) -> tuple[int, int]:
    """Where ``name``'s bytes start in a plain tar, and how many there are."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        m = tar.getmember(name)
        return m.offset_data, m.size


def end_of_members(archive: bytes) -> int:
    """The offset right after the last member's (padded) data: where the end marker begins."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        last = tar.getmembers()[-1]
        return last.offset_data + -(-last.size // 512) * 512


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
