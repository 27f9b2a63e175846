"""Catalogue at scale: start-up, memory at rest and warm manifests with 100,000 blobs and 20,000 tags.

Two cache directories are written directly (:mod:`loadtests.seeded`): one of 100,000 blobs,
20,000 of them manifests each answering a tag, and one of 10 blobs and 5 tags. In each round
ocicache (its defaults, ``--tag-ttl forever``, its upstream a closed port on 127.0.0.1: nothing
here may go upstream) is started on each in turn and timed from its spawn to its "listening"
line, which it prints once the catalogue is reconciled and loaded (target: 3 s or less); its
resident memory (``VmRSS``) is read right then; then ``wrk -t2 -c32`` asks for one tag's
manifest (one in the middle of the 20,000) again and again, under every placement.

Rows: start-up and RSS of the big catalogue against the small one; warm manifest requests/s,
big against small, per placement (target: within 10%, a ratio of 0.9 or more). Writing the
100,000 files takes 15-40 s here (ext4, one directory); it is done once per run.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from loadtests.harness import Context, Scenario, measure
from loadtests.loadgen import Request, check_once, run_wrk, wrk_version
from loadtests.placement import UNPINNED
from loadtests.report import Sample, at_least, at_most, compare
from loadtests.sampling import Meter, cpu_seconds, tree_rss
from loadtests.seeded import UPSTREAM, Tagged, fill
from loadtests.servers import start_ocicache

NAME: Final = "catalogue"
ACCEPT: Final = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
START: Final = "spawn to ready"
CLOSED_PORT: Final = "http://127.0.0.1:9"  # discard: nothing listens; nothing may be asked upstream


@dataclass(frozen=True)
class Sizes:
    blobs: int
    tags: int
    connections: int
    seconds: float
    rounds: int


FULL: Final = Sizes(100_000, 20_000, 32, 3.0, 2)
QUICK: Final = Sizes(2_000, 400, 4, 1.0, 1)
SMALL: Final = (10, 5)


def label(blobs: int, tags: int) -> str:
    return f"{blobs:,} blobs, {tags:,} tags"


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    big_case, small_case = label(sz.blobs, sz.tags), label(*SMALL)
    t0 = time.monotonic()
    caches: dict[str, tuple[Path, Tagged]] = {}
    for case, (blobs, tags) in ((big_case, (sz.blobs, sz.tags)), (small_case, SMALL)):
        root = ctx.dir(f"cache-{blobs}")
        every = await asyncio.to_thread(fill, root, blobs, tags)
        caches[case] = (root, every[len(every) // 2])
    ctx.say(f"  wrote {sz.blobs:,} + {SMALL[0]} blobs in {time.monotonic() - t0:.0f} s")
    ctx.client("wrk", f"wrk {wrk_version()}, 2 threads; p99 from its latency histogram")
    ctx.client(START, "python -m proxy serve started as a subprocess, timed to its listening line")
    ctx.report.servers[f"ocicache ({NAME})"] = (
        f"python -m proxy serve --tag-ttl forever, defaults otherwise, upstream {CLOSED_PORT} (closed)"
    )
    script_dir = ctx.dir("wrk")
    per_round = 2 * (5.0 + len(ctx.placements) * (sz.seconds + 0.5))
    labels: dict[tuple[str, str], None] = {}
    for rnd in ctx.rounds(sz.rounds, per_round):
        order = [big_case, small_case] if rnd % 2 else [small_case, big_case]
        for case in order:
            root, tagged = caches[case]
            with Meter([]) as meter:
                started = time.perf_counter()
                server = await asyncio.to_thread(
                    start_ocicache,
                    ctx.dir(f"proxy-{rnd}-{case.split()[0]}"),
                    {UPSTREAM: CLOSED_PORT},
                    "--tag-ttl",
                    "forever",
                    cache_dir=root,
                )
                ready = time.perf_counter() - started
                usage = meter.usage(0.0)
            try:
                # What the proxy spent starting is the server's (its process is ours).
                cores = usage.as_cores() | {"server": round(cpu_seconds(server.pid) / usage.seconds, 3)}
                at_rest = (tree_rss(server.pid) or 0) / 2**20
                for metric, value in (("start-up s", ready), ("RSS MiB", at_rest)):
                    ctx.sample(Sample(NAME, case, "ocicache", metric, value, rnd, START, UNPINNED, cores))
                req = Request(server.port, tagged.path, (("Accept", ACCEPT),), 200, tagged.size)
                await asyncio.to_thread(check_once, req, tagged.digest)
                for place in ctx.placements:
                    result, load = await measure(
                        ctx,
                        server=server,
                        place=place,
                        client=functools.partial(
                            run_wrk,
                            req,
                            connections=sz.connections,
                            threads=2,
                            seconds=sz.seconds,
                            placement=place,
                            script_dir=script_dir,
                        ),
                    )
                    ctx.say(
                        f"  round {rnd} {case:26} ready {ready:5.2f} s, RSS {at_rest:6.1f} MiB; "
                        f"{place.name:8} {result.rps:8,.0f} req/s p99 {result.p99_ms or 0:.2f} ms  {load}"
                    )
                    extra: dict[str, float | int | str] = {"bad": result.bad, "p99 ms": result.p99_ms or 0.0}
                    ctx.sample(
                        Sample(
                            NAME,
                            case,
                            "ocicache",
                            "requests/s",
                            result.rps,
                            rnd,
                            result.client,
                            place.name,
                            load,
                            extra,
                        )
                    )
                    labels[result.client, place.name] = None
            finally:
                await asyncio.to_thread(server.stop)
    common: dict[str, Any] = {
        "scenario": NAME,
        "subject": "ocicache",
        "baseline": "ocicache",
        "baseline_case": small_case,
    }
    samples = ctx.report.samples
    ctx.row(
        compare(
            samples,
            case=big_case,
            metric="start-up s",
            better="lower",
            client=START,
            placement=UNPINNED,
            targets=[at_most(3.0, on="value")],
            **common,
        )
    )
    ctx.row(
        compare(
            samples,
            case=big_case,
            metric="RSS MiB",
            better="lower",
            client=START,
            placement=UNPINNED,
            **common,
        )
    )
    for client, place_name in labels:
        ctx.row(
            compare(
                samples,
                case=big_case,
                metric="requests/s",
                better="higher",
                client=client,
                placement=place_name,
                targets=[at_least(0.9)],
                **common,
            )
        )


SCENARIO: Final = Scenario(
    NAME,
    "100,000 blobs and 20,000 tags: start-up to ready, RSS at rest, warm manifest requests/s, "
    "vs a 10-blob cache",
    run,
)
