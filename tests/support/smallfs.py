"""A small file system of its own (tmpfs, mounted by the test; the tests run as root), so that
a full disk is a real ENOSPC from the kernel, not a mocked one."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. "2m") at ``where`` for the duration."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill_up(directory: Path, leave: int = 0) -> Path:
    """Write a filler file until the file system is full, then free ``leave`` bytes of it."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        # Single bytes fill the last partial block (tmpfs allocates by page).
        while True:
            try:
                f.write(b"\0")
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
