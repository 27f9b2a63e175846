"""The placement question: what decides ocicache's ratio to nginx on a warm 100 MiB blob.

Issue 12 quotes two measurements of the same thing with ``wrk -t2`` and 8 connections: 0.77-0.84x
nginx from one check and 1.16-1.18x from the project's own benchmark. They could differ in where
client and servers ran and in how the servers were set up. This scenario measures the whole blob
under each of those choices side by side in every round: the placements (unpinned, split,
server-pinned: servers on one core, the client free), the client (wrk -t2, the sink), nginx with
2 workers or 1 and with sendfile on or off, and ocicache with its default logging (info, one
JSON line per request) or with warnings only (as the old ``bench_warm`` ran it).

Not in the default run: ``python -m loadtests --only warm-placement --placements
unpinned,split,server-pinned``. Rows: each ocicache variant over each nginx variant.
"""

from __future__ import annotations

from typing import Final

from loadtests.blobs import cached_blob, throughput_rounds, workloads
from loadtests.harness import Context, Scenario
from loadtests.report import compare
from loadtests.scenarios.warm_blob import FULL, QUICK, clients
from loadtests.servers import NginxSettings

NAME: Final = "warm-placement"
ROUNDS: Final = 3


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    async with cached_blob(ctx, sz.blob) as blob:
        nginxes = [
            await blob.nginx(NginxSettings(workers=2), name="nginx"),
            await blob.nginx(NginxSettings(workers=1), name="nginx 1 worker"),
            await blob.nginx(NginxSettings(workers=2, sendfile=False), name="nginx sendfile off"),
        ]
        ocicaches = [
            await blob.ocicache(),
            await blob.ocicache("--log-level", "warning", name="ocicache warnings"),
        ]
        servers = [*nginxes, *ocicaches]
        whole = workloads(sz.blob, sz.range_bytes)[:1]
        await blob.check(servers, whole)
        measured = await throughput_rounds(
            ctx,
            NAME,
            blob,
            servers,
            whole,
            clients(ctx, sz.connections, sz.seconds),
            rounds=1 if ctx.quick else ROUNDS,
            seconds=sz.seconds,
        )
    for client, place in measured:
        for ocicache in ocicaches:
            for nginx in nginxes:
                ctx.row(
                    compare(
                        ctx.report.samples,
                        scenario=NAME,
                        case=whole[0].case,
                        metric="GB/s",
                        better="higher",
                        subject=ocicache.name,
                        baseline=nginx.name,
                        client=client,
                        placement=place,
                    )
                )


SCENARIO: Final = Scenario(
    NAME,
    "warm 100 MiB blob under each placement, client and server setting: what decides the ratio",
    run,
    False,
)
