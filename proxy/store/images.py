"""Pure: the cache seen as images, for ``ocicache ls``/``rm`` and the admin API.

An image is a tag the catalogue can answer (one row per upstream, repository and tag, showing
its most capable answer: the index over a platform manifest), or a manifest held with no tag
and needed by no other manifest (pulled by digest). Its size on disk is what its manifest
closure holds (a layer shared by two images counts in both, as ``docker images`` shows it).
Removing images removes the files only they need: a blob another remaining image needs, or a
pin needs, stays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.core.mediatypes import is_index
from proxy.store.catalogue import BlobEntry, Catalogue, ManifestInfo, TagAnswer, TagKey
from proxy.store.pins import closure


@dataclass(frozen=True, slots=True)
class ImageRow:
    upstream: str | None  # None: a manifest held by digest only, through no known tag
    repository: str | None
    tag: str | None
    digest: str
    media_type: str
    platforms: tuple[str, ...]
    size: int  # bytes on disk of the manifest and everything it needs that is held
    last_used: float  # the manifest's last use (a pull by tag or digest)
    pinned: bool

    @property
    def reference(self) -> str:
        if self.upstream is None or self.repository is None:
            return self.digest
        name = f"{self.upstream}/{self.repository}"
        return f"{name}:{self.tag}" if self.tag is not None else f"{name}@{self.digest}"


def best_answer(answers: Mapping[str, TagAnswer]) -> TagAnswer | None:
    """The answer to show for a tag: an index if there is one, then the freshest."""
    return max(answers.values(), key=lambda a: (is_index(a.media_type), a.fetched), default=None)


def image_rows(catalogue: Catalogue, pinned: frozenset[str]) -> list[ImageRow]:
    return rows_of(catalogue.tags, catalogue.manifests, catalogue.blobs, pinned)


def rows_of(
    tags: Mapping[TagKey, Mapping[str, TagAnswer]],
    manifests: Mapping[str, ManifestInfo],
    blobs: Mapping[str, BlobEntry],
    pinned: frozenset[str],
) -> list[ImageRow]:
    rows: list[ImageRow] = []
    tagged: set[str] = set()
    for (upstream, repository, tag), answers in sorted(tags.items()):
        answer = best_answer(answers)
        if answer is None or answer.digest not in manifests:
            continue
        tagged.update(a.digest for a in answers.values())
        rows.append(_row(upstream, repository, tag, answer.digest, manifests, blobs, pinned))
    children = {c for info in manifests.values() for c in info.children}
    for digest in sorted(set(manifests) - tagged - children):
        rows.append(_row(None, None, None, digest, manifests, blobs, pinned))
    return rows


def _row(
    upstream: str | None,
    repository: str | None,
    tag: str | None,
    digest: str,
    manifests: Mapping[str, ManifestInfo],
    blobs: Mapping[str, BlobEntry],
    pinned: frozenset[str],
) -> ImageRow:
    info = manifests[digest]
    needed = closure([digest], manifests)
    entry = blobs.get(digest)
    return ImageRow(
        upstream,
        repository,
        tag,
        digest,
        info.media_type,
        info.platforms,
        sum(blobs[d].size for d in needed if d in blobs),
        entry.last_used if entry is not None else 0.0,
        digest in pinned,
    )


def files_only_they_need(
    removed: Iterable[ImageRow],
    kept: Iterable[ImageRow],
    manifests: Mapping[str, ManifestInfo],
    pinned: frozenset[str],
) -> set[str]:
    """The digests that removing ``removed`` frees: in their closures, in no kept image's,
    and not pinned."""
    going = closure([r.digest for r in removed], manifests)
    staying = closure([r.digest for r in kept], manifests)
    return set(going - staying - pinned)
