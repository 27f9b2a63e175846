"""Pure: manifest media types, what a client's ``Accept`` asks for, and what a body really is.

A registry stores one manifest per tag and negotiates only when the client does not accept its
type (distribution 2.8, measured: a Docker manifest list asked for with only the Docker v2 type
answers the linux/amd64 manifest, with no ``Accept`` a schema 1 conversion; an OCI index that is
not accepted answers 404). So the answer for a tag is a function of the tag *and* the set of
types the client accepts; :func:`accept_key` names that set, and a cache keeps one answer per
key. Two inferences are always safe: an index or list answer is the stored manifest itself
(negotiation only ever goes from an index down to a platform manifest), and so is any answer
to a set that accepts every index type (there was no index to negotiate away); either is what
any client that accepts its type would get.

The body decides its own type: the digest covers the body, not upstream's ``Content-Type``, and
a captive portal's HTML page or an ``application/octet-stream`` header says nothing about what
the bytes are.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from proxy.core import jsontext

OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1: Final = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# The short-lived OCI 1.1 release candidate artifact manifest; some registries still hold them.
OCI_ARTIFACT: Final = "application/vnd.oci.artifact.manifest.v1+json"

# What we ask upstream for when a client names no type (or ``*/*``): every current one, most
# capable first. Registries answer a request without them with a schema 1 conversion or a 404.
MANIFEST_TYPES: Final = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_LIST})
KNOWN_TYPES: Final = frozenset({*MANIFEST_TYPES, DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, OCI_ARTIFACT})

# RFC 9110 media-type token syntax, lowercase after folding; anything else in Accept is dropped.
_TYPE_RE: Final = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+*-]+")
# The spec lets registries refuse manifests over 4 MiB; we refuse to buffer more than that,
# and never read a stored object larger than this as a manifest.
MANIFEST_MAX: Final = 4 * 1024 * 1024
# A hostile client cannot make a tag keep unboundedly many answers or a huge key.
MAX_ACCEPTED: Final = 16


class NotAManifest(ValueError):
    """The bytes are not a manifest (an HTML page, a blob, broken JSON)."""


def accepted_types(accept_headers: Iterable[str]) -> frozenset[str] | None:
    """The media types a client accepts, or None for anything (no header, or ``*/*``).

    Parameters are dropped except ``q=0``, which RFC 9110 12.4.2 defines as "not acceptable".
    """
    return _accepted(tuple(accept_headers))


@functools.lru_cache(maxsize=256)
def _accepted(accept_headers: tuple[str, ...]) -> frozenset[str] | None:
    # Clients send the same few headers on every request: a pure function worth remembering.
    types: set[str] = set()
    for header in accept_headers:
        for part in header.split(","):
            name, *params = (p.strip() for p in part.split(";"))
            name = name.lower()
            if any(_is_q_zero(p) for p in params):
                continue
            if name in ("*/*", "application/*"):  # every manifest type is application/...
                return None
            if _TYPE_RE.fullmatch(name):
                types.add(name)
    if not types:
        return None
    if len(types) > MAX_ACCEPTED:
        # Keep the ones we know, then an arbitrary but deterministic rest.
        ordered = sorted(types, key=lambda t: (t not in KNOWN_TYPES, t))
        types = set(ordered[:MAX_ACCEPTED])
    return frozenset(types)


def _is_q_zero(param: str) -> bool:
    key, _, value = param.partition("=")
    if key.strip().lower() != "q":
        return False
    try:
        return float(value.strip()) == 0.0
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)
def accept_key(accepted: frozenset[str] | None) -> str:
    """A stable name for a set of accepted types; "anything" is the set we then ask for."""
    return ",".join(sorted(accepted if accepted is not None else MANIFEST_TYPES))


def upstream_accept(accepted: frozenset[str] | None) -> str:
    """The ``Accept`` header to send upstream for a client that accepts ``accepted``."""
    if accepted is None:
        return ", ".join(MANIFEST_TYPES)
    # Most capable first, as clients send them; the order carries no weight for registries.
    return ", ".join(sorted(accepted, key=lambda t: (t not in MANIFEST_TYPES, _rank(t), t)))


def _rank(media_type: str) -> int:
    return MANIFEST_TYPES.index(media_type) if media_type in MANIFEST_TYPES else len(MANIFEST_TYPES)


def accepts(accepted: frozenset[str] | None, media_type: str) -> bool:
    return accepted is None or media_type in accepted


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def manifest_type(body: bytes) -> str:
    """The media type of a manifest, from its own bytes; raises :class:`NotAManifest`.

    The ``mediaType`` field wins when present (OCI makes it optional, Docker requires it);
    without it, the shape decides: ``manifests`` makes an index, ``config`` and ``layers`` an
    image manifest. Schema 1 is recognised by ``fsLayers`` (signed when it has signatures).
    """
    try:
        doc = jsontext.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotAManifest("not JSON") from exc
    if not isinstance(doc, dict):
        raise NotAManifest("not a JSON object")
    version = doc.get("schemaVersion")
    if version == 1 and isinstance(doc.get("fsLayers"), list):
        return DOCKER_SCHEMA1_SIGNED if "signatures" in doc else DOCKER_SCHEMA1
    if version != 2:
        raise NotAManifest("no schemaVersion 2")
    declared = doc.get("mediaType")
    if declared is not None:
        if not isinstance(declared, str) or declared not in KNOWN_TYPES:
            raise NotAManifest("unknown mediaType")
        return declared
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
        return OCI_MANIFEST
    raise NotAManifest("neither an image manifest nor an index")


@dataclass(frozen=True, slots=True)
class Described:
    """What a manifest says about others: the digests it needs (an index's manifests; an image
    manifest's config and layers), the platforms of an index, and its OCI 1.1 subject."""

    children: tuple[str, ...] = ()
    platforms: tuple[str, ...] = ()
    subject: str | None = None
    artifact_type: str | None = None


def describe(body: bytes) -> Described:
    """Read the references out of a manifest already known to be one (see
    :func:`manifest_type`); malformed entries are skipped, never trusted."""
    try:
        doc = jsontext.loads(body)
    except (ValueError, UnicodeDecodeError):
        return Described()
    if not isinstance(doc, dict):
        return Described()
    children: list[str] = []
    platforms: list[str] = []
    entries = doc.get("manifests")
    if isinstance(entries, list):
        for entry in entries:
            if not isinstance(entry, dict) or not _is_digest_text(entry.get("digest")):
                continue
            children.append(entry["digest"])
            platform = entry.get("platform")
            if isinstance(platform, dict):
                parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
                platforms.append("/".join(p for p in parts if isinstance(p, str) and p))
    config = doc.get("config")
    if isinstance(config, dict) and _is_digest_text(config.get("digest")):
        children.append(config["digest"])
    layers = doc.get("layers")
    if isinstance(layers, list):
        children += [x["digest"] for x in layers if isinstance(x, dict) and _is_digest_text(x.get("digest"))]
    for fs_layer in doc.get("fsLayers", []) if isinstance(doc.get("fsLayers"), list) else []:
        if isinstance(fs_layer, dict) and _is_digest_text(fs_layer.get("blobSum")):
            children.append(fs_layer["blobSum"])
    subject = doc.get("subject")
    subject_digest = subject.get("digest") if isinstance(subject, dict) else None
    artifact = doc.get("artifactType")
    if not isinstance(artifact, str) and isinstance(config, dict):
        artifact = config.get("mediaType")
    return Described(
        children=tuple(dict.fromkeys(children)),
        platforms=tuple(p for p in platforms if p and not any(c.isspace() for c in p) and len(p) <= 64),
        subject=subject_digest if _is_digest_text(subject_digest) else None,
        artifact_type=artifact if isinstance(artifact, str) and len(artifact) <= 255 else None,
    )


_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def _is_digest_text(value: object) -> bool:
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None
