"""Removing images from the cache by reference (the admin API's DELETE, ``ocicache rm``).

Which rows a reference means is pure (:func:`matching`): a tag names that tag's row; a digest
names every row answering that digest in its repository, and the untagged row of that digest.
What goes is the tags named and the files only they need (:func:`files_only_they_need`): a
blob another cached image needs stays, and so does anything a pin needs. An image that is
itself pinned is not removed: unpin it first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from proxy.core.errors import Code, OciError
from proxy.core.imageref import ImageRef
from proxy.core.reference import Digest
from proxy.flows.engine import Engine
from proxy.store.images import ImageRow, files_only_they_need, image_rows
from proxy.store.pins import closure

log = structlog.get_logger("ocicache.purge")


@dataclass(frozen=True, slots=True)
class Purged:
    removed: list[ImageRow]
    files: int  # files removed
    freed: int  # their bytes
    kept: int  # files the removed images needed that stay (another image or a pin needs them)


def matching(rows: Sequence[ImageRow], ref: ImageRef) -> list[ImageRow]:
    found = []
    for row in rows:
        if ref.digest is not None and row.digest != str(ref.digest):
            continue
        if row.upstream is None:
            # Held by digest only: named by its digest, through any repository.
            if ref.digest is not None and ref.tag is None:
                found.append(row)
            continue
        if (row.upstream, row.repository) != (ref.upstream, ref.repository):
            continue
        if ref.tag is not None and row.tag != ref.tag:
            continue
        found.append(row)
    return found


async def purge(engine: Engine, ref: ImageRef) -> Purged:
    """Remove what ``ref`` names; raises MANIFEST_UNKNOWN if the cache holds nothing it names,
    and CONFLICT if what it names is pinned."""
    catalogue = engine.catalogue
    pinned = engine.pinned()
    rows = image_rows(catalogue, pinned)
    going = matching(rows, ref)
    if not going:
        raise OciError(
            Code.MANIFEST_UNKNOWN, "the cache holds no image by that reference", {"reference": str(ref)}
        )
    held = [r.reference for r in going if r.pinned]
    if held:
        raise OciError(Code.CONFLICT, "pinned: unpin it first", {"pinned": held})
    kept_rows = [r for r in rows if r not in going]
    freeing = files_only_they_need(going, kept_rows, catalogue.manifests, pinned)
    needed = closure([r.digest for r in going], catalogue.manifests)
    for row in going:
        if row.upstream is not None and row.repository is not None and row.tag is not None:
            catalogue.drop_tag((row.upstream, row.repository, row.tag))
    files = freed = 0
    for digest in sorted(freeing):
        entry = await engine.cache.remove(Digest.parse(digest), purge=True)
        if entry is not None:
            files += 1
            freed += entry.size
    kept = len([d for d in needed - freeing if d in catalogue.blobs])
    log.info("images_purged", references=[r.reference for r in going], files=files, freed=freed, kept=kept)
    return Purged(going, files, freed, kept)
