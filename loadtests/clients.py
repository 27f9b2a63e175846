"""Benchmark clients: groups of aiohttp clients that fetch one blob at the same moment.

A :class:`ClientGroup` runs in the calling process. A :class:`WorkerGroup` runs one in a child
process (``python -m loadtests.clients``), so that the client side can use every core: one
process reading and hashing 20 copies of a 200 MiB blob saturates a core on its own.

Both follow the same steps, which the benchmark drives for all groups together:
``connect`` (open and use each client's connection), ``go`` (send every request now),
``whole_done`` (every reading client has the whole blob), ``release`` (stalled clients leave).
A worker takes its commands on stdin and answers on stdout, one line each, so the steps are
synchronised by messages, never by sleeping. Times are ``time.perf_counter()``, which on Linux is
CLOCK_MONOTONIC and so comparable between processes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Final, Protocol

import aiohttp

from loadtests.procs import spawn_module

MiB: Final = 1024 * 1024

# Client read buffer: large pieces mean fewer wake-ups and hash calls per byte.
READ_BUFSIZE: Final = 1 * MiB
# A stalled client keeps aiohttp's default buffer, so that it stops taking bytes early and the
# kernel's socket buffers, not our process, hold what the proxy already sent.
STALLED_READ_BUFSIZE: Final = 64 * 1024
REQUEST_TIMEOUT: Final = 300.0
STEP_TIMEOUT: Final = 60.0  # connect, start-up, answers to commands: all quick


class ClientError(RuntimeError):
    """A client could not fetch the blob, got a wrong one, or a worker broke its protocol."""


@dataclass
class ClientResult:
    sent: float  # perf_counter when the request went out
    headers: float | None = None  # when the response head had arrived
    first_byte: float | None = None
    done: float | None = None
    received: int = 0
    error: str | None = None

    @property
    def ttfb(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.sent


@dataclass(frozen=True)
class Job:
    base_url: str  # the proxy, http://127.0.0.1:PORT
    path: str  # /v2/<name>/blobs/<digest>
    digest: str  # sha256:<hex>
    size: int
    whole: int  # clients that read the whole blob
    stalled: int  # clients that read one byte and stop
    # Longest a request may take. Over a slow (shaped) upstream link a proxy that fetches once
    # per client needs far longer than the default.
    timeout: float = REQUEST_TIMEOUT


class Group(Protocol):
    async def connect(self) -> None: ...
    async def go(self) -> None: ...
    async def whole_done(self) -> tuple[list[ClientResult], float]: ...
    async def release(self) -> list[ClientResult]: ...
    async def close(self) -> None: ...


async def _read_whole(
    session: aiohttp.ClientSession, url: str, digest: str, size: int, go: asyncio.Event
) -> ClientResult:
    await go.wait()
    result = ClientResult(sent=time.perf_counter())
    hasher = hashlib.sha256()
    try:
        async with session.get(url) as resp:
            result.headers = time.perf_counter()
            if resp.status != 200:
                result.error = f"status {resp.status}: {(await resp.text())[:200]}"
                return result
            while chunk := await resp.content.readany():
                if result.first_byte is None:
                    result.first_byte = time.perf_counter()
                # Inline: the clients use every core through worker processes already (measured
                # at N=20: 2.4 s in two processes, 2.6 s hashing in threads of one process).
                hasher.update(chunk)
                result.received += len(chunk)
        result.done = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.received != size or f"sha256:{hasher.hexdigest()}" != digest:
        result.error = f"bad body: {result.received} bytes, sha256:{hasher.hexdigest()}"
    return result


async def _read_one_byte_then_stall(
    session: aiohttp.ClientSession, url: str, go: asyncio.Event, release: asyncio.Event
) -> ClientResult:
    await go.wait()
    result = ClientResult(sent=time.perf_counter())
    try:
        async with session.get(url) as resp:
            result.headers = time.perf_counter()
            if resp.status != 200:
                result.error = f"status {resp.status}"
                return result
            # Bounded: one that never gets a byte must not hold the run until the whole timeout.
            async with asyncio.timeout(STEP_TIMEOUT):
                await resp.content.readexactly(1)
            result.first_byte = time.perf_counter()
            result.received = 1
            # Stop reading: aiohttp pauses the socket once its buffer is full, the kernel's
            # buffers fill behind it, and then the proxy can no longer send to this client.
            await release.wait()
            # Closing a response in the middle of its body drops the connection.
            resp.close()
    except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _session(read_bufsize: int, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        # One connection per client; connect() opens it before the clock starts.
        connector=aiohttp.TCPConnector(limit=1),
        auto_decompress=False,
        read_bufsize=read_bufsize,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10),
    )


class ClientGroup:
    """``job.whole`` reading and ``job.stalled`` stalling clients in this process."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._sessions = [_session(READ_BUFSIZE, job.timeout) for _ in range(job.whole)]
        self._sessions += [_session(STALLED_READ_BUFSIZE, job.timeout) for _ in range(job.stalled)]
        self._go = asyncio.Event()
        self._release = asyncio.Event()
        self._readers: list[asyncio.Task[ClientResult]] = []
        self._stallers: list[asyncio.Task[ClientResult]] = []
        self._cpu_at_go = 0.0

    async def connect(self) -> None:
        # Open each connection (and let the proxy answer once on it) before the clock starts,
        # so that "at the same moment" is one loop tick apart, not N handshakes apart.
        async def ping(session: aiohttp.ClientSession) -> None:
            async with session.get(f"{self.job.base_url}/v2/") as resp:
                await resp.read()
                if resp.status != 200:
                    raise ClientError(f"GET {self.job.base_url}/v2/ -> {resp.status}")

        await asyncio.gather(*(ping(s) for s in self._sessions))
        job, url = self.job, self.job.base_url + self.job.path
        whole, stalled = self._sessions[: job.whole], self._sessions[job.whole :]
        self._readers = [
            asyncio.create_task(_read_whole(s, url, job.digest, job.size, self._go)) for s in whole
        ]
        self._stallers = [
            asyncio.create_task(_read_one_byte_then_stall(s, url, self._go, self._release)) for s in stalled
        ]

    async def go(self) -> None:
        self._cpu_at_go = time.process_time()
        self._go.set()

    async def whole_done(self) -> tuple[list[ClientResult], float]:
        """The reading clients' results, and this process's CPU seconds since go."""
        results = list(await asyncio.gather(*self._readers))
        return results, time.process_time() - self._cpu_at_go

    async def release(self) -> list[ClientResult]:
        self._release.set()
        return list(await asyncio.gather(*self._stallers))

    async def close(self) -> None:
        for task in self._readers + self._stallers:
            task.cancel()
        await asyncio.gather(*self._readers, *self._stallers, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self._sessions), return_exceptions=True)


# --- the worker process ------------------------------------------------------------------------


class WorkerGroup:
    """A :class:`ClientGroup` in a child process, driven over its stdin and stdout."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None

    async def _send(self, command: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(command.encode() + b"\n")
        await self._proc.stdin.drain()

    async def _expect(self, word: str) -> str:
        """The rest of the worker's next line, which must start with ``word``."""
        assert self._proc is not None and self._proc.stdout is not None
        async with asyncio.timeout(self.job.timeout if word in ("whole", "stalled") else STEP_TIMEOUT):
            line = (await self._proc.stdout.readline()).decode()
        head, _, rest = line.strip().partition(" ")
        if head != word:
            raise ClientError(f"client worker said {line.strip()!r} where {word!r} was due")
        return rest

    async def connect(self) -> None:
        self._proc = await spawn_module("loadtests.clients", json.dumps(asdict(self.job)))
        self.pid = self._proc.pid
        await self._expect("ready")

    async def go(self) -> None:
        await self._send("go")

    async def whole_done(self) -> tuple[list[ClientResult], float]:
        data = json.loads(await self._expect("whole"))
        return [ClientResult(**r) for r in data["results"]], float(data["cpu"])

    async def release(self) -> list[ClientResult]:
        await self._send("release")
        return [ClientResult(**r) for r in json.loads(await self._expect("stalled"))]

    async def close(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # EOF: the worker's cue to leave, whatever step it is at
        try:
            await asyncio.wait_for(proc.wait(), STEP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _worker(job: Job) -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)

    async def command(expected: str) -> None:
        line = (await commands.readline()).decode().strip()
        if line != expected:  # EOF or anything else: the parent gave up
            raise SystemExit(1)

    def answer(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    group = ClientGroup(job)
    try:
        await group.connect()
        answer("ready")
        await command("go")
        await group.go()
        results, cpu = await group.whole_done()
        answer("whole " + json.dumps({"results": [asdict(r) for r in results], "cpu": cpu}))
        await command("release")
        answer("stalled " + json.dumps([asdict(r) for r in await group.release()]))
    finally:
        await group.close()


def worker_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.clients", description="a benchmark client worker")
    p.add_argument("job", help="the Job, as JSON")
    ns = p.parse_args(argv)
    job = Job(**json.loads(ns.job))
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_worker(job))
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
