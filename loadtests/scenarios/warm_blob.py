"""Warm blob: a cached 100 MiB blob over 8 keep-alive connections, next to nginx and distribution.

Every server holds the same bytes: nginx serves the file (sendfile, 2 workers, no access log);
ocicache (its defaults) and CNCF distribution's pull-through proxy have each pulled the blob once
from the upstream registry and serve it from their own cache (:mod:`loadtests.blobs`). Two
workloads: the whole blob, and ``Range: bytes=0-1048575`` again and again. Two clients:
``wrk -t2`` (8 KiB reads) and the sink (1 MiB reads, less CPU per byte). Every placement of the
run. Each answer is checked once, byte for byte, before any timing.

Figure: GB/s received (10^9 bytes). Rows: ocicache / nginx and ocicache / distribution, per
workload, client and placement; target 1.0x or better (issue 12, target 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from loadtests.blobs import Client, cached_blob, throughput_rounds, workloads
from loadtests.fixtures import MiB
from loadtests.harness import Context, Scenario
from loadtests.loadgen import run_sink, run_wrk, wrk_version
from loadtests.report import at_least, compare

NAME: Final = "warm-blob"


@dataclass(frozen=True)
class Sizes:
    blob: int
    connections: int
    seconds: float
    rounds: int
    range_bytes: int


# 2.5 s per measurement (was 3) keeps the whole default run within its 10 minutes.
FULL: Final = Sizes(100 * MiB, 8, 2.5, 2, 1 * MiB)
QUICK: Final = Sizes(1 * MiB, 2, 1.0, 1, 64 * 1024)


def clients(ctx: Context, connections: int, seconds: float) -> dict[str, Client]:
    """wrk -t2 and the sink, with ``connections`` keep-alive connections for ``seconds`` each."""
    script_dir = ctx.dir("wrk")
    ctx.client("wrk", f"wrk {wrk_version()}, 2 threads, reads of 8 KiB; counts response heads too")
    ctx.client("sink", "loadtests/sink.py: one thread per connection, reads of 1 MiB; counts bodies only")
    return {
        "wrk": lambda req, place: run_wrk(
            req, connections=connections, threads=2, seconds=seconds, placement=place, script_dir=script_dir
        ),
        "sink": lambda req, place: run_sink(req, connections=connections, seconds=seconds, placement=place),
    }


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    async with cached_blob(ctx, sz.blob) as blob:
        servers = [await blob.nginx(), await blob.ocicache(), await blob.distribution()]
        wls = workloads(sz.blob, sz.range_bytes)
        await blob.check(servers, wls)
        measured = await throughput_rounds(
            ctx,
            NAME,
            blob,
            servers,
            wls,
            clients(ctx, sz.connections, sz.seconds),
            rounds=sz.rounds,
            seconds=sz.seconds,
        )
    for client, place in measured:
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
                        client=client,
                        placement=place,
                        targets=[at_least(1.0)],
                    )
                )


SCENARIO: Final = Scenario(
    NAME, "cached 100 MiB blob, 8 connections, whole and 1 MiB ranges: GB/s vs nginx and distribution", run
)
