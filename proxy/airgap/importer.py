"""Import: an OCI image layout (a ``.tar``, ``.tar.zst`` or ``.tar.gz`` archive, or a directory)
into the cache, served afterwards as if it had been pulled.

Reading, in a worker thread (:mod:`.sources`): every blob is hashed as it is read and kept in the staging area
(:mod:`.staging`) only if its bytes match its name; an archive must end with its end-of-archive
marker (anything cut short is refused, whatever the cut hit); names are checked before use
(:func:`proxy.airgap.layout.member`), links and devices refused, ``index.json`` bounded. A
directory is read only as far as ``index.json`` reaches, through no symlink. Then the graph from
``index.json`` is walked over what was read: each manifest must be one (its type read from its
bytes, agreeing with its descriptor), each descriptor's size must be the blob's, and every
blob an image manifest needs must be there. An index may lack some platform manifests (an
export limited by ``--platform``, or a single-platform copy): that is said, not refused.
Anything else wrong refuses the whole input with a message that says what, and nothing of it
is left in the cache.

Committing, on the loop, only once everything was read and checked, in the order the cache's
own paths use: blobs renamed into ``blobs/`` and indexed (as fills commit), manifests with
their rows first and their files after (as :meth:`ManifestStore.keep`), then each reference's
repository is recorded as holding every digest it needs (holders), and its tag's answer is
recorded for every media type (``accept_key(None)``), so that an ``--offline`` proxy serves it
to clients of every kind. A reference without a registry goes to the default upstream; one
whose registry is not configured is imported and recorded under that registry's name, and is
served once the registry is configured.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from proxy.airgap.graph import Descriptor, children
from proxy.airgap.layout import (
    Entry,
    LayoutError,
)
from proxy.airgap.prefetch import NESTING_MAX, human_bytes
from proxy.airgap.sources import read_archive, read_directory
from proxy.airgap.staging import Staging
from proxy.core.imageref import BadReference, ImageRef, parse_image_reference
from proxy.core.mediatypes import MANIFEST_MAX, NotAManifest, accept_key, describe
from proxy.core.reference import Digest
from proxy.flows.engine import Engine
from proxy.store.catalogue import BLOB, ManifestInfo, TagAnswer

log = structlog.get_logger("ocicache.import")


class ArchiveRefused(Exception):
    """The input is not imported; the message says why. Nothing of it is in the cache."""


@dataclass
class ImportedReference:
    name: str | None  # as index.json names it
    digest: str
    media_type: str
    reference: ImageRef | None = None
    served: bool = False
    note: str | None = None


@dataclass
class _Read:
    entries: list[Entry]
    blobs: dict[str, int] = field(default_factory=dict)  # configs and layers -> size
    manifests: dict[str, ManifestInfo] = field(default_factory=dict)  # children before parents
    closures: dict[str, set[str]] = field(default_factory=dict)  # root -> every digest it needs
    # Manifest -> every digest it needs, once walked: an index may list one manifest many
    # times, nested, and each is still read once.
    walked: dict[str, set[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    source: Path
    references: list[ImportedReference]
    blobs_added: int = 0
    bytes_added: int = 0
    already_cached: int = 0
    manifests: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        served = sum(1 for r in self.references if r.served)
        return (
            f"imported {len(self.references)} reference{'s' if len(self.references) != 1 else ''} "
            f"({served} served) from {self.source}: {self.blobs_added} blobs added "
            f"({human_bytes(self.bytes_added)}), {self.already_cached} already cached, "
            f"{self.manifests} manifests"
        )


async def import_layout(engine: Engine, source: Path) -> ImportReport:
    """Import ``source``; raises :class:`ArchiveRefused` and leaves the cache as it was."""
    await engine.cache.checked()  # what the cache holds, as the start-up size check left it
    held = {d: e.size for d, e in engine.catalogue.blobs.items()}
    stop = threading.Event()
    staging = Staging(engine.storage, held, stop, limit=engine.cache.max_bytes)
    try:
        reading = asyncio.ensure_future(asyncio.to_thread(_read, source, staging))
        try:
            read = await asyncio.shield(reading)
        except asyncio.CancelledError:
            stop.set()  # the thread stops at its next piece; then its files are discarded
            await asyncio.wait([reading])
            raise
        except LayoutError as exc:
            raise ArchiveRefused(f"{source}: refused, nothing imported: {exc}") from None
        except OSError as exc:
            raise ArchiveRefused(f"{source}: refused, nothing imported: {exc.strerror or exc}") from None
        return await _commit(engine, source, staging, read)
    finally:
        await asyncio.to_thread(staging.discard)


# --- reading (worker thread) ------------------------------------------------------------------


def _read(source: Path, staging: Staging) -> _Read:
    if source.is_dir():
        entries, fetch = read_directory(source, staging)
    else:
        entries = read_archive(source, staging)
        fetch = staging.has
    read = _Read(entries)
    for i, entry in enumerate(entries):
        where = f"index.json manifests[{i}]" + (f" ({entry.name})" if entry.name else "")
        read.closures[entry.descriptor.digest] = _visit(read, staging, fetch, entry.descriptor, where, 0)
    return read


def _visit(
    read: _Read, staging: Staging, fetch: Callable[[str], bool], d: Descriptor, where: str, depth: int
) -> set[str]:
    known = read.walked.get(d.digest)
    if known is not None:
        info = read.manifests[d.digest]
        if d.size != info.size or (d.media_type and d.media_type != info.media_type):
            raise LayoutError(f"{where}: the descriptor of {d.digest} does not describe it")
        return known
    if not fetch(d.digest):
        raise LayoutError(f"{where} names {d.digest}, which is not in it")
    size = staging.size_of(d.digest)
    if size != d.size:
        raise LayoutError(f"{where}: {d.digest} is {size} bytes, its descriptor says {d.size}")
    if size > MANIFEST_MAX:
        raise LayoutError(f"{where}: {d.digest} is too large to be a manifest")
    body = staging.read(d.digest, MANIFEST_MAX)
    try:
        kids = children(body)
    except NotAManifest as exc:
        raise LayoutError(f"{where}: {d.digest} is not a manifest ocicache can serve ({exc})") from None
    if d.media_type and d.media_type != kids.media_type:
        raise LayoutError(f"{where}: {d.digest} is a {kids.media_type}, its descriptor says {d.media_type}")
    needs = {d.digest}
    if kids.is_index:
        if depth >= NESTING_MAX:
            raise LayoutError(f"{where}: indexes nested deeper than {NESTING_MAX}")
        present = 0
        for child in kids.manifests:
            if not fetch(child.digest):
                read.notes.append(
                    f"{where}: the index lists {child.platform or 'a manifest'} ({child.digest}), "
                    "which is not in it: that platform is not served"
                )
                continue
            present += 1
            needs |= _visit(read, staging, fetch, child, f"{where} -> {child.digest}", depth + 1)
        if kids.manifests and not present:
            raise LayoutError(f"{where}: none of the manifests of index {d.digest} is in it")
    else:
        for blob in kids.blobs:
            if not fetch(blob.digest):
                raise LayoutError(f"{where}: manifest {d.digest} needs {blob.digest}, which is not in it")
            blob_size = staging.size_of(blob.digest)
            if blob_size != blob.size:
                raise LayoutError(
                    f"{where}: {blob.digest} is {blob_size} bytes, the manifest says {blob.size}"
                )
            read.blobs[blob.digest] = blob.size
            needs.add(blob.digest)
    read.manifests[d.digest] = ManifestInfo.of(kids.media_type, len(body), describe(body))
    read.walked[d.digest] = needs
    return needs


# --- committing (event loop) ------------------------------------------------------------------


def name_to_reference(
    name: str, configured: Collection[str], default: str
) -> tuple[ImageRef | None, str | None]:
    """The reference ``index.json`` names, and a note when it is not served as it stands."""
    try:
        return parse_image_reference(name, configured, default), None
    except BadReference as exc:
        first = name.partition("/")[0].lower()
        try:
            ref = parse_image_reference(name, [*configured, first], default)
        except BadReference:
            return None, f"not a reference ocicache can serve ({exc}): held, not served"
        return ref, (
            f"registry {first!r} is not configured: imported, not served "
            "(add it to upstreams: and it is, with no new import)"
        )


async def _commit(engine: Engine, source: Path, staging: Staging, read: _Read) -> ImportReport:
    cache, catalogue, storage = engine.cache, engine.catalogue, engine.storage
    names = [u.name for u in engine.settings.upstreams]
    references = []
    for entry in read.entries:
        root = entry.descriptor.digest
        imported = ImportedReference(entry.name, root, read.manifests[root].media_type)
        if entry.name is None:
            imported.note = "no reference name in index.json: held, not served"
        else:
            imported.reference, imported.note = name_to_reference(entry.name, names, names[0])
            ref = imported.reference
            if ref is not None and ref.digest is not None and str(ref.digest) != root:
                raise ArchiveRefused(
                    f"{source}: refused, nothing imported: index.json names {entry.name} for {root}"
                )
            imported.served = ref is not None and imported.note is None
        references.append(imported)

    report = ImportReport(source, references, notes=list(read.notes))
    for text, size in read.blobs.items():
        digest = Digest.parse(text)
        temp = staging.pop(text)
        if temp is not None and text not in catalogue.blobs:
            await asyncio.to_thread(storage.commit, temp, digest)
            await cache.add(digest, size, BLOB)
            report.blobs_added += 1
            report.bytes_added += size
            continue
        if temp is not None:
            temp.unlink(missing_ok=True)
        if text in catalogue.blobs:  # (else this import's own additions evicted it: said below)
            if not catalogue.has(text, BLOB):
                await cache.add(digest, size, BLOB)  # held until now as a manifest only
            report.already_cached += 1
    for text, info in read.manifests.items():
        report.manifests += 1
        temp = staging.pop(text)
        if text in catalogue.manifests:
            if temp is not None:
                temp.unlink(missing_ok=True)
            continue
        if not await catalogue.persist_manifest(text, info):
            raise ArchiveRefused(f"{source}: the catalogue cannot be written (is the disk full?)")
        if text not in catalogue.blobs:
            assert temp is not None  # read it, or the cache held it
            try:
                await asyncio.to_thread(storage.commit, temp, Digest.parse(text))
            except OSError:
                catalogue.forget_manifest_rows(text)
                raise
            report.blobs_added += 1
            report.bytes_added += info.size
        elif temp is not None:
            temp.unlink(missing_ok=True)
        catalogue.index_manifest(text, info)
        cache.note_added()
    now = time.time()
    # Hook for referrers (issue 15): every manifest index.json reaches is imported with its
    # subject (ManifestInfo); unnamed entries whose subject a named one holds are to be
    # confirmed for that reference's repository here, so that they are served with it.
    for imported in references:
        ref = imported.reference
        if ref is None:
            continue
        for needed in sorted(read.closures[imported.digest]):
            await catalogue.add_holder(ref.upstream, ref.repository, needed)
        if ref.tag is not None:
            answer = TagAnswer(imported.digest, imported.media_type, now)
            await catalogue.put_answers((ref.upstream, ref.repository, ref.tag), {accept_key(None): answer})
    await cache.settled()
    imported_digests = set(read.blobs) | set(read.manifests)
    evicted = [d for d in imported_digests if d not in catalogue.blobs]
    if evicted:
        report.notes.append(
            f"the cache budget ({human_bytes(cache.max_bytes)}) is smaller than what was imported: "
            f"{len(evicted)} of its blobs were evicted again"
        )
    log.info(
        "imported",
        source=str(source),
        references=len(references),
        blobs_added=report.blobs_added,
        bytes_added=report.bytes_added,
    )
    return report
