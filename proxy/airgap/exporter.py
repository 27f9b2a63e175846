"""Export: cached images as an OCI image layout archive (``.tar``, or ``.tar.zst``).

What each reference needs is read from the cache itself: its manifest (by digest, or its tag's
most capable answer), for an index the platform manifests (every one, or those ``platforms``
select), and each image manifest's config and layers. Whatever is missing is prefetched first
when the upstream may be asked (not offline), and the export fails naming what is still
missing otherwise.

The archive is written as a stream: a tar over the output file (through a zstd compressor for
``.tar.zst``), each blob copied from its file in pieces and hashed on the way, so memory stays
small whatever the images weigh, and a blob that rotted on disk stops the export instead of
being carried. It is written under a temporary name beside the output and renamed into place
once whole and fsynced: a failed export leaves no partial archive under the name asked for.
The blobs it copies are pinned against eviction meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import structlog
import zstandard

from proxy.airgap.graph import Descriptor, children, selected
from proxy.airgap.layout import INDEX_JSON, OCI_LAYOUT, blob_name, index_json, layout_file
from proxy.airgap.prefetch import NESTING_MAX, PrefetchProgress, PrefetchReport, human_bytes, prefetch
from proxy.core.imageref import ImageRef
from proxy.core.mediatypes import NotAManifest
from proxy.core.reference import Digest
from proxy.flows.engine import Engine
from proxy.store.catalogue import BLOB
from proxy.store.images import best_answer
from proxy.store.storage import Storage

log = structlog.get_logger("ocicache.export")

# The tar stream's buffer, and the pieces each blob is copied (and hashed) in.
CHUNK: Final = 1024 * 1024
ZSTD_LEVEL: Final = 3


class ExportError(Exception):
    """The export cannot be written; the message names what is missing or wrong."""


@dataclass
class Planned:
    reference: ImageRef
    root: Descriptor
    digests: dict[str, int] = field(default_factory=dict)  # everything it needs -> size


@dataclass
class ExportReport:
    output: Path
    references: list[Planned]
    blobs: int
    bytes: int  # content, before compression
    archive_bytes: int
    prefetched: PrefetchReport | None = None

    def summary(self) -> str:
        return (
            f"exported {len(self.references)} reference{'s' if len(self.references) != 1 else ''}, "
            f"{self.blobs} blobs ({human_bytes(self.bytes)}) to {self.output} "
            f"({human_bytes(self.archive_bytes)})"
        )


def compressed(output: Path) -> bool:
    return output.name.endswith((".tar.zst", ".tzst"))


async def plan(
    engine: Engine, ref: ImageRef, platforms: frozenset[str] | None
) -> tuple[Planned | None, list[str]]:
    """What ``ref`` needs from the cache, or None and what is missing."""
    catalogue = engine.catalogue
    if ref.digest is not None:
        root = str(ref.digest)
    else:
        answer = best_answer(catalogue.answers((ref.upstream, ref.repository, str(ref.tag))))
        if answer is None:
            return None, [f"{ref}: not cached"]
        root = answer.digest
    info = catalogue.manifests.get(root)
    if info is None:
        return None, [f"{ref}: manifest {root} not cached"]
    planned = Planned(ref, Descriptor(root, info.media_type, info.size))
    missing: list[str] = []
    await _visit(engine, planned, planned.root, platforms, missing, 0)
    return (None, missing) if missing else (planned, [])


async def _visit(
    engine: Engine,
    planned: Planned,
    d: Descriptor,
    platforms: frozenset[str] | None,
    missing: list[str],
    depth: int,
) -> None:
    if d.digest in planned.digests:
        return  # listed again (an index may list one manifest many times): walked once
    loaded = await engine.manifests.load(Digest.parse(d.digest))
    if loaded is None:
        missing.append(f"{planned.reference}: manifest {d.digest} not cached")
        return
    body, _ = loaded
    planned.digests[d.digest] = len(body)
    # Hook for referrers (issue 15): ``--with-referrers`` adds the referrers of every manifest
    # visited here (and their blobs) to ``planned.digests``, and to index.json as entries.
    try:
        kids = children(body)
    except NotAManifest as exc:
        missing.append(f"{planned.reference}: {d.digest} is not a manifest we can carry ({exc})")
        return
    if kids.is_index:
        if depth >= NESTING_MAX:
            missing.append(f"{planned.reference}: indexes nested deeper than {NESTING_MAX}")
            return
        chosen = selected(kids.manifests, platforms)
        if not chosen:
            missing.append(f"{planned.reference}: no manifest for the platforms asked for")
        for child in chosen:
            await _visit(engine, planned, child, platforms, missing, depth + 1)
        return
    for blob in kids.blobs:
        if not engine.catalogue.has(blob.digest, BLOB):
            missing.append(f"{planned.reference}: blob {blob.digest} not cached")
            continue
        entry = engine.catalogue.entry(blob.digest)
        assert entry is not None
        planned.digests[blob.digest] = entry.size


async def export(
    engine: Engine,
    references: list[ImageRef],
    output: Path,
    *,
    platforms: frozenset[str] | None = None,
    progress: PrefetchProgress | None = None,
) -> ExportReport:
    await engine.cache.checked()  # no file the start-up size check is about to drop
    plans: list[Planned] = []
    lacking: dict[ImageRef, list[str]] = {}
    for ref in references:
        found, missing = await plan(engine, ref, platforms)
        if found is None:
            lacking[ref] = missing
        else:
            plans.append(found)
    fetched: PrefetchReport | None = None
    if lacking and not engine.settings.offline:
        fetched = await prefetch(engine, list(lacking), platforms=platforms, progress=progress)
        for ref in list(lacking):
            found, missing = await plan(engine, ref, platforms)
            if found is not None:
                plans.append(found)
                del lacking[ref]
            else:
                outcome = next(o for o in fetched.references if o.reference == ref)
                lacking[ref] = [f"{ref}: {outcome.error}"] if outcome.error else missing
    if lacking:
        raise ExportError("\n".join(m for ms in lacking.values() for m in ms[:5]))
    order = {r: i for i, r in enumerate(references)}
    plans.sort(key=lambda p: order[p.reference])
    blobs: dict[str, int] = {}
    for p in plans:
        blobs.update(p.digests)
    with ExitStack() as pins:
        for digest in blobs:
            pins.enter_context(engine.cache.pinned(Digest.parse(digest)))
        entries = [(p.root, str(p.reference)) for p in plans]
        size = await asyncio.to_thread(write_archive, engine.storage, entries, blobs, output)
    report = ExportReport(output, plans, len(blobs), sum(blobs.values()), size, fetched)
    log.info("exported", output=str(output), references=len(plans), blobs=len(blobs), bytes=report.bytes)
    return report


class _Hashing(io.RawIOBase):
    """A file read through a hash, so a blob is checked as it is copied."""

    def __init__(self, f: IO[bytes], algorithm: str) -> None:
        self._f = f
        self.hasher = hashlib.new(algorithm)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.hasher.update(data)
        return data


def write_archive(
    storage: Storage, entries: list[tuple[Descriptor, str]], blobs: dict[str, int], output: Path
) -> int:
    """Write the layout to ``output`` (blocking: run it in a thread); returns its size."""
    temp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(temp, "xb") as raw:
            if compressed(output):
                with zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False) as zst:
                    _write_tar(zst, storage, entries, blobs)
            else:
                _write_tar(raw, storage, entries, blobs)
            raw.flush()
            os.fsync(raw.fileno())
            size = raw.tell()
        os.rename(temp, output)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return size


def _write_tar(
    out: IO[bytes], storage: Storage, entries: list[tuple[Descriptor, str]], blobs: dict[str, int]
) -> None:
    # copybufsize: blobs copied in pieces of CHUNK (tarfile's default is 16 KiB); a TarFile
    # argument that open() passes on, missing from its type stubs.
    extra: dict[str, Any] = {"copybufsize": CHUNK}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK, **extra) as tar:
        for name in ("blobs", *sorted({f"blobs/{d.partition(':')[0]}" for d in blobs})):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, body in ((OCI_LAYOUT, layout_file()), (INDEX_JSON, index_json(entries))):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(body), 0o644
            tar.addfile(info, io.BytesIO(body))
        for text, size in blobs.items():
            digest = Digest.parse(text)
            info = tarfile.TarInfo(blob_name(digest))
            info.size, info.mode = size, 0o444
            try:
                with open(storage.blob_path(digest), "rb") as f:
                    reader = _Hashing(f, digest.algorithm)
                    tar.addfile(info, reader)
            except (OSError, tarfile.TarError) as exc:
                raise ExportError(f"cached blob {text} cannot be read whole: {exc}") from exc
            if reader.hasher.hexdigest() != digest.hex:
                raise ExportError(
                    f"cached blob {text} no longer matches its digest (run ocicache verify); nothing exported"
                )
