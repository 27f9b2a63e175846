"""Pure: the OCI image layout (image-spec ``image-layout.md``) as export writes it and import
reads it: ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``.

``index.json`` has one descriptor per reference, annotated with the full reference twice:
``org.opencontainers.image.ref.name`` (what ``skopeo copy oci-archive:FILE:REF`` matches) and
``io.containerd.image.name`` (the name ``ctr images import`` gives the image). Reading, the
containerd name wins, since the OCI one is often a bare tag.

Names in an archive are checked before anything is read: an absolute path, a ``..``
component, or a name under ``blobs/`` that is not a digest refuses the archive (nothing is ever
written under an archive's own names, but such an archive is not one we made or skopeo did).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

from proxy.airgap.graph import Descriptor, descriptor
from proxy.core.errors import OciError
from proxy.core.mediatypes import OCI_INDEX
from proxy.core.reference import DIGEST_HEX, Digest

OCI_LAYOUT: Final = "oci-layout"
INDEX_JSON: Final = "index.json"
LAYOUT_VERSION: Final = "1.0.0"
REF_NAME: Final = "org.opencontainers.image.ref.name"
CONTAINERD_NAME: Final = "io.containerd.image.name"
# index.json of 100,000 references is about 40 MiB; of the images one carries, far less.
INDEX_JSON_MAX: Final = 16 * 1024 * 1024
ENTRIES_MAX: Final = 100_000
OCI_LAYOUT_MAX: Final = 4096
NAME_MAX: Final = 512

MemberKind = Literal["layout", "index", "blob", "dir", "other"]


class LayoutError(ValueError):
    """The input is not an OCI image layout we can read; the message says why."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One descriptor of ``index.json`` and the reference it is annotated with, if any."""

    descriptor: Descriptor
    name: str | None


def layout_file() -> bytes:
    return json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()


def check_layout_file(body: bytes) -> None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise LayoutError("oci-layout is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("imageLayoutVersion"), str):
        raise LayoutError("oci-layout has no imageLayoutVersion")


def index_json(entries: list[tuple[Descriptor, str]]) -> bytes:
    """The layout's ``index.json``: each descriptor annotated with its full reference."""
    manifests = [
        {
            "mediaType": d.media_type,
            "digest": d.digest,
            "size": d.size,
            "annotations": {REF_NAME: name, CONTAINERD_NAME: name},
        }
        for d, name in entries
    ]
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return json.dumps(doc, indent=2).encode() + b"\n"


def parse_index_json(body: bytes) -> list[Entry]:
    if len(body) > INDEX_JSON_MAX:
        raise LayoutError(f"index.json is larger than {INDEX_JSON_MAX} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise LayoutError("index.json is not JSON") from None
    if (
        not isinstance(doc, dict)
        or doc.get("schemaVersion") != 2
        or not isinstance(doc.get("manifests"), list)
    ):
        raise LayoutError("index.json is not an image index (schemaVersion 2 with manifests)")
    raw: list[Any] = doc["manifests"]
    if len(raw) > ENTRIES_MAX:
        raise LayoutError(f"index.json lists more than {ENTRIES_MAX} manifests")
    entries = []
    for i, item in enumerate(raw):
        found = descriptor(item)
        if found is None:
            raise LayoutError(f"index.json: manifests[{i}] is not a descriptor (digest, size)")
        entries.append(Entry(found, _name(item.get("annotations"))))
    return entries


def _name(annotations: Any) -> str | None:
    if not isinstance(annotations, dict):
        return None
    for key in (CONTAINERD_NAME, REF_NAME):
        value = annotations.get(key)
        if isinstance(value, str) and value.strip() and len(value) <= NAME_MAX:
            return value.strip()
    return None


def member(name: str) -> tuple[MemberKind, Digest | None]:
    """What an archive member named ``name`` is; raises LayoutError for unsafe names."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise LayoutError(f"unsafe name in the archive: {name[:200]!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayoutError(f"unsafe name in the archive: {name[:200]!r}")
    if parts == [OCI_LAYOUT]:
        return "layout", None
    if parts == [INDEX_JSON]:
        return "index", None
    if (
        not parts
        or parts == ["blobs"]
        or (len(parts) == 2 and parts[0] == "blobs" and parts[1] in DIGEST_HEX)
    ):
        return "dir", None
    if parts[0] == "blobs":
        if len(parts) == 3 and parts[1] in DIGEST_HEX:
            try:
                return "blob", Digest.parse(f"{parts[1]}:{parts[2]}")
            except OciError:
                pass
        raise LayoutError(f"not a blob name: {name[:200]!r} (expected blobs/<algorithm>/<hex>)")
    return "other", None


def blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"
