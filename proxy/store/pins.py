"""Pure: which digests pinned images need, resolved through what the catalogue knows.

A pin is an image reference (``docker.io/library/alpine:3.20``, ``ghcr.io/org/app@sha256:...``).
Its roots are the digest it names, or every answer its tag has (one per accepted set: an index
and the platform manifest a narrow client was given); from each root, the manifests an index
lists and the config and layers a manifest needs, as far as the catalogue holds them. A pin
whose image is not cached yet protects nothing until it is.

Pins keep signatures: the referrers the catalogue holds of every manifest in a pinned image
(signatures, SBOMs, attestations), with what they need. Not referrers of referrers: a pin keeps
what verifies the image, not an unbounded web of what refers to that. A referrer of a subject
that is not pinned is ordinary LRU content, and once a subject is gone its referrers are
reached by no pin.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

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


def with_referrers(
    digests: frozenset[str],
    manifests: Mapping[str, ManifestInfo],
    referrers_of: Mapping[str, Collection[str]],
) -> frozenset[str]:
    """``digests`` and the referrers held of each manifest among them, with what they need."""
    referrers = [r for d in digests if d in manifests for r in referrers_of.get(d, ())]
    return digests | closure(referrers, manifests)


def pinned_digests(
    pins: Iterable[str],
    tags: Mapping[TagKey, Mapping[str, TagAnswer]],
    manifests: Mapping[str, ManifestInfo],
    upstreams: Sequence[str],
    referrers_of: Mapping[str, Collection[str]] | None = None,
) -> frozenset[str]:
    roots: list[str] = []
    for reference in pins:
        try:
            ref = parse_image_reference(reference, upstreams, upstreams[0])
        except BadReference:
            continue  # a pin for an upstream no longer configured protects nothing
        roots += roots_of(ref, tags)
    image = closure(roots, manifests)
    return image if not referrers_of else with_referrers(image, manifests, referrers_of)
