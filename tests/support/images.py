"""Synthetic but real container images, and pushing them with the OCI push API.

The images are small enough to build in memory yet valid enough for a real
Docker daemon or containerd to pull and unpack: every layer is a gzipped tar,
the config lists the diff_ids of the uncompressed tars, and all digests are
over the exact bytes we push.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import yarl

Flavour = Literal["oci", "docker"]
# aiohttp 3.14 deprecates constructing BasicAuth and passing auth=; a plain
# (user, password) tuple is accepted too and sent as an Authorization header.
Auth = aiohttp.BasicAuth | tuple[str, str] | None

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# Everything a client might reasonably ask for; distribution 2.8 refuses to
# serve OCI manifests/indexes to a GET whose Accept header lacks their type.
MANIFEST_ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}"

_MEDIA_TYPES: dict[str, dict[str, str]] = {
    "oci": {"manifest": OCI_MANIFEST, "index": OCI_INDEX, "config": OCI_CONFIG, "layer": OCI_LAYER},
    "docker": {
        "manifest": DOCKER_MANIFEST,
        "index": DOCKER_LIST,
        "config": DOCKER_CONFIG,
        "layer": DOCKER_LAYER,
    },
}

# A fixed timestamp keeps images byte-for-byte reproducible for a given seed.
_EPOCH = "1970-01-01T00:00:00Z"
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(obj: Any) -> bytes:
    # Sorted keys and compact separators: equal content gives equal digests.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    digest: str
    data: bytes
    media_type: str

    @classmethod
    def of(cls, data: bytes, media_type: str) -> Blob:
        return cls(sha256_digest(data), data, media_type)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    manifest: bytes
    manifest_digest: str
    media_type: str
    config: Blob
    layers: tuple[Blob, ...]
    platform: tuple[str, str]  # (os, arch)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    @property
    def diff_ids(self) -> list[str]:
        ids: list[str] = json.loads(self.config.data)["rootfs"]["diff_ids"]
        return ids


@dataclass(frozen=True)
class Index:
    manifest: bytes
    digest: str
    media_type: str
    images: tuple[Image, ...]


def _layer_tar(index: int, token: str, payload: bytes) -> bytes:
    """One directory plus one regular file, with fixed metadata for reproducibility."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        # An explicit parent directory entry: some unpackers are stricter
        # about implicit parents than others.
        dir_info = tarfile.TarInfo("ocicache-test")
        dir_info.type = tarfile.DIRTYPE
        dir_info.mode = 0o755
        tar.addfile(dir_info)
        file_info = tarfile.TarInfo(f"ocicache-test/layer-{index}-{token}.bin")
        file_info.size = len(payload)
        file_info.mode = 0o644
        tar.addfile(file_info, io.BytesIO(payload))
    return buf.getvalue()


def make_image(
    *,
    layer_sizes: Sequence[int] = (4096, 65536),
    os: str = "linux",
    arch: str = "amd64",
    flavour: Flavour = "oci",
    seed: int | None = None,
) -> Image:
    """Build an image in memory. Same arguments and seed give identical bytes."""
    types = _MEDIA_TYPES[flavour]
    # seed=None still needs distinct content per call, otherwise unrelated
    # images would share blobs and hide caching bugs.
    rng = random.Random(seed if seed is not None else random.SystemRandom().getrandbits(64))
    token = rng.getrandbits(64).to_bytes(8, "big").hex()
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        tar = _layer_tar(i, token, rng.randbytes(size))
        diff_ids.append(sha256_digest(tar))
        # mtime=0 keeps the gzip header, and so the layer digest, stable.
        layers.append(Blob.of(gzip.compress(tar, mtime=0), types["layer"]))
    config_doc = {
        "architecture": arch,
        "os": os,
        "created": _EPOCH,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.ocicache.test.token": token},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": _EPOCH, "created_by": f"ocicache test layer {i}"} for i in range(len(layers))
        ],
    }
    config = Blob.of(_canonical_json(config_doc), types["config"])
    manifest = _canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": types["manifest"],
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    return Image(
        manifest=manifest,
        manifest_digest=sha256_digest(manifest),
        media_type=types["manifest"],
        config=config,
        layers=tuple(layers),
        platform=(os, arch),
    )


def make_index(images: Sequence[Image], flavour: Flavour = "oci") -> Index:
    """A multi-platform index (OCI) or manifest list (docker) over `images`."""
    media_type = _MEDIA_TYPES[flavour]["index"]
    entries = [
        {
            "mediaType": img.media_type,
            "digest": img.manifest_digest,
            "size": len(img.manifest),
            "platform": {"os": img.platform[0], "architecture": img.platform[1]},
        }
        for img in images
    ]
    manifest = _canonical_json({"schemaVersion": 2, "mediaType": media_type, "manifests": entries})
    return Index(manifest, sha256_digest(manifest), media_type, tuple(images))


# OCI 1.1 artifacts: an empty config, and the artifact types cosign and syft use.
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
SIGNATURE_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM_TYPE = "application/spdx+json"


def make_referrer(
    subject: Image | Index,
    artifact_type: str,
    payload: bytes,
    *,
    annotations: dict[str, str] | None = None,
    layer_type: str | None = None,
    with_artifact_type: bool = True,
) -> Image:
    """An OCI 1.1 artifact whose ``subject`` is ``subject``: an image manifest with an empty
    config and ``payload`` as its one layer (a signature, an SBOM). Without
    ``with_artifact_type`` the type is carried by the config's media type instead, as older
    tools write it."""
    digest = subject.manifest_digest if isinstance(subject, Image) else subject.digest
    described: dict[str, Any] = {
        "mediaType": subject.media_type,
        "digest": digest,
        "size": len(subject.manifest),
    }
    config = Blob.of(b"{}", OCI_EMPTY if with_artifact_type else artifact_type)
    layer = Blob.of(payload, layer_type or artifact_type)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "subject": described,
    }
    if with_artifact_type:
        doc["artifactType"] = artifact_type
    if annotations:
        doc["annotations"] = annotations
    manifest = _canonical_json(doc)
    return Image(
        manifest=manifest,
        manifest_digest=sha256_digest(manifest),
        media_type=OCI_MANIFEST,
        config=config,
        layers=(layer,),
        platform=("", ""),
    )


def referrer_descriptor(referrer: Image) -> dict[str, Any]:
    """What a referrers answer lists for ``referrer`` (the spec's artifactType rule)."""
    doc = json.loads(referrer.manifest)
    entry: dict[str, Any] = {
        "mediaType": referrer.media_type,
        "digest": referrer.manifest_digest,
        "size": len(referrer.manifest),
        "artifactType": doc.get("artifactType") or doc["config"]["mediaType"],
    }
    if doc.get("annotations"):
        entry["annotations"] = doc["annotations"]
    return entry


def make_referrers_index(referrers: Sequence[Image]) -> Index:
    """The image index a client pushes to the fallback tag ``sha256-<hex>`` of a subject on a
    registry without the referrers API; push it with :func:`push_index` under that tag."""
    entries = [referrer_descriptor(r) for r in referrers]
    manifest = _canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    return Index(manifest, sha256_digest(manifest), OCI_INDEX, tuple(referrers))


def fallback_tag(digest: str) -> str:
    return digest.replace(":", "-", 1)


class PushError(RuntimeError):
    """The registry answered a push step with an unexpected status."""


async def _expect(resp: aiohttp.ClientResponse, *statuses: int) -> None:
    if resp.status not in statuses:
        body = (await resp.text(errors="replace"))[:2000]
        raise PushError(f"{resp.method} {resp.url} -> {resp.status}, expected {statuses}: {body}")


def auth_headers(auth: Auth) -> dict[str, str]:
    if auth is None:
        return {}
    if isinstance(auth, aiohttp.BasicAuth):
        return {"Authorization": auth.encode()}
    return {"Authorization": aiohttp.encode_basic_auth(*auth)}


def _upload_url(base: yarl.URL, location: str, digest: str) -> yarl.URL:
    # Location may be relative or absolute and usually carries an opaque
    # _state query; append ours without re-encoding what is already there.
    target = base.join(yarl.URL(location, encoded=True))
    sep = "&" if target.raw_query_string else "?"
    return yarl.URL(f"{target}{sep}digest={digest}", encoded=True)


async def push_blob(
    session: aiohttp.ClientSession,
    registry_url: str,
    name: str,
    blob: Blob,
    *,
    auth: Auth = None,
    timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
) -> bool:
    """Upload one blob monolithically; returns False if it already existed."""
    base = yarl.URL(registry_url)
    hdrs = auth_headers(auth)
    blob_url = base / "v2" / name / "blobs" / blob.digest
    async with session.head(blob_url, headers=hdrs, timeout=timeout) as resp:
        if resp.status == 200:
            return False
        await _expect(resp, 404)
    start = base / "v2" / name / "blobs" / "uploads" / ""
    async with session.post(start, headers=hdrs, timeout=timeout) as resp:
        await _expect(resp, 202)
        location = resp.headers.get("Location")
        if not location:
            raise PushError(f"POST {start} returned 202 without a Location header")
    put_url = _upload_url(base, location, blob.digest)
    put_hdrs = {**hdrs, "Content-Type": "application/octet-stream"}
    async with session.put(put_url, data=blob.data, headers=put_hdrs, timeout=timeout) as resp:
        await _expect(resp, 201)
    return True


async def push_manifest(
    session: aiohttp.ClientSession,
    registry_url: str,
    name: str,
    reference: str,
    manifest: bytes,
    media_type: str,
    *,
    auth: Auth = None,
    timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
) -> None:
    url = yarl.URL(registry_url) / "v2" / name / "manifests" / reference
    hdrs = {**auth_headers(auth), "Content-Type": media_type}
    async with session.put(url, data=manifest, headers=hdrs, timeout=timeout) as resp:
        await _expect(resp, 201)
        stored = resp.headers.get("Docker-Content-Digest")
        if stored is not None and stored != sha256_digest(manifest):
            raise PushError(f"registry stored {stored}, expected {sha256_digest(manifest)}")


async def push_image(
    session: aiohttp.ClientSession,
    registry_url: str,
    name: str,
    image: Image,
    tag: str | None = None,
    *,
    auth: Auth = None,
    timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
) -> None:
    """Push blobs (skipping existing ones), then the manifest by tag or digest."""
    for blob in image.blobs:
        await push_blob(session, registry_url, name, blob, auth=auth, timeout=timeout)
    ref = tag or image.manifest_digest
    await push_manifest(
        session, registry_url, name, ref, image.manifest, image.media_type, auth=auth, timeout=timeout
    )


async def push_index(
    session: aiohttp.ClientSession,
    registry_url: str,
    name: str,
    index: Index,
    tag: str | None = None,
    *,
    auth: Auth = None,
    timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
) -> None:
    """Push every image by digest (registries require them first), then the index."""
    for image in index.images:
        await push_image(session, registry_url, name, image, auth=auth, timeout=timeout)
    ref = tag or index.digest
    await push_manifest(
        session, registry_url, name, ref, index.manifest, index.media_type, auth=auth, timeout=timeout
    )
