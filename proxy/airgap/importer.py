"""Import: an OCI image layout (a ``.tar``, ``.tar.zst`` or ``.tar.gz`` archive, or a directory)
into the cache, served afterwards as if it had been pulled.

Reading, in a worker thread: every blob is hashed as it is read and kept in the staging area
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
import io
import os
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import structlog
import zstandard

from proxy.airgap.graph import Descriptor, children
from proxy.airgap.layout import (
    INDEX_JSON,
    INDEX_JSON_MAX,
    OCI_LAYOUT,
    OCI_LAYOUT_MAX,
    Entry,
    LayoutError,
    check_layout_file,
    member,
    parse_index_json,
)
from proxy.airgap.prefetch import NESTING_MAX, human_bytes
from proxy.airgap.staging import Staging
from proxy.core.imageref import BadReference, ImageRef, parse_image_reference
from proxy.core.mediatypes import MANIFEST_MAX, NotAManifest, accept_key, describe
from proxy.core.reference import DIGEST_HEX, Digest
from proxy.flows.engine import Engine
from proxy.store.catalogue import BLOB, ManifestInfo, TagAnswer

log = structlog.get_logger("ocicache.import")

ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC: Final = b"\x1f\x8b"
# Members an archive may have: a layout holds one file per blob, and images a few hundred.
MEMBERS_MAX: Final = 1_000_000
# The tar stream's read buffer.
TAR_BUFFER: Final = 256 * 1024
# tarfile raises this (not in its __all__, stable since 3.2) for the all-zero block that ends
# an archive; any other way for the members to stop means the archive was cut or is corrupt.
_END_OF_ARCHIVE: Final[type[Exception]] = vars(tarfile)["EOFHeaderError"]


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
        entries, fetch = _read_directory(source, staging)
    else:
        entries = _read_archive(source, staging)
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


def _marked_tarinfo(ended: list[bool]) -> type[tarfile.TarInfo]:
    class Marked(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> Any:
            try:
                return super().fromtarfile(tf)
            except _END_OF_ARCHIVE:
                ended.append(True)
                raise

    return Marked


def _read_archive(path: Path, staging: Staging) -> list[Entry]:
    with open(path, "rb") as f:
        magic = f.read(4)
        # The input may be a pipe: what was read to tell its kind is given back.
        raw = io.BufferedReader(_Prefixed(magic, f), buffer_size=TAR_BUFFER)
        stream: IO[bytes] = raw
        mode = "r|"
        if magic == ZSTD_MAGIC:
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        elif magic[:2] == GZIP_MAGIC:
            mode = "r|gz"
        ended: list[bool] = []
        index: bytes | None = None
        layout = False
        try:
            with tarfile.open(
                fileobj=stream,
                mode=mode,
                tarinfo=_marked_tarinfo(ended),
                bufsize=TAR_BUFFER,  # type: ignore[call-overload]
            ) as tar:
                count = 0
                while (m := tar.next()) is not None:
                    # A stream is read once: tarfile's list of members read so far would only
                    # grow with a hostile archive's millions of empty ones.
                    tar.members.clear()
                    count += 1
                    if count > MEMBERS_MAX:
                        raise LayoutError(f"more than {MEMBERS_MAX} members: not an image layout")
                    kind, digest = member(m.name)
                    if kind == "other" or (kind == "dir" and m.isdir()):
                        continue  # not part of the layout (docker save's manifest.json, ...)
                    if not m.isreg():
                        raise LayoutError(f"{m.name} is not a regular file (links are not followed)")
                    f = tar.extractfile(m)
                    assert f is not None
                    if kind == "layout":
                        check_layout_file(f.read(min(m.size, OCI_LAYOUT_MAX + 1)))
                        layout = True
                    elif kind == "index":
                        if index is not None:
                            raise LayoutError("two index.json files")
                        if m.size > INDEX_JSON_MAX:
                            raise LayoutError(f"index.json is {m.size} bytes, more than {INDEX_JSON_MAX}")
                        index = f.read(m.size)  # no more: a read of the limit would allocate it
                    else:
                        assert digest is not None
                        staging.take(digest, f, m.size, m.name)
        except tarfile.TarError as exc:
            raise LayoutError(f"not a whole tar archive ({exc}): truncated or corrupt") from None
        except zstandard.ZstdError as exc:
            raise LayoutError(f"corrupt zstd stream ({exc})") from None
        except (EOFError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the disk, not the archive
            raise LayoutError(f"cut short or corrupt ({exc})") from None
    if not ended:
        raise LayoutError("the archive ends before its end-of-archive marker: truncated or corrupt")
    if index is None or not layout:
        missing = "index.json" if index is None else "oci-layout"
        raise LayoutError(f"no {missing}: not an OCI image layout archive")
    return parse_index_json(index)


class _Prefixed(io.RawIOBase):
    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        self._prefix = prefix
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n], self._prefix = self._prefix[:n], self._prefix[n:]
            return n  # a short read, which the buffered reader above takes
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)


def _open_regular(path: Path, limit: int | None) -> tuple[int, int]:
    """A descriptor and size of a regular file, through no symlink at its last component."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the name is a symlink
            raise LayoutError(f"{path.name} is a symlink; a layout directory is read through none") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise LayoutError(f"{path} is not a regular file")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise LayoutError(f"{path.name} is {st.st_size} bytes, more than {limit}")
    return fd, st.st_size


def _real_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise LayoutError(f"{path} is a symlink; a layout directory is read through none")
    return stat.S_ISDIR(st.st_mode)


def _small_file(path: Path, limit: int) -> bytes:
    try:
        fd, size = _open_regular(path, limit)
    except FileNotFoundError:
        raise LayoutError(f"no {path.name}: not an OCI image layout directory") from None
    with os.fdopen(fd, "rb") as f:
        return f.read(size)  # its size, checked: a read of the limit would allocate the limit


def _read_directory(root: Path, staging: Staging) -> tuple[list[Entry], Callable[[str], bool]]:
    check_layout_file(_small_file(root / OCI_LAYOUT, OCI_LAYOUT_MAX))
    entries = parse_index_json(_small_file(root / INDEX_JSON, INDEX_JSON_MAX))
    blobs = root / "blobs"
    usable = {alg for alg in DIGEST_HEX if _real_dir(blobs) and _real_dir(blobs / alg)}

    checked: set[str] = set()

    def fetch(text: str) -> bool:
        """Read and check the blob once if the directory has it; else the cache may."""
        if text in checked:
            return True
        digest = Digest.parse(text)
        if digest.algorithm not in usable:
            return staging.has(text)
        name = f"blobs/{digest.algorithm}/{digest.hex}"
        try:
            fd, size = _open_regular(blobs / digest.algorithm / digest.hex, None)
        except FileNotFoundError:
            return staging.has(text)
        with os.fdopen(fd, "rb") as f:
            staging.take(digest, f, size, name)
            if f.read(1):
                raise LayoutError(f"{name} grew while it was read")
        checked.add(text)
        return True

    return entries, fetch


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
