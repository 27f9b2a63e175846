"""What the scenarios serve: random blobs, genuine images made of them, and pushing them upstream.

Layers are uncompressed tars of random bytes (``application/vnd.oci.image.layer.v1.tar``): the
layer digest is then its diff_id, the image is genuine for any client, and nothing spends
minutes in gzip. Scenarios warm a proxy the way a client would, by pulling through it, so they
rely on nothing but the registry API.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
import yarl

from tests.support.images import OCI_CONFIG, OCI_MANIFEST, Blob, PushError, push_blob, push_manifest

MiB: Final = 1024 * 1024
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
REPO: Final = "library/bench"
UPSTREAM_NAME: Final = "docker.io"
CHUNK: Final = 4 * MiB
# A 1 GiB push takes a few seconds here; this is the bound.
PUSH_TIMEOUT: Final = 300.0


def make_blob_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their digest (``sha256:…``)."""
    h = hashlib.sha256()
    left = size
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        while left:
            chunk = os.urandom(min(left, CHUNK))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link (the same pages in the page cache); copy where that is impossible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def size_label(size: int) -> str:
    """``100 MiB``, ``64 KiB``: sizes as the report names them."""
    if size >= MiB:
        return f"{size / MiB:.0f} MiB"
    return f"{size / 1024:.0f} KiB"


def blob_path(digest: str, repo: str = REPO) -> str:
    return f"/v2/{repo}/blobs/{digest}"


def manifest_path(reference: str, repo: str = REPO) -> str:
    return f"/v2/{repo}/manifests/{reference}"


def random_layer(size: int, name: str = "bench/random.bin") -> Blob:
    """A tar holding one file of ``size`` random bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return Blob.of(buf.getvalue(), OCI_LAYER_TAR)


@dataclass(frozen=True)
class Image:
    layers: tuple[Blob, ...]
    config: Blob
    manifest: bytes

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def size(self) -> int:
        """Bytes a full pull moves: every blob and the manifest."""
        return sum(b.size for b in self.layers) + self.config.size + len(self.manifest)


def make_image(layer_sizes: tuple[int, ...]) -> Image:
    layers = tuple(random_layer(size, f"bench/layer{i}.bin") for i, size in enumerate(layer_sizes))
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    config = Blob.of(json.dumps(config_doc).encode(), OCI_CONFIG)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    return Image(layers, config, json.dumps(manifest_doc).encode())


async def push_image(
    session: aiohttp.ClientSession, base_url: str, image: Image, tag: str = "latest", repo: str = REPO
) -> None:
    for blob in (*image.layers, image.config):
        await push_blob(session, base_url, repo, blob)
    await push_manifest(session, base_url, repo, tag, image.manifest, OCI_MANIFEST)


async def push_file_blob(
    session: aiohttp.ClientSession, base_url: str, path: Path, digest: str, repo: str = REPO
) -> None:
    """Push a blob file whose digest is known (:func:`make_blob_file` returns it), streamed from
    the file: a 1 GiB blob never sits in this process's memory."""
    base = yarl.URL(base_url)
    async with session.post(base / "v2" / repo / "blobs" / "uploads" / "") as resp:
        if resp.status != 202 or not resp.headers.get("Location"):
            raise PushError(f"starting an upload to {base_url}: {resp.status} {await resp.text()}")
        location = resp.headers["Location"]
    # Location may be relative, and carries an opaque _state query that must not be re-encoded.
    target = base.join(yarl.URL(location, encoded=True))
    put = yarl.URL(f"{target}{'&' if target.raw_query_string else '?'}digest={digest}", encoded=True)
    size = await asyncio.to_thread(os.path.getsize, path)
    with path.open("rb") as body:
        async with session.put(
            put,
            data=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT),
        ) as resp:
            if resp.status != 201:
                raise PushError(f"uploading {digest} to {base_url}: {resp.status} {await resp.text()}")
