"""``serve --workers 2`` as real processes on one port (SO_REUSEPORT): one download however
many processes the clients reach, a killed worker started again, workers that leave with the
primary, and a real client pulling through both."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.dockerd import Blackhole, offline_env
from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.images import make_image, push_image
from tests.support.layout import layout_blobs
from tests.support.process import pidfd_exited
from tests.support.proxyproc import ROOT, ProxyProcess, serving
from tests.support.registry import Registry
from tests.system.test_clients import run_tool

MiB = 1024 * 1024
# Connections opened at once: the kernel spreads them over the two processes by a hash of
# their ports, so all of them landing on one is a 1 in 2**31 chance.
CONNECTIONS = 32


def events(proxy: ProxyProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in proxy.events if e.get("event") == name]


async def worker_pids(proxy: ProxyProcess) -> list[int]:
    """The workers it started (logged before it listens; the log is read as it comes)."""
    await proxy.logged(lambda ev: any(e.get("event") == "listening" for e in ev))
    return [e["pid"] for e in events(proxy, "worker_started")]


async def get_on_own_connection(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as own:
        async with own.get(url, headers=headers) as resp:
            return resp.status, await resp.read()


async def test_a_cold_blob_asked_for_through_both_processes_is_fetched_once(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = BlobFaults(stall_at=2 * MiB)
    async with serving(tmp_path / "cache", {"docker.io": fake.url}, "--workers", "2", logs=True) as proxy:
        assert "2 processes" in proxy.banner
        url = f"{proxy.url}/v2/library/app/blobs/{digest}"
        pulls = [asyncio.create_task(get_on_own_connection(url)) for _ in range(CONNECTIONS)]
        await fake.faults[digest].stalled.wait()
        fake.faults[digest].resume()
        answers = await asyncio.gather(*pulls)
        assert answers == [(200, data)] * CONNECTIONS
        await proxy.logged(lambda ev: len([e for e in ev if e.get("event") == "request"]) >= CONNECTIONS)
    assert fake.count(method="GET", path_contains=f"/blobs/{digest}") == 1
    lines = events(proxy, "request")
    # Every client was answered by the primary's one download, whichever process it reached.
    assert {e["worker"] for e in lines} == {0, 1}
    assert {e["cache"] for e in lines} <= {"miss", "join", "hit"}


async def test_a_killed_worker_is_started_again_and_pulls_go_on(fake: FakeUpstream, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    digest = fake.add_blob(data)
    async with serving(tmp_path / "cache", {"docker.io": fake.url}, "--workers", "2", logs=True) as proxy:
        url = f"{proxy.url}/v2/library/app/blobs/{digest}"
        assert await get_on_own_connection(url) == (200, data)
        (pid,) = await worker_pids(proxy)
        os.kill(pid, signal.SIGKILL)
        await proxy.logged(lambda ev: len([e for e in ev if e.get("event") == "worker_started"]) == 2)
        exited = events(proxy, "worker_exited")
        assert exited[0]["pid"] == pid and exited[0]["code"] == -signal.SIGKILL
        answers = await asyncio.gather(*(get_on_own_connection(url) for _ in range(CONNECTIONS)))
        assert answers == [(200, data)] * CONNECTIONS
        await proxy.logged(lambda ev: any(e.get("event") == "request" and e.get("worker") == 1 for e in ev))
    assert fake.count(method="GET", path_contains=f"/blobs/{digest}") == 1


async def test_workers_leave_when_the_primary_is_killed(fake: FakeUpstream, tmp_path: Path) -> None:
    async with serving(tmp_path / "cache", {"docker.io": fake.url}, "--workers", "3", logs=True) as proxy:
        assert await get_on_own_connection(f"{proxy.url}/v2/") == (200, b"{}")
        pids = await worker_pids(proxy)
        assert len(pids) == 2
        pidfds = [os.pidfd_open(pid) for pid in pids]
        try:
            proxy.proc.kill()
            await proxy.proc.wait()
            for pidfd in pidfds:
                assert await asyncio.to_thread(pidfd_exited, pidfd, 30.0)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        host, port = proxy.host.rsplit(":", 1)
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except ConnectionRefusedError:
            pass
        else:
            writer.close()
            raise AssertionError("something still listens on the port")


async def test_a_graceful_stop_stops_the_workers_first_and_removes_the_socket(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    async with serving(tmp_path / "cache", {"docker.io": fake.url}, "--workers", "2", logs=True) as proxy:
        (pid,) = await worker_pids(proxy)
        pidfd = os.pidfd_open(pid)
        proxy.proc.send_signal(signal.SIGTERM)
        assert await proxy.proc.wait() == 0
        try:
            assert await asyncio.to_thread(pidfd_exited, pidfd, 0.0)  # gone before the primary
        finally:
            os.close(pidfd)
    stopping = events(proxy, "worker_stopping")
    assert stopping and stopping[0]["primary_gone"] is False  # told to stop, not orphaned
    (listening,) = events(proxy, "listening")
    socket_path = Path(listening["workers_socket"])
    assert not socket_path.exists() and not socket_path.parent.exists()


async def test_skopeo_copies_an_image_through_two_processes(
    registry: Registry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(layer_sizes=(3 * MiB, 4096, 70_000), seed=1501)
    await push_image(session, registry.url, "library/app", image, tag="v1")
    async with serving(tmp_path / "cache", {"docker.io": registry.url}, "--workers", "2", logs=True) as proxy:
        blackhole = Blackhole()
        try:
            for n in range(4):  # the first fills the cache; then warm copies, on new connections
                dest = tmp_path / f"copy{n}"
                argv = ["skopeo", "copy", "--src-tls-verify=false", f"docker://{proxy.host}/library/app:v1"]
                code, out = await run_tool(*argv, f"oci:{dest}", env=offline_env(blackhole))
                assert code == 0, out
                blobs = layout_blobs(dest)
                assert blobs[image.manifest_digest] == image.manifest
                for blob in image.blobs:
                    assert blobs[blob.digest] == blob.data
        finally:
            blackhole.close()
        await proxy.logged(lambda ev: len([e for e in ev if e.get("event") == "request"]) >= 4 * 5)
    hits = [e for e in events(proxy, "request") if e["cache"] == "hit" and e.get("worker") == 1]
    assert hits, "the worker answered none of the warm copies itself"


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_port_another_server_holds_is_one_line_not_a_shared_port(
    workers: str, tmp_path: Path
) -> None:
    # With SO_REUSEPORT a second server of this user could bind the port too, and take half
    # of the first one's clients: it must refuse, as one process always did, without a traceback.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        argv = [sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{port}"]
        argv += ["--cache-dir", str(tmp_path / "cache"), "--workers", workers, "--log-level", "error"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        taken.close()
    assert proc.returncode == 1
    assert b"address already in use" in err and b"Traceback" not in err and b"listening" not in out


async def test_a_burst_of_clients_is_relayed_not_refused(fake: FakeUpstream, tmp_path: Path) -> None:
    # A Unix socket refuses a connection (EAGAIN) past its listen backlog where TCP would
    # queue it: with aiohttp's default backlog of 128, a worker relaying a burst of a few
    # hundred requests at once answered many of them 503 "cannot reach the primary".
    addresses = [f"127.0.0.{i}" for i in range(2, 12)]
    async with serving(tmp_path / "cache", {"docker.io": fake.url}, "--workers", "2", logs=True) as proxy:
        await worker_pids(proxy)
        host, port = proxy.host.rsplit(":", 1)
        opened = [
            await asyncio.open_connection(host, int(port), local_addr=(addresses[i % 10], 0))
            for i in range(600)
        ]
        try:
            for _, writer in opened:
                writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            heads = await asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in opened))
        finally:
            for _, writer in opened:
                writer.close()
    statuses = [head.split(b" ", 2)[1] for head in heads]
    assert statuses == [b"200"] * 600
    assert {e.get("worker") for e in events(proxy, "request")} == {0, 1}
