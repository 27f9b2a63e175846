"""Second attack on serve --workers with real processes: each test here failed on the code
it was written against."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.process import pidfd_exited
from tests.support.proxyproc import ROOT, serving
from tests.system.test_workers import worker_pids
from tests.system.test_workers_attack import _hold_connections


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="oc-"))  # a socket path is at most 107 bytes
    yield where
    import shutil

    shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_a_primary_stopped_during_start_up_leaves_nothing_behind(
    fake: FakeUpstream, short_tmp: Path, sig: signal.Signals
) -> None:
    # Workers are spawned, and the relay directory made, before the primary opens its
    # catalogue. Here the catalogue is held by another connection (SQLite's busy timeout,
    # 5 s: as a slow disk or a large reconcile would), so the primary is caught starting,
    # its workers waiting for their orders. SIGTERM: the primary has no handler for it until
    # it listens, so it dies at once (rc -15) without its cleanup; SIGKILL: the same. Either
    # way the workers exit (stdin closed), but the 0700 relay directory stays in $TMPDIR:
    # a worker removes it only when the primary is gone *after* it listened.
    cache = short_tmp / "cache"
    args = [sys.executable, "-m", "proxy", "serve", "--listen", "127.0.0.1:0", "--cache-dir", str(cache)]
    args += ["--upstream", f"docker.io={fake.url}", "--log-level", "info", "--log-format", "json"]
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    async with serving(cache, {"docker.io": fake.url}, "--workers", "1"):
        pass  # the cache and its catalogue exist
    db = sqlite3.connect(cache / "index.db", isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    proc = await asyncio.create_subprocess_exec(
        *args,
        "--workers",
        "3",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        kids: list[int] = []
        async with asyncio.timeout(4):  # within the busy timeout: it is still starting
            while not kids:
                line = await proc.stderr.readline()
                assert line, "it ended before spawning its workers"
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == "workers_spawned":
                        kids = event["pids"]
        pidfds = []
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                pidfds.append(os.pidfd_open(kid))
        proc.send_signal(sig)
        await proc.communicate()
    finally:
        db.execute("ROLLBACK")
        db.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    try:
        for pidfd in pidfds:
            assert await asyncio.to_thread(pidfd_exited, pidfd, 30.0)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    left = sorted(p.name for p in short_tmp.iterdir() if p.name.startswith("ocicache-"))
    assert left == [], f"primary rc {proc.returncode}: relay directories left behind: {left}"


async def test_an_address_under_its_connection_limit_is_not_refused_by_several_processes(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    # Limits.of gives each process ceil(limit / processes) and relies on the kernel spreading
    # "an address's connections evenly". SO_REUSEPORT picks the socket by a hash of the
    # 4-tuple (the client's port included): random, not round-robin. With a limit of 4 over
    # 4 processes (1 each), a client's 4 connections all land on distinct processes with
    # probability 4!/4^4 = 9%: a client well within the documented limit is answered 429.
    cfg = tmp_path / "ocicache.yaml"
    cfg.write_text("max_connections_per_address: 4\n")
    async with serving(
        tmp_path / "cache", {"docker.io": fake.url}, "--workers", "4", "--config", str(cfg), logs=True
    ) as proxy:
        await worker_pids(proxy)
        host, port = proxy.host.rsplit(":", 1)
        rounds = []
        for _ in range(3):
            held, admitted = await _hold_connections(host, int(port), 4)
            rounds.append(admitted)
            for writer in held:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    assert rounds == [4, 4, 4], f"connections admitted of 4, within the limit of 4: {rounds}"
