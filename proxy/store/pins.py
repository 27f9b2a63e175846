"""Pure: which digests pinned images need, resolved through what the catalogue knows.

A pin is an image reference (``docker.io/library/alpine:3.20``, ``ghcr.io/org/app@sha256:...``).
Its roots are the digest it names, or every answer its tag has (one per accepted set: an index
and the platform manifest a narrow client was given); from each root, the manifests an index
lists and the config and layers a manifest needs, as far as the catalogue holds them. A pin
whose image is not cached yet protects nothing until it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from proxy.core.imageref import BadReference, ImageRef, parse_image_reference
from proxy.store.catalogue import ManifestInfo, TagAnswer, TagKey


def roots_of(ref: ImageRef, tags: Mapping[TagKey, Mapping[str, TagAnswer]]) -> list[str]:
    roots = [str(ref.digest)] if ref.digest is not None else []
    if ref.tag is not None and ref.digest is None:
        roots += [a.digest for a in tags.get((ref.upstream, ref.repository, ref.tag), {}).values()]
    return roots


def closure(roots: Iterable[str], manifests: Mapping[str, ManifestInfo]) -> frozenset[str]:
    """The roots and everything they need, following manifests we hold."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        seen.add(digest)
        info = manifests.get(digest)
        if info is not None:
            todo.extend(info.children)
    return frozenset(seen)


def pinned_digests(
    pins: Iterable[str],
    tags: Mapping[TagKey, Mapping[str, TagAnswer]],
    manifests: Mapping[str, ManifestInfo],
    upstreams: Sequence[str],
) -> frozenset[str]:
    roots: list[str] = []
    for reference in pins:
        try:
            ref = parse_image_reference(reference, upstreams, upstreams[0])
        except BadReference:
            continue  # a pin for an upstream no longer configured protects nothing
        roots += roots_of(ref, tags)
    return closure(roots, manifests)
