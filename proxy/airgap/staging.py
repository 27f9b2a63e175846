"""The verified files of an import, held under the cache's ``tmp/`` until it commits.

Every blob an import reads is copied here in pieces and hashed on the way; one whose bytes do
not hash to its name refuses the whole import. Nothing enters ``blobs/`` or the catalogue until
the importer commits, at the end, by renaming these files (already fsynced) into place: so a
refused import leaves nothing of itself in the cache, and a killed one leaves temp files that
the next start sweeps (:meth:`proxy.store.storage.Storage.prepare`). A blob the cache already
holds is still read and checked, but not kept twice.

Blocking: runs in the importer's worker thread, apart from :meth:`pop` and :meth:`discard`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import IO, Final

from proxy.airgap.layout import LayoutError
from proxy.core.reference import Digest
from proxy.store.storage import Storage

CHUNK: Final = 1024 * 1024


class Staging:
    def __init__(
        self,
        storage: Storage,
        held: dict[str, int],
        stop: threading.Event | None = None,
        limit: int | None = None,
    ) -> None:
        self.storage = storage
        # Bytes it may keep (the cache's budget): an archive that claims more, a zstd bomb
        # among them, is refused before it fills the disk.
        self.limit = limit
        self.kept = 0
        self.held = held  # digest -> size, of what the cache holds (a snapshot)
        self.stop = stop or threading.Event()
        self._staged: dict[str, tuple[Path, int]] = {}
        self.read_bytes = 0

    def has(self, digest: str) -> bool:
        return digest in self._staged or digest in self.held

    def size_of(self, digest: str) -> int | None:
        staged = self._staged.get(digest)
        if staged is not None:
            return staged[1]
        return self.held.get(digest)

    def staged(self, digest: str) -> bool:
        return digest in self._staged

    def take(self, digest: Digest, source: IO[bytes], size: int, what: str) -> None:
        """Read exactly ``size`` bytes of ``source``; keep them if they hash to ``digest``,
        else raise LayoutError (and keep nothing)."""
        key = str(digest)
        hasher = hashlib.new(digest.algorithm)
        keep = key not in self._staged and key not in self.held
        if keep and self.limit is not None and self.kept + size > self.limit:
            raise LayoutError(
                f"it holds more than the cache's budget of {self.limit} bytes (see --max-cache-size)"
            )
        temp = self.storage.new_temp() if keep else None
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) if temp is not None else -1
        try:
            left = size
            while left:
                if self.stop.is_set():
                    raise LayoutError("interrupted")
                chunk = source.read(min(CHUNK, left))
                if not chunk:
                    raise LayoutError(f"{what}: cut short after {size - left} of {size} bytes")
                hasher.update(chunk)
                if fd >= 0:
                    _write_all(fd, chunk)
                left -= len(chunk)
                self.read_bytes += len(chunk)
            if hasher.hexdigest() != digest.hex:
                raise LayoutError(f"{what}: its bytes do not match its digest {key}")
            if fd >= 0:
                os.fsync(fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
                fd = -1
            if temp is not None:
                temp.unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        if temp is not None:
            self._staged[key] = (temp, size)
            self.kept += size

    def read(self, digest: str, limit: int) -> bytes:
        """A small staged or held file (a manifest), at most ``limit`` bytes."""
        staged = self._staged.get(digest)
        path = staged[0] if staged is not None else self.storage.blob_path(Digest.parse(digest))
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise LayoutError(f"{digest} is larger than a manifest may be")
        return data

    def pop(self, digest: str) -> Path | None:
        """The staged file of ``digest``, now the caller's to rename or remove."""
        staged = self._staged.pop(digest, None)
        return staged[0] if staged is not None else None

    def discard(self) -> None:
        for path, _ in self._staged.values():
            path.unlink(missing_ok=True)
        self._staged.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
