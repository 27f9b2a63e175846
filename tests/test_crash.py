"""kill -9 at the worst moment: a restarted proxy serves only whole, verified blobs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp

from tests.support.fake_upstream import BlobFaults, FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


async def start(cache: Path, upstream: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        str(cache),
        "--upstream",
        f"docker.io={upstream}",
        "--log-level",
        "warning",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    match = re.search(rb"listening on (http://\S+)", line)
    assert match, line
    return proc, match.group(1).decode()


async def test_kill_during_fill_leaves_nothing_half_written(
    fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=3 * MiB)
    cache = tmp_path / "cache"
    proc, url = await start(cache, fake.url)
    try:
        resp = await session.get(f"{url}/v2/library/app/blobs/{digest}")
        await resp.content.readexactly(MiB)
        await fake.faults[digest].stalled.wait()
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        resp.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # What the dead proxy left: a partial temp file, and no blob under its digest.
    assert list((cache / "tmp").iterdir()) != []
    assert not (cache / "blobs" / "sha256" / digest.split(":")[1]).exists()

    del fake.faults[digest]
    proc, url = await start(cache, fake.url)
    try:
        assert list((cache / "tmp").iterdir()) == []
        async with session.get(f"{url}/v2/library/app/blobs/{digest}") as again:
            assert again.status == 200
            assert await again.read() == data
    finally:
        # A graceful stop lets a verified download finish its commit.
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert (cache / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == data
    assert list((cache / "tmp").iterdir()) == []
