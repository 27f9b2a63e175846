"""``ocicache rm``: remove cached images, and the files only they need.

Images are chosen by reference (a tag, or a digest), by repository, or by how long they have
gone unused. A blob another cached image still needs stays, and so does everything a pin
needs (a pinned image asked for is kept, and said so). The tags go first, then the manifests
(so that no half-removed image is left looking whole), then configs and layers; each file
before its row, as eviction removes them, so a crash leaves rows without files, which the next
start drops.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from proxy.airgap.prefetch import human_bytes
from proxy.core.imageref import ImageRef
from proxy.core.reference import Digest
from proxy.flows.engine import Engine
from proxy.store.images import ImageRow, files_only_they_need, image_rows

log = structlog.get_logger("ocicache.rm")


@dataclass
class RemovalReport:
    removed: list[ImageRow] = field(default_factory=list)
    pinned: list[ImageRow] = field(default_factory=list)  # asked for, kept: a pin needs them
    unknown: list[str] = field(default_factory=list)  # references that matched no image
    blobs: int = 0
    bytes: int = 0

    def summary(self) -> str:
        return (
            f"removed {len(self.removed)} image{'s' if len(self.removed) != 1 else ''}; "
            f"freed {self.blobs} blobs, {human_bytes(self.bytes)}"
        )


def matches(row: ImageRow, ref: ImageRef) -> bool:
    same_repo = (row.upstream, row.repository) == (ref.upstream, ref.repository)
    if ref.digest is not None:
        return row.digest == str(ref.digest) and (row.upstream is None or same_repo)
    return same_repo and row.tag == ref.tag


def choose(
    rows: Sequence[ImageRow],
    refs: Sequence[ImageRef] = (),
    repository: ImageRef | None = None,
    unused_before: float | None = None,
) -> tuple[list[ImageRow], list[str]]:
    """The rows to remove, and the references that matched none."""
    chosen: dict[int, ImageRow] = {}
    unknown = []
    for ref in refs:
        found = [i for i, row in enumerate(rows) if matches(row, ref)]
        if not found:
            unknown.append(str(ref))
        chosen.update((i, rows[i]) for i in found)
    if repository is not None:
        for i, row in enumerate(rows):
            if (row.upstream, row.repository) == (repository.upstream, repository.repository):
                chosen[i] = row
    if unused_before is not None:
        chosen.update((i, row) for i, row in enumerate(rows) if row.last_used < unused_before)
    return [chosen[i] for i in sorted(chosen)], unknown


async def remove_images(
    engine: Engine,
    refs: Sequence[ImageRef] = (),
    *,
    repository: ImageRef | None = None,
    unused_for: float | None = None,
) -> RemovalReport:
    catalogue = engine.catalogue
    # After the start-up size check, which drops rows of files gone wrong: what this removes
    # and counts is then what it alone removes.
    await engine.cache.checked()
    pinned = engine.pinned()
    rows = image_rows(catalogue, pinned)
    cutoff = time.time() - unused_for if unused_for is not None else None
    chosen, unknown = choose(rows, refs, repository, cutoff)
    report = RemovalReport(unknown=unknown)
    report.pinned = [r for r in chosen if r.pinned]
    report.removed = [r for r in chosen if not r.pinned]
    going = {id(r) for r in report.removed}
    kept = [r for r in rows if id(r) not in going]
    freed = files_only_they_need(report.removed, kept, catalogue.manifests, pinned)
    for row in report.removed:
        if row.upstream is not None and row.repository is not None and row.tag is not None:
            catalogue.drop_tag((row.upstream, row.repository, row.tag))
    # Roots and other manifests first, then what they point at.
    order = sorted(freed, key=lambda d: (d not in catalogue.manifests, d))
    for digest in order:
        entry = await engine.cache.remove(Digest.parse(digest))
        if entry is not None:
            report.blobs += 1
            report.bytes += entry.size
    await catalogue.flushed()
    log.info("images_removed", images=len(report.removed), blobs=report.blobs, bytes=report.bytes)
    return report
