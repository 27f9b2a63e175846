"""Attacks on serve --workers with real processes (see tests/workers/test_attack.py for the
in-process ones)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy.web.runner import share
from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.proxyproc import serving
from tests.system.test_workers import events, worker_pids

MiB = 1024 * 1024
CONNECTIONS = 16


async def test_a_primary_killed_mid_relay_cuts_every_client_off(fake: FakeUpstream, tmp_path: Path) -> None:
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=2 * MiB)
    async with serving(tmp_path / "cache", {"docker.io": fake.url}, "--workers", "2", logs=True) as proxy:
        url = f"{proxy.url}/v2/library/app/blobs/{digest}"
        started = [asyncio.Event() for _ in range(CONNECTIONS)]

        async def pull(n: int) -> str:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as own:
                async with own.get(url) as resp:
                    got = await resp.content.readexactly(1024)
                    started[n].set()
                    try:
                        got += await resp.read()
                    except aiohttp.ClientPayloadError:
                        return "aborted"
                    return "whole" if got == data else f"clean end after {len(got)} bytes"

        pulls = [asyncio.create_task(pull(n)) for n in range(CONNECTIONS)]
        for ev in started:
            await ev.wait()
        proxy.proc.kill()
        await proxy.proc.wait()
        answers = await asyncio.gather(*pulls)
    assert answers == ["aborted"] * CONNECTIONS


async def _hold_connections(host: str, port: int, n: int) -> tuple[list[asyncio.StreamWriter], int]:
    """Open ``n`` keep-alive connections from 127.0.0.1, one request on each; those admitted
    stay open. Returns them and how many were admitted."""
    held = []
    admitted = 0
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, port)
        held.append(writer)
        try:
            writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            continue  # refused: a 429 and a close, which our request may have crossed
        if head.startswith(b"HTTP/1.1 200"):
            admitted += 1  # and it stays open (keep-alive), counted against the address
    return held, admitted


async def test_one_address_is_held_to_its_share_in_every_process(fake: FakeUpstream, tmp_path: Path) -> None:
    # Each process counts connections per address on its own: unshared, with N processes one
    # address could hold N times max_connections_per_address. Each holds its share (with a
    # margin for the kernel's uneven spread: tests/workers/test_pure.py).
    limit = 64
    cfg = tmp_path / "ocicache.yaml"
    cfg.write_text(f"max_connections_per_address: {limit}\n")
    async with serving(
        tmp_path / "cache", {"docker.io": fake.url}, "--workers", "2", "--config", str(cfg), logs=True
    ) as proxy:
        await worker_pids(proxy)
        host, port = proxy.host.rsplit(":", 1)
        held, admitted = await _hold_connections(host, int(port), 2 * limit)
        for writer in held:
            writer.close()
    assert admitted <= 2 * share(limit, 2) < 2 * limit, f"{admitted} connections admitted from one address"


async def test_connections_a_worker_refuses_are_counted_in_metrics(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    # The worker's runner has no Metrics (its app has no keys.METRICS): its refusals, and its
    # open connections, never reach /metrics.
    cfg = tmp_path / "ocicache.yaml"
    cfg.write_text("max_connections_per_address: 2\n")
    async with serving(
        tmp_path / "cache", {"docker.io": fake.url}, "--workers", "2", "--config", str(cfg), logs=True
    ) as proxy:
        await worker_pids(proxy)
        host, port = proxy.host.rsplit(":", 1)
        held, admitted = await _hold_connections(host, int(port), 32)
        for writer in held:
            writer.close()
        refused: list[float] = []
        # From another loopback address: this one is at its limit until the server has seen
        # the held connections close.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=other) as session:
            # Workers report each second: look until their part is in (each look an answer).
            for _ in range(10_000):
                async with session.get(f"{proxy.url}/metrics") as resp:
                    text = await resp.text()
                refused = [
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith('ocicache_connections_refused_total{reason="address_limit"}')
                ]
                if refused == [32 - admitted]:
                    break
    assert refused == [32 - admitted], (refused, admitted)


# Loaded by every Python the proxy starts (PYTHONPATH): a worker started while the gate is
# armed waits at its very beginning, before it could install any signal handler, until the
# test has done what it wants with it.
_HOLD_A_STARTING_WORKER = """
import os, sys
if "proxy.workers" in sys.orig_argv:
    gate = os.environ["OCICACHE_TEST_GATE"]
    try:
        os.unlink(gate + ".armed")
    except FileNotFoundError:
        pass
    else:
        with open(gate, "rb") as fifo:
            fifo.read()
"""


async def test_a_sighup_while_a_worker_starts_does_not_kill_it(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The primary forwards SIGHUP (systemctl reload, a renewed certificate) to every worker
    # process that has not exited, also one that is still starting: SIGHUP's default action
    # ends it (code -1), and it is restarted only after a longer pause.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_HOLD_A_STARTING_WORKER)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    monkeypatch.setenv("OCICACHE_TEST_GATE", str(gate))
    async with serving(tmp_path / "cache", {"docker.io": fake.url}, "--workers", "2", logs=True) as proxy:
        (pid,) = await worker_pids(proxy)
        Path(f"{gate}.armed").touch()
        os.kill(pid, signal.SIGKILL)
        # Opening the FIFO for writing returns once the restarted worker has opened it: it runs.
        fifo = await asyncio.to_thread(open, gate, "wb")
        proxy.proc.send_signal(signal.SIGHUP)
        await proxy.logged(lambda ev: any(e.get("event") == "sighup_ignored" for e in ev))
        fifo.close()  # let it go on
        await proxy.logged(
            lambda ev: len([e for e in ev if e.get("event") in ("worker_started", "worker_exited")]) >= 3
        )
    codes = [e["code"] for e in events(proxy, "worker_exited")]
    assert codes[0] == -signal.SIGKILL
    assert -signal.SIGHUP not in codes, codes
