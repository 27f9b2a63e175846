"""``ocicache verify``: rehash every cached blob and remove those whose bytes no longer match
their digest (disk rot, a copy gone wrong on the way into an air-gapped site, tampering).

The proxy checks every blob before it stores it; this checks what the disk still holds. It
reads each file once, in 1 MiB pieces, so memory stays small whatever the blob size. Run it
while the proxy is stopped, or accept that a blob it removes may be fetched again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final

from proxy.core.reference import Digest
from proxy.store.storage import Storage

CHUNK: Final = 1024 * 1024


@dataclass
class Report:
    checked: int = 0
    bytes: int = 0
    bad: list[Digest] = field(default_factory=list)


def hash_file(storage: Storage, digest: Digest) -> str:
    hasher = hashlib.new(digest.algorithm)
    with open(storage.blob_path(digest), "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify(storage: Storage, *, remove: bool = True) -> Report:
    report = Report()
    for blob in storage.scan():
        try:
            good = hash_file(storage, blob.ref) == blob.ref.hex
        except FileNotFoundError:
            continue  # removed meanwhile
        report.checked += 1
        report.bytes += blob.size
        if not good:
            report.bad.append(blob.ref)
            if remove:
                storage.remove(blob.ref)
    return report
