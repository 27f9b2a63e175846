"""Shared descriptors of cached blobs: reused, bounded, and closed only when unused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.store.openfiles import OpenFiles


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def make(tmp_path: Path, name: str, data: bytes = b"blob") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def test_one_descriptor_serves_concurrent_readers(tmp_path: Path) -> None:
    files = OpenFiles()
    path = make(tmp_path, "a", b"12345")
    fd1, size = await files.acquire("a", path)
    fd2, _ = await files.acquire("a", path)
    assert fd1 == fd2 and size == 5
    files.release("a", fd1)
    files.release("a", fd2)
    assert is_open(fd1)  # kept for the next request
    files.close()
    assert not is_open(fd1)


async def test_drop_waits_for_the_last_reader(tmp_path: Path) -> None:
    files = OpenFiles()
    path = make(tmp_path, "a")
    fd, _ = await files.acquire("a", path)
    files.drop("a")
    assert is_open(fd)
    assert len(files) == 0
    files.release("a", fd)
    assert not is_open(fd)


async def test_bounded_and_in_use_descriptors_survive_trimming(tmp_path: Path) -> None:
    files = OpenFiles(max_open=2)
    fds = {}
    for name in "abc":
        fds[name], _ = await files.acquire(name, make(tmp_path, name))
    assert len(files) == 3  # all in use: none may be closed
    for name in "abc":
        files.release(name, fds[name])
    assert len(files) == 2
    assert not is_open(fds["a"])  # least recently used went first
    assert is_open(fds["c"])
    files.close()


async def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await OpenFiles().acquire("x", tmp_path / "x")


async def test_only_a_regular_file_is_opened_as_a_blob(tmp_path: Path) -> None:
    # A link put where a blob was, to a file of the right size outside the cache, or a
    # directory there: neither is the blob, and both count as gone (it is fetched again).
    outside = make(tmp_path, "outside", b"x" * 4096)
    link = tmp_path / "link"
    link.symlink_to(outside)
    folder = tmp_path / "folder"
    folder.mkdir()
    files = OpenFiles()
    for path in (link, folder):
        with pytest.raises(FileNotFoundError):
            await files.acquire(path.name, path)
    assert len(files) == 0
    files.close()
