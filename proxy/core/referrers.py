"""Pure: the OCI 1.1 referrers answer, an image index whose entries describe the manifests that
name a subject, and the fallback tag registries without the API use instead.

Every descriptor that reaches a client passes :func:`parse_descriptor`, whether it came from
upstream's referrers answer, a fallback tag's index, or a manifest the cache holds: a hostile
upstream chooses these strings, so each field is checked against its grammar and bounded, and a
descriptor that fails is dropped whole (one with its ``artifactType`` or annotations cut away
would misdescribe its manifest). Only the fields the spec gives referrers are kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.core import jsontext
from proxy.core.errors import Code, OciError
from proxy.core.mediatypes import (
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    KNOWN_TYPES,
    MANIFEST_MAX,
    OCI_INDEX,
)
from proxy.core.reference import Digest

# One page of upstream's answer; a thousand descriptors with their annotations fit easily.
PAGE_MAX: Final = 4 * 1024 * 1024
# Annotations of one descriptor: cosign and notation put a few hundred bytes there.
ANNOTATIONS_MAX: Final = 16 * 1024
ANNOTATION_ENTRIES_MAX: Final = 128
FILTER: Final = "artifactType"
# RFC 6838 restricted names (type/subtype, 127 characters each), case kept as sent.
_MEDIA_TYPE: Final = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_FALLBACK_TAG: Final = re.compile(r"sha256-[0-9a-f]{64}|sha512-[0-9a-f]{64}")
# What a referrer may be: a manifest or an index (schema 1 has no subject to name).
_REFERRER_TYPES: Final = KNOWN_TYPES - {DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED}


class NotAnIndex(ValueError):
    """The bytes are not an OCI image index."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type is not None:
            doc["artifactType"] = self.artifact_type
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc


def is_media_type(value: object) -> bool:
    return isinstance(value, str) and _MEDIA_TYPE.fullmatch(value) is not None


def parse_descriptor(entry: object) -> Descriptor | None:
    """A referrer's descriptor, or None when any field is missing, malformed or too large."""
    if not isinstance(entry, Mapping):
        return None
    media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
    if not isinstance(media_type, str) or media_type not in _REFERRER_TYPES:
        return None
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        return None
    # JSON true is an int to Python; a referrer is a manifest, so no larger than one.
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MANIFEST_MAX:
        return None
    artifact_type = entry.get("artifactType")
    if artifact_type is not None and not is_media_type(artifact_type):
        return None
    annotations = _annotations(entry.get("annotations"))
    if annotations is None:
        return None
    return Descriptor(media_type, digest, size, artifact_type, annotations)


def _annotations(value: object) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return ()
    if not isinstance(value, Mapping) or len(value) > ANNOTATION_ENTRIES_MAX:
        return None
    total = 0
    pairs: list[tuple[str, str]] = []
    for key, text in value.items():
        if not isinstance(key, str) or not key or not isinstance(text, str):
            return None
        total += len(key) + len(text)
        if total > ANNOTATIONS_MAX:
            return None
        pairs.append((key, text))
    return tuple(pairs)


def parse_index(body: bytes) -> tuple[list[Descriptor], int]:
    """The valid descriptors of an image index, and how many entries were dropped; raises
    :class:`NotAnIndex` for anything that is not one (an HTML page, an image manifest)."""
    try:
        doc = jsontext.loads(body)
    except ValueError as exc:
        raise NotAnIndex("not JSON") from exc
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise NotAnIndex("not a schemaVersion 2 document")
    if doc.get("mediaType", OCI_INDEX) != OCI_INDEX:
        raise NotAnIndex("not an OCI image index")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise NotAnIndex("no manifests list")
    found = [d for d in map(parse_descriptor, entries) if d is not None]
    return found, len(entries) - len(found)


def of_manifest(body: bytes, digest: str, media_type: str, artifact_type: str | None) -> Descriptor | None:
    """The descriptor that lists a manifest the cache holds among its subject's referrers:
    with its artifactType (``artifact_type``, as :func:`~proxy.core.mediatypes.describe` read it:
    the manifest's own, else its config's media type) and every annotation it carries."""
    try:
        doc = jsontext.loads(body)
    except ValueError:
        return None
    entry: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(body)}
    if artifact_type is not None:
        entry["artifactType"] = artifact_type
    if isinstance(doc, dict) and "annotations" in doc:
        entry["annotations"] = doc["annotations"]
    return parse_descriptor(entry)


def merged(lists: Iterable[Iterable[Descriptor]], limit: int) -> tuple[list[Descriptor], bool]:
    """The descriptors of ``lists`` in order, each digest once, at most ``limit``; and whether
    some were left out for the limit."""
    seen: dict[str, Descriptor] = {}
    for descriptors in lists:
        for d in descriptors:
            if d.digest in seen:
                continue
            if len(seen) >= limit:
                return list(seen.values()), True
            seen[d.digest] = d
    return list(seen.values()), False


def only(descriptors: Iterable[Descriptor], artifact_type: str | None) -> list[Descriptor]:
    if artifact_type is None:
        return list(descriptors)
    return [d for d in descriptors if d.artifact_type == artifact_type]


def index_body(descriptors: Iterable[Descriptor]) -> bytes:
    """The answer a client gets: always an image index, ``manifests: []`` when empty."""
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d.to_json() for d in descriptors]}
    return json.dumps(doc, separators=(",", ":")).encode()


def encode(descriptors: Iterable[Descriptor]) -> str:
    """Descriptors as stored in the catalogue."""
    return json.dumps([d.to_json() for d in descriptors], separators=(",", ":"))


def decode(text: str) -> tuple[Descriptor, ...]:
    """What :func:`encode` stored, checked again (the database is a file anyone may edit)."""
    try:
        entries = jsontext.loads(text)
    except ValueError:
        return ()
    if not isinstance(entries, list):
        return ()
    return tuple(d for d in map(parse_descriptor, entries) if d is not None)


def fallback_tag(subject: Digest) -> str:
    """The referrers tag schema: ``<alg>-<hex>``, the algorithm cut to 32 characters and the
    hex to 64 (a sha512 tag would not fit a tag's 128 otherwise)."""
    return f"{subject.algorithm[:32]}-{subject.hex[:64]}"


def is_fallback_tag(tag: str) -> bool:
    return _FALLBACK_TAG.fullmatch(tag) is not None


def artifact_type_filter(values: list[str]) -> str | None:
    """The client's ``?artifactType=``: None for none; one media type, or a 400."""
    if not values:
        return None
    if len(values) > 1:
        raise OciError(Code.REQUEST_INVALID, "artifactType may be given once")
    # A "+" sent unescaped (application/spdx+json) arrives decoded as a space, which no media
    # type holds: it can only have been the "+".
    value = values[0].replace(" ", "+")
    if not is_media_type(value):
        raise OciError(
            Code.REQUEST_INVALID, "artifactType is not a media type", {"artifactType": value[:300]}
        )
    return value


def filters_applied(header: str) -> bool:
    """Did upstream's ``OCI-Filters-Applied`` say it filtered by artifactType?"""
    return FILTER in (part.strip() for part in header.split(","))
