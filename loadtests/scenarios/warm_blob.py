"""Warm blob: a cached 100 MiB blob over 8 keep-alive connections, next to nginx and distribution.

Every server holds the same bytes: nginx serves the file (sendfile, 2 workers, no access log);
ocicache and CNCF distribution's pull-through proxy have each pulled the blob once from the
upstream registry and serve it from their own cache (the upstream stays idle while they are
measured; ocicache is restarted after its pull, so its fill has surely committed). Two workloads:
the whole blob, and ``Range: bytes=0-1048575`` again and again. Two clients: ``wrk -t2`` (8 KiB
reads) and the sink (1 MiB reads, less CPU per byte). Every placement of the run. Within a round
the three servers are measured back to back for each workload, client and placement, so drift in
the machine hits them alike; each answer is checked once before any timing.

Figure: GB/s received (10^9 bytes). Rows: ocicache / nginx and ocicache / distribution, per
workload, client and placement; target 1.0x or better (issue 12, target 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp

from loadtests.fixtures import (
    UPSTREAM_NAME,
    MiB,
    blob_path,
    link_or_copy,
    make_blob_file,
    push_file_blob,
    size_label,
)
from loadtests.harness import Context, Scenario, measure
from loadtests.loadgen import LoadResult, Request, check_once, run_sink, run_wrk, wrk_version
from loadtests.placement import Placement
from loadtests.report import Sample, at_least, compare
from loadtests.servers import (
    Server,
    ServerError,
    distribution_blob_file,
    start_distribution,
    start_nginx,
    start_ocicache,
)

NAME: Final = "warm-blob"
FILL_TIMEOUT: Final = 120.0
POLL: Final = 0.05


@dataclass(frozen=True)
class Sizes:
    blob: int
    connections: int
    seconds: float
    rounds: int
    range_bytes: int


FULL: Final = Sizes(100 * MiB, 8, 3.0, 2, 1 * MiB)
QUICK: Final = Sizes(1 * MiB, 2, 1.0, 1, 64 * 1024)


@dataclass(frozen=True)
class Workload:
    case: str
    range_header: str | None
    status: int
    body: int


def workloads(sz: Sizes) -> list[Workload]:
    last = min(sz.range_bytes, sz.blob) - 1
    ranges = f"{size_label(last + 1)} ranges"
    return [Workload("whole blob", None, 200, sz.blob), Workload(ranges, f"bytes=0-{last}", 206, last + 1)]


def _wait_stored(server: Server, digest: str, size: int) -> None:
    """distribution stores a pulled blob beside streaming it; wait until its file is whole."""
    data = distribution_blob_file(server.log.parent, digest)
    deadline = time.monotonic() + FILL_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        with contextlib.suppress(OSError):
            if data.stat().st_size == size:
                return
        time.sleep(POLL)  # bounded by the deadline; distribution logs nothing we could wait on
    raise ServerError(f"distribution did not store {digest} in {FILL_TIMEOUT:g} s")


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    files = ctx.dir("files")
    blob = files / "blob"
    digest = await asyncio.to_thread(make_blob_file, blob, sz.blob)
    path = blob_path(digest)
    with contextlib.ExitStack() as stack:

        def started(server: Server) -> Server:
            stack.callback(server.stop)
            return ctx.server(server)

        upstream = started(
            await asyncio.to_thread(start_distribution, ctx.dir("upstream"), name="upstream registry")
        )
        async with aiohttp.ClientSession() as session:
            await push_file_blob(session, upstream.url(), blob)
        await asyncio.to_thread(link_or_copy, blob, ctx.dir("docroot") / path.lstrip("/"))
        nginx = started(await asyncio.to_thread(start_nginx, ctx.dir("nginx"), ctx.dir("docroot")))

        # ocicache pulls the blob once, then restarts on the same cache: a graceful stop lets the
        # fill commit, so the measured process serves a committed file from the start.
        upstreams = {UPSTREAM_NAME: upstream.url()}
        first = await asyncio.to_thread(start_ocicache, ctx.dir("ocicache"), upstreams)
        try:
            await asyncio.to_thread(check_once, Request(first.port, path, body=sz.blob), digest)
        finally:
            await asyncio.to_thread(first.stop)
        ocicache = started(await asyncio.to_thread(start_ocicache, ctx.dir("ocicache"), upstreams))

        distribution = started(
            await asyncio.to_thread(start_distribution, ctx.dir("distribution"), remote=upstream.url())
        )
        await asyncio.to_thread(check_once, Request(distribution.port, path, body=sz.blob), digest)
        await asyncio.to_thread(_wait_stored, distribution, digest, sz.blob)

        servers = [nginx, ocicache, distribution]
        wls = workloads(sz)
        prefix = await asyncio.to_thread(lambda: blob.read_bytes()[: sz.range_bytes])
        for server in servers:
            for wl in wls:
                req = _request(server, path, wl)
                await asyncio.to_thread(
                    check_once, req, digest if wl.range_header is None else prefix[: wl.body]
                )

        script_dir = ctx.dir("wrk")
        clients: dict[str, Callable[[Request, Placement], LoadResult]] = {
            "wrk": lambda req, place: run_wrk(
                req,
                connections=sz.connections,
                threads=2,
                seconds=sz.seconds,
                placement=place,
                script_dir=script_dir,
            ),
            "sink": lambda req, place: run_sink(
                req, connections=sz.connections, seconds=sz.seconds, placement=place
            ),
        }
        ctx.client("wrk", f"wrk {wrk_version()}, 2 threads, reads of 8 KiB; counts response heads too")
        ctx.client("sink", "loadtests/sink.py: one thread per connection, reads of 1 MiB; counts bodies only")
        per_round = len(clients) * len(ctx.placements) * len(wls) * len(servers) * (sz.seconds + 0.5)
        labels: dict[tuple[str, str], None] = {}
        for rnd in ctx.rounds(sz.rounds, per_round):
            for name, client in clients.items():
                for place in ctx.placements:
                    for wl in wls:
                        for server in servers:
                            req = _request(server, path, wl)
                            result, load = await measure(
                                ctx,
                                server=server,
                                place=place,
                                helpers=[upstream],
                                client=functools.partial(client, req, place),
                            )
                            ctx.say(
                                f"  round {rnd} {name:4} {place.name:8} {wl.case:14} {server.name:13} "
                                f"{result.gbps:6.2f} GB/s  {load}"
                            )
                            ctx.sample(
                                Sample(
                                    NAME,
                                    wl.case,
                                    server.name,
                                    "GB/s",
                                    result.gbps,
                                    rnd,
                                    result.client,
                                    place.name,
                                    load,
                                    {"responses": result.responses, "bad": result.bad},
                                )
                            )
                            labels[result.client, place.name] = None
        for client_label, place_name in labels:
            for wl in wls:
                for baseline in ("nginx", "distribution"):
                    ctx.row(
                        compare(
                            ctx.report.samples,
                            scenario=NAME,
                            case=wl.case,
                            metric="GB/s",
                            better="higher",
                            subject="ocicache",
                            baseline=baseline,
                            client=client_label,
                            placement=place_name,
                            targets=[at_least(1.0)],
                        )
                    )


def _request(server: Server, path: str, wl: Workload) -> Request:
    headers = () if wl.range_header is None else (("Range", wl.range_header),)
    return Request(server.port, path, headers, wl.status, wl.body)


SCENARIO: Final = Scenario(
    NAME, "cached 100 MiB blob, 8 connections, whole and 1 MiB ranges: GB/s vs nginx and distribution", run
)
