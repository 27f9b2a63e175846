"""One process writes a cache directory: ``serve`` holds ``<cache>/lock``, and so does every
command that writes there (import, prefetch, rm, verify). Another refuses with a message that
names the holder's pid.

An advisory ``flock`` on the file, which the kernel releases when the holder dies however it
dies (kill -9 included): a stale lock file never blocks a restart. The pid written into it is
only for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Self


class CacheBusy(RuntimeError):
    def __init__(self, root: Path, holder: str) -> None:
        who = f"pid {holder}" if holder else "another process"
        super().__init__(f"the cache directory {root} is in use by {who} (ocicache serve or a command)")
        self.holder = holder


class CacheLock:
    def __init__(self, root: Path) -> None:
        self.path = root / "lock"
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or raise :class:`CacheBusy`. Blocking I/O: run it off the loop."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CacheBusy(self.path.parent, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            # The file stays: removing it would race with a process that just opened it.
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
