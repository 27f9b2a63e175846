"""One cached blob served by every kind of server, and throughput rounds over them.

The warm-blob scenarios share this: a file of random bytes, an upstream registry holding it,
and servers that each hold the same bytes the way they would in use (nginx from its document
root; ocicache and distribution's proxy from their caches, after one pull through them). Then
rounds of throughput measurements: every client, placement, workload and server in turn, the
servers back to back so that drift in the machine hits them alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

from loadtests.fixtures import (
    UPSTREAM_NAME,
    blob_path,
    link_or_copy,
    make_blob_file,
    push_file_blob,
    size_label,
)
from loadtests.harness import Context, measure
from loadtests.loadgen import LoadResult, Request, check_once
from loadtests.placement import Placement
from loadtests.report import Sample
from loadtests.servers import (
    NginxSettings,
    Server,
    ServerError,
    distribution_blob_file,
    start_distribution,
    start_nginx,
    start_ocicache,
)

FILL_TIMEOUT: Final = 120.0
POLL: Final = 0.05

Client = Callable[[Request, Placement], LoadResult]


@dataclass(frozen=True)
class Workload:
    case: str
    range_header: str | None
    status: int
    body: int

    def request(self, server: Server, path: str) -> Request:
        headers = () if self.range_header is None else (("Range", self.range_header),)
        return Request(server.port, path, headers, self.status, self.body)


def workloads(size: int, range_bytes: int) -> list[Workload]:
    """The whole blob, and ``Range: bytes=0-<range_bytes - 1>``."""
    last = min(range_bytes, size) - 1
    ranges = f"{size_label(last + 1)} ranges"
    return [Workload("whole blob", None, 200, size), Workload(ranges, f"bytes=0-{last}", 206, last + 1)]


def _slug(name: str) -> str:
    """A server's name as a directory name (nginx's config takes no spaces in paths)."""
    return name.replace(" ", "-")


@dataclass
class CachedBlob:
    """A blob file, its digest and path, and the upstream registry that holds it."""

    ctx: Context
    stack: contextlib.ExitStack
    file: Path
    digest: str
    size: int
    upstream: Server

    @property
    def path(self) -> str:
        return blob_path(self.digest)

    def started(self, server: Server) -> Server:
        """Stop ``server`` when the scenario ends, and name it in the report."""
        self.stack.callback(server.stop)
        return self.ctx.server(server)

    async def nginx(self, settings: NginxSettings | None = None, name: str = "nginx") -> Server:
        docroot = self.ctx.dir("docroot")
        target = docroot / self.path.lstrip("/")
        if not target.exists():
            await asyncio.to_thread(link_or_copy, self.file, target)
        prefix = self.ctx.dir(_slug(name))
        return self.started(await asyncio.to_thread(start_nginx, prefix, docroot, settings, name))

    async def ocicache(self, *extra: str, name: str = "ocicache") -> Server:
        """ocicache after pulling the blob once and restarting on the same cache: a graceful stop
        lets the fill commit, so the measured process serves a committed file from the start."""
        upstreams = {UPSTREAM_NAME: self.upstream.url()}
        work = self.ctx.dir(_slug(name))
        first = await asyncio.to_thread(start_ocicache, work, upstreams, *extra, name=name)
        try:
            await asyncio.to_thread(check_once, Request(first.port, self.path, body=self.size), self.digest)
        finally:
            await asyncio.to_thread(first.stop)
        return self.started(await asyncio.to_thread(start_ocicache, work, upstreams, *extra, name=name))

    async def distribution(self, name: str = "distribution") -> Server:
        """distribution's pull-through proxy, once it has stored the blob it was asked for."""
        server = self.started(
            await asyncio.to_thread(
                start_distribution, self.ctx.dir(name), remote=self.upstream.url(), name=name
            )
        )
        await asyncio.to_thread(check_once, Request(server.port, self.path, body=self.size), self.digest)
        await asyncio.to_thread(self._wait_stored, server)
        return server

    def _wait_stored(self, server: Server) -> None:
        # distribution stores a pulled blob beside streaming it, and logs nothing we could wait on.
        data = distribution_blob_file(server.log.parent, self.digest)
        deadline = time.monotonic() + FILL_TIMEOUT
        while time.monotonic() < deadline:
            server.check_alive()
            with contextlib.suppress(OSError):
                if data.stat().st_size == self.size:
                    return
            time.sleep(POLL)  # bounded by the deadline
        raise ServerError(f"{server.name} did not store {self.digest} in {FILL_TIMEOUT:g} s")

    async def check(self, servers: Sequence[Server], wls: Sequence[Workload]) -> None:
        """Every server's answer to every workload, once, byte for byte."""
        head = await asyncio.to_thread(lambda: self.file.read_bytes()[: max(w.body for w in wls)])
        for server in servers:
            for wl in wls:
                want = self.digest if wl.range_header is None else head[: wl.body]
                await asyncio.to_thread(check_once, wl.request(server, self.path), want)


@contextlib.asynccontextmanager
async def cached_blob(ctx: Context, size: int) -> AsyncIterator[CachedBlob]:
    """A blob of ``size`` random bytes pushed to a fresh upstream registry; every server started
    through the yielded :class:`CachedBlob` is stopped on the way out."""
    file = ctx.dir("files") / "blob"
    digest = await asyncio.to_thread(make_blob_file, file, size)
    with contextlib.ExitStack() as stack:
        upstream = await asyncio.to_thread(start_distribution, ctx.dir("upstream"), name="upstream registry")
        stack.callback(upstream.stop)
        ctx.server(upstream)
        async with aiohttp.ClientSession() as session:
            await push_file_blob(session, upstream.url(), file, digest)
        yield CachedBlob(ctx, stack, file, digest, size, upstream)


async def throughput_rounds(
    ctx: Context,
    scenario: str,
    blob: CachedBlob,
    servers: Sequence[Server],
    wls: Sequence[Workload],
    clients: Mapping[str, Client],
    *,
    rounds: int,
    seconds: float,
) -> list[tuple[str, str]]:
    """Measure GB/s of every server for every workload, client and placement, ``rounds`` times;
    returns the (client as it ran, placement) pairs measured, in order."""
    per_round = len(clients) * len(ctx.placements) * len(wls) * len(servers) * (seconds + 0.5)
    labels: dict[tuple[str, str], None] = {}
    for rnd in ctx.rounds(rounds, per_round):
        for name, client in clients.items():
            for place in ctx.placements:
                for wl in wls:
                    for server in servers:
                        req = wl.request(server, blob.path)
                        result, load = await measure(
                            ctx,
                            server=server,
                            place=place,
                            helpers=[blob.upstream],
                            client=functools.partial(client, req, place),
                        )
                        ctx.say(
                            f"  round {rnd} {name:4} {place.name:8} {wl.case:14} {server.name:20} "
                            f"{result.gbps:6.2f} GB/s  {load}"
                        )
                        extra: dict[str, float | int | str] = {
                            "responses": result.responses,
                            "bad": result.bad,
                        }
                        ctx.sample(
                            Sample(
                                scenario,
                                wl.case,
                                server.name,
                                "GB/s",
                                result.gbps,
                                rnd,
                                result.client,
                                place.name,
                                load,
                                extra,
                            )
                        )
                        labels[result.client, place.name] = None
    return list(labels)
