"""Where an import reads a layout from: an archive (``.tar``, ``.tar.zst``, ``.tar.gz``, from a
file or a pipe) or a layout directory. Blocking: runs in the importer's worker thread.

An archive is read as one stream, each blob into the staging area as it comes (verified
there), and must end with its end-of-archive marker: a cut anywhere, even between members,
refuses it. Names are checked before use, links and devices refused, ``index.json`` bounded,
the members counted. A directory is read only as far as ``index.json`` reaches (see the
importer's walk), through no symlink, regular files only, each blob once.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final

import zstandard

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
from proxy.airgap.staging import Staging
from proxy.core.reference import DIGEST_HEX, Digest

ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC: Final = b"\x1f\x8b"
# Members an archive may have: a layout holds one file per blob, and images a few hundred.
MEMBERS_MAX: Final = 1_000_000
# The tar stream's read buffer.
TAR_BUFFER: Final = 256 * 1024
# tarfile raises this (not in its __all__, stable since 3.2) for the all-zero block that ends
# an archive; any other way for the members to stop means the archive was cut or is corrupt.
_END_OF_ARCHIVE: Final[type[Exception]] = vars(tarfile)["EOFHeaderError"]


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


def read_archive(path: Path, staging: Staging) -> list[Entry]:
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


def read_directory(root: Path, staging: Staging) -> tuple[list[Entry], Callable[[str], bool]]:
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
