"""Pure: what a manifest points at, as descriptors, and which platforms a user asked for.

An index (or Docker manifest list) points at manifests, each with a platform; an image manifest
points at its config and layers, which are blobs. ``--platform linux/arm64`` selects index
entries whose OS and architecture match (any variant, unless the user named one); entries with
no platform, or ``unknown/unknown`` (BuildKit's attestations), go only with every platform.
Malformed entries are skipped here and never trusted: the bytes a digest names are checked
wherever they are fetched or read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from proxy.core.mediatypes import NotAManifest, is_index, manifest_type

_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_PLATFORM_PART: Final = re.compile(r"[a-z0-9._-]{1,32}")
# Entries one manifest may point at that we follow: far above any real image (a few hundred
# layers, a few dozen platforms), and a bound on what a hostile manifest costs.
CHILDREN_MAX: Final = 10_000


class BadPlatform(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: str
    media_type: str
    size: int
    platform: str | None = None  # os/arch[/variant], index entries only


@dataclass(frozen=True, slots=True)
class Children:
    media_type: str
    manifests: tuple[Descriptor, ...] = ()  # an index's entries
    blobs: tuple[Descriptor, ...] = ()  # a manifest's config, then its layers

    @property
    def is_index(self) -> bool:
        return is_index(self.media_type)


def parse_platform(text: str) -> str:
    """``os/arch`` or ``os/arch/variant``, lowercase; raises :class:`BadPlatform`."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(_PLATFORM_PART.fullmatch(p) for p in parts):
        raise BadPlatform(f"not a platform: {text[:64]!r} (expected OS/ARCH or OS/ARCH/VARIANT)")
    return "/".join(parts)


def platform_selected(platform: str | None, wanted: frozenset[str] | None) -> bool:
    """Whether an index entry for ``platform`` is fetched when ``wanted`` were asked for
    (None: every platform)."""
    if wanted is None:
        return True
    if platform is None:
        return False
    have = platform.split("/")
    for want in wanted:
        parts = want.split("/")
        if have[:2] == parts[:2] and (len(parts) < 3 or have[2:3] == parts[2:3]):
            return True
    return False


def descriptor(entry: Any) -> Descriptor | None:
    if not isinstance(entry, dict):
        return None
    digest, media_type, size = entry.get("digest"), entry.get("mediaType", ""), entry.get("size")
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    if not isinstance(media_type, str):
        media_type = ""
    platform = None
    raw = entry.get("platform")
    if isinstance(raw, dict):
        parts = [raw.get("os"), raw.get("architecture"), raw.get("variant")]
        text = "/".join(p for p in parts if isinstance(p, str) and p)
        platform = text.lower() if text and len(text) <= 64 and not any(c.isspace() for c in text) else None
    return Descriptor(digest, media_type, size, platform)


def _descriptors(entries: Any) -> tuple[Descriptor, ...]:
    if not isinstance(entries, list):
        return ()
    found = [d for e in entries[:CHILDREN_MAX] if (d := descriptor(e)) is not None]
    return tuple(dict.fromkeys(found))


def children(body: bytes) -> Children:
    """The descriptors a manifest points at; raises NotAManifest if it is not one."""
    media_type = manifest_type(body)
    doc = json.loads(body)
    if is_index(media_type):
        return Children(media_type, manifests=_descriptors(doc.get("manifests")))
    if "fsLayers" in doc:
        raise NotAManifest("schema 1 manifests are not supported")
    blobs = _descriptors([doc.get("config")]) + _descriptors(doc.get("layers"))
    return Children(media_type, blobs=tuple(dict.fromkeys(blobs)))


def selected(entries: Iterable[Descriptor], wanted: frozenset[str] | None) -> list[Descriptor]:
    return [e for e in entries if platform_selected(e.platform, wanted)]
