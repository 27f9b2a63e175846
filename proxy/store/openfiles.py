"""Open descriptors of cached blobs, kept and shared between responses.

Opening a file is file-system work that belongs in a worker thread, and a thread hop per
request was the largest avoidable cost of small warm requests (containerd fetches layers as
parallel ranges). One descriptor serves any number of concurrent responses, because
``os.sendfile`` takes an explicit offset and never moves the file position. So we keep the
descriptors of recently used blobs open, up to a bound, and close one only when no response is
using it. A blob that eviction removes is dropped here too, so its disk space is freed as soon
as its last reader ends.

Touched only from the event loop thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class _Entry:
    fd: int
    size: int
    users: int
    dropped: bool = False


def _open(path: Path) -> tuple[int, int]:
    """Only a regular file the cache wrote: a symlink (O_NOFOLLOW) or a directory put under a
    digest's name is not that blob, whatever its size, and counts as gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path))
        return fd, st.st_size
    except OSError:
        os.close(fd)
        raise


class OpenFiles:
    def __init__(self, max_open: int = 512) -> None:
        self.max_open = max_open
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._dropped: dict[int, _Entry] = {}  # fd -> entry still in use after a drop

    def __len__(self) -> int:
        return len(self._entries)

    async def acquire(self, key: str, path: Path) -> tuple[int, int]:
        """An open descriptor of ``path`` and its size; hand it back with :meth:`release`.
        Raises FileNotFoundError when the file is gone."""
        entry = self._entries.get(key)
        if entry is None:
            fd, size = await asyncio.to_thread(_open, path)
            entry = self._entries.get(key)  # another request may have opened it meanwhile
            if entry is None:
                entry = _Entry(fd, size, 0)
                self._entries[key] = entry
            else:
                os.close(fd)
        entry.users += 1
        self._entries.move_to_end(key)
        self._trim()
        return entry.fd, entry.size

    def release(self, key: str, fd: int) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.fd != fd:
            entry = self._dropped.get(fd)
            if entry is None:
                return
        entry.users -= 1
        if entry.dropped and entry.users <= 0:
            del self._dropped[fd]
            os.close(fd)
        self._trim()

    def drop(self, key: str) -> None:
        """The blob left the cache: close its descriptor once nobody reads it."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.users > 0:
            entry.dropped = True
            self._dropped[entry.fd] = entry
        else:
            os.close(entry.fd)

    def _trim(self) -> None:
        if len(self._entries) <= self.max_open:
            return
        for key in [k for k, e in self._entries.items() if e.users == 0]:
            if len(self._entries) <= self.max_open:
                break
            os.close(self._entries.pop(key).fd)

    def close(self) -> None:
        for entry in [*self._entries.values(), *self._dropped.values()]:
            os.close(entry.fd)
        self._entries.clear()
        self._dropped.clear()
