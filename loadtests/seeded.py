"""A cache directory written directly, with no upstream and no proxy: ``blobs`` files, ``tags``
of them manifests each answering one tag, the rest small layers, and their catalogue rows
(:mod:`proxy.store.seed`). A proxy started on it reconciles and loads it as it would its own
cache after a long life: what the catalogue scenario times.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.core.mediatypes import OCI_MANIFEST, accept_key, describe
from proxy.store.catalogue import ManifestInfo
from proxy.store.seed import seed
from proxy.store.storage import Storage

UPSTREAM: Final = "docker.io"


@dataclass(frozen=True)
class Tagged:
    repository: str
    tag: str
    digest: str
    size: int

    @property
    def path(self) -> str:
        return f"/v2/{self.repository}/manifests/{self.tag}"


def _manifest(i: int, layer: str, size: int) -> bytes:
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer, "size": size}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [], "n": i}
    return json.dumps(doc, sort_keys=True).encode()


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def fill(root: Path, blobs: int, tags: int) -> list[Tagged]:
    """Write ``blobs`` files (``tags`` of them manifests) and their rows under ``root``; returns
    the tags, in order."""
    storage = Storage(root)
    storage.prepare()
    files = storage.blobs / "sha256"
    layers = blobs - tags
    layer_rows: list[tuple[str, int]] = []
    for i in range(layers):
        data = i.to_bytes(8, "big") * 8
        hexa = hashlib.sha256(data).hexdigest()
        _write(files / hexa, data)
        layer_rows.append(("sha256:" + hexa, len(data)))
    manifests: list[tuple[str, ManifestInfo]] = []
    tag_rows: list[tuple[str, str, str, str, str, str]] = []
    tagged: list[Tagged] = []
    key = accept_key(None)
    for i in range(tags):
        layer, size = layer_rows[i % max(1, layers)] if layers else ("sha256:" + "0" * 64, 0)
        body = _manifest(i, layer, size)
        hexa = hashlib.sha256(body).hexdigest()
        _write(files / hexa, body)
        manifests.append(("sha256:" + hexa, ManifestInfo.of(OCI_MANIFEST, len(body), describe(body))))
        repo, tag = f"library/app{i % 1000}", f"v{i}"
        tag_rows.append((UPSTREAM, repo, tag, key, "sha256:" + hexa, OCI_MANIFEST))
        tagged.append(Tagged(repo, tag, "sha256:" + hexa, len(body)))
    seed(root, blobs=layer_rows, manifests=manifests, tags=tag_rows)
    return tagged
