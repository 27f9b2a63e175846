"""Content-addressed files on disk. Blocking calls: run them in a worker thread.

Layout under the cache root::

    blobs/<alg>/<hex>        verified content (layers, configs and manifests alike)
    tmp/<uuid>               downloads in progress; same file system, so commit is a rename
    index.db                 the catalogue (proxy.store.catalogue): what each file is, tags
    lock                     held by the one process that writes here (proxy.store.lock)

A file appears under ``blobs/`` only by ``rename`` of a fully written, fsynced temp file, so a
crash at any moment leaves either the whole verified blob or nothing. Whatever is left in
``tmp/`` at start-up is an interrupted download and is removed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from proxy.core.errors import OciError
from proxy.core.reference import DIGEST_HEX, Digest


@dataclass(frozen=True, slots=True)
class StoredBlob:
    digest: Digest
    size: int
    mtime: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"

    def prepare(self) -> None:
        """Create the layout and drop interrupted downloads."""
        for alg in DIGEST_HEX:
            (self.blobs / alg).mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def blob_path(self, digest: Digest) -> Path:
        # Digest's constructor has proven hex to be lowercase hex of the algorithm's length.
        return self.blobs / digest.algorithm / digest.hex

    def new_temp(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def commit(self, temp: Path, digest: Digest) -> None:
        """Publish a fully written and fsynced temp file as ``digest``."""
        final = self.blob_path(digest)
        os.rename(temp, final)
        _fsync_dir(final.parent)

    def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store small verified content (a manifest) atomically."""
        temp = self.new_temp()
        _write_durably(temp, data)
        try:
            self.commit(temp, digest)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def read_bytes(self, digest: Digest, limit: int) -> bytes | None:
        """The stored content if it is at most ``limit`` bytes; None if absent or larger."""
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        return data if len(data) <= limit else None

    def remove(self, digest: Digest) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

    def scan(self) -> Iterator[StoredBlob]:
        for alg in DIGEST_HEX:
            for entry in os.scandir(self.blobs / alg):
                try:
                    digest = Digest.parse(f"{alg}:{entry.name}")
                    st = entry.stat()
                except (OSError, OciError):
                    continue  # not ours (a stray file): leave it out of the index
                yield StoredBlob(digest, st.st_size, st.st_mtime)


def _write_durably(path: Path, data: bytes) -> None:
    """Write and fsync a new file; on any failure (a full disk) nothing is left behind."""
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
