"""Parallel fills: a cold 200 MiB blob behind a link that caps each connection, and behind one
that all connections share.

The engine is :mod:`loadtests.fanout`: fresh proxies (empty caches) in front of one upstream
registry holding 200 MiB of random bytes, clients (aiohttp, over one worker process per CPU)
that check the sha256 of every byte, upstream bytes from the upstream's own log.

* **10 MB/s per connection** (the relay gives each TCP stream its own 10 MB/s, as CDNs and long
  links do): one client, through ocicache with its defaults (a blob over
  ``parallel_fill_threshold`` is fetched as ``fill_connections`` ranged GETs), through ocicache
  with ``fill_connections: 1`` (one stream), and through distribution's proxy. Figure: MB/s
  (blob bytes over the client's wall time); target 3x one stream and 3x distribution, upstream
  bytes 1.00 blob.
* **50 MB/s shared** (one bucket for every connection, a site's uplink): 1 and 20 clients (the
  cold fan-out), ocicache's defaults against ``fill_connections: 1``. Figure: seconds; target no
  slower (1.05x: the noise of a shaped run).

One pass each: runs over a shaped link barely vary, and one stream at 10 MB/s takes 21 s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from loadtests import cold, fanout
from loadtests.fanout import ProxyKind
from loadtests.fixtures import MiB, size_label
from loadtests.harness import Context, Scenario
from loadtests.placement import UNPINNED
from loadtests.report import Better, Sample, Target, at_least, at_most, compare
from loadtests.shaper import MB

NAME: Final = "parallel-fill"
DEFAULTS: Final = "ocicache"
ONE_STREAM: Final = "ocicache fill_connections=1"
RUN_BOUND: Final = 300.0


@dataclass(frozen=True)
class Sizes:
    blob: int
    capped: float  # bytes/s for each connection
    shared: float  # bytes/s for all
    many: int
    client_procs: int
    settings: dict[str, Any]  # ocicache's, beyond its defaults, in every variant


FULL: Final = Sizes(200 * MiB, 10 * MB, 50 * MB, 20, os.cpu_count() or 1, {})
# Thresholds cut so that a small blob is still fetched in parts.
QUICK: Final = Sizes(
    6 * MiB, 10 * MB, 20 * MB, 2, 1, {"parallel_fill_threshold": 2 * MiB, "fill_chunk": 1 * MiB}
)


def client_label(procs: int) -> str:
    return f"aiohttp, {procs} process{'es' if procs > 1 else ''}"


@dataclass(frozen=True)
class Link:
    rate: float
    per_connection: bool
    clients: tuple[int, ...]
    servers: tuple[str, ...]

    def case(self, sz: Sizes, clients: int) -> str:
        who = f"{clients} client{'s' if clients > 1 else ''}"
        how = "per connection" if self.per_connection else "shared"
        return f"cold {size_label(sz.blob)}, {who}, {self.rate / MB:g} MB/s {how}"


def links(sz: Sizes) -> tuple[Link, Link]:
    return (
        Link(sz.capped, True, (1,), (DEFAULTS, ONE_STREAM, "distribution")),
        Link(sz.shared, False, (1, sz.many), (DEFAULTS, ONE_STREAM)),
    )


async def measure(
    ctx: Context, sz: Sizes, blob: cold.ColdBlob, session: aiohttp.ClientSession, link: Link, server: str
) -> None:
    """One server behind ``link``: a fresh proxy per client count, one pass."""
    kind: ProxyKind = "distribution" if server == "distribution" else "ocicache"
    settings = {**sz.settings, "fill_connections": 1} if server == ONE_STREAM else sz.settings
    work = ctx.dir(f"{server}-{link.rate / MB:g}".replace(" ", "-").replace("=", "-"))
    config = fanout.BenchConfig(
        size=blob.size,
        clients=link.clients,
        proxies=(kind,),
        stalled=0,
        warm=False,
        ocicache_args=cold.config_args(work, settings) if kind == "ocicache" else (),
        client_procs=sz.client_procs,
        repeat=1,
        upstream_rate=link.rate,
        per_connection=link.per_connection,
        deadline=min(ctx.left(), RUN_BOUND),
    )
    ctx.say(f"  {server}")
    report = await fanout.run_on(config, work, blob.registry, blob.ref, session, ctx.say)
    client = client_label(sz.client_procs)
    for r in report.runs:
        load = {
            key: cpu / r.wall
            for key, cpu in (("server", r.proxy_cpu), ("client", r.client_cpu), ("others", r.others_cpu))
        }
        up = (r.upstream_bytes or 0) / blob.size
        ctx.say(
            f"    {r.clients} client(s): {r.wall:.2f} s, upstream {up:.2f} blob in {r.upstream_gets} GETs"
        )
        values = [("s", r.wall), ("x blob", up)] + (
            [("MB/s", blob.size / r.wall / MB)] if link.per_connection else []
        )
        for metric, value in values:
            extra: dict[str, float | int | str] = {"gets": r.upstream_gets or 0}
            ctx.sample(
                Sample(
                    NAME, link.case(sz, r.clients), server, metric, value, 1, client, UNPINNED, load, extra
                )
            )


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    capped, shared = links(sz)
    async with cold.cold_blob(ctx, sz.blob) as blob, aiohttp.ClientSession() as session:
        for link in (capped, shared):
            key = f"upstream link ({NAME}, {'per connection' if link.per_connection else 'shared'})"
            ctx.report.servers[key] = cold.describe_link(link.rate, link.per_connection)
            for server in link.servers:
                await measure(ctx, sz, blob, session, link, server)
    client = client_label(sz.client_procs)
    ctx.client(client, "each client checks the sha256 of the whole blob (loadtests/clients.py)")
    ctx.report.servers[f"{ONE_STREAM} ({NAME})"] = "python -m proxy serve --config FILE (fill_connections: 1)"

    def row(case: str, metric: str, baseline: str, better: Better, targets: list[Target]) -> None:
        ctx.row(
            compare(
                ctx.report.samples,
                scenario=NAME,
                case=case,
                metric=metric,
                better=better,
                subject=DEFAULTS,
                baseline=baseline,
                client=client,
                placement=UNPINNED,
                targets=targets,
            )
        )

    row(capped.case(sz, 1), "MB/s", ONE_STREAM, "higher", [at_least(3.0)])
    row(capped.case(sz, 1), "MB/s", "distribution", "higher", [at_least(3.0)])
    row(capped.case(sz, 1), "x blob", "distribution", "lower", [at_most(1.0, on="value")])
    for n in shared.clients:
        row(shared.case(sz, n), "s", ONE_STREAM, "lower", [at_most(1.05)])
    row(shared.case(sz, sz.many), "x blob", ONE_STREAM, "lower", [at_most(1.0, on="value")])


SCENARIO: Final = Scenario(
    NAME,
    "cold 200 MiB blob, 10 MB/s per connection (vs one stream, distribution) and 50 MB/s shared, "
    "1 and 20 clients (vs one stream)",
    run,
)
