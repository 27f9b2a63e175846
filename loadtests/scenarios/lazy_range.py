"""Lazy pulling: a range deep into a cold blob while its fill runs, and containerd's parallel chunks.

The proxies reach the upstream registry through a shared 50 MB/s link (one bucket for all
their connections, a site's uplink); the blob is 200 MiB of random bytes; every proxy is fresh
(empty cache) for every run. Readers: :mod:`loadtests.readers`, in the harness's process.

* **Range during the fill.** One client GETs the whole blob; as soon as its first body byte
  arrives (the fill has started), another asks for ``Range: bytes=150MiB-(151MiB-1)``. Figure:
  that range's time from request to its first byte (target under 1 s), its bytes checked
  against the blob, the whole client's sha256 checked; ocicache (defaults) and distribution's
  proxy, which answers a range of a blob it does not hold with the whole blob (200): its range
  arrives when that stream reaches it.
* **Chunks.** 16 connections take the blob's 8 MiB chunks in order, as ``Range: bytes=N-
  (N+8MiB-1)`` (containerd 2.1), every chunk checked; wall time against one client pulling the
  whole blob from a fresh ocicache (target no worse: 1.05x, a shaped run's noise). Upstream
  bytes: the fill's over the blob (target 1.00), and what lazy relays (ranges ocicache fetched
  for one client alone, ``"cache": "lazy"`` in its request log) cost beyond it. distribution is
  not run here: it answers every chunk with the whole blob, fetched once more each time.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from loadtests import cold, readers
from loadtests.fanout import ProxyKind
from loadtests.fixtures import MiB, size_label
from loadtests.harness import Context, Scenario
from loadtests.loadgen import LoadError
from loadtests.placement import UNPINNED
from loadtests.report import Sample, at_most, compare
from loadtests.shaper import MB

NAME: Final = "lazy-range"
CLIENT: Final = "aiohttp, in the harness"


@dataclass(frozen=True)
class Sizes:
    blob: int
    offset: int  # of the lazy range
    length: int
    chunk: int
    workers: int
    rate: float
    settings: dict[str, Any]  # ocicache's, beyond its defaults


FULL: Final = Sizes(200 * MiB, 150 * MiB, 1 * MiB, 8 * MiB, 16, 50 * MB, {})
# Small enough to be quick, with thresholds cut to match so that every path still runs.
QUICK: Final = Sizes(
    8 * MiB,
    6 * MiB,
    256 * 1024,
    1 * MiB,
    4,
    20 * MB,
    {"parallel_fill_threshold": 2 * MiB, "fill_chunk": 1 * MiB, "lazy_range_gap": 1 * MiB},
)


def check(reads: list[readers.Read], what: str) -> None:
    bad = readers.failures(reads)
    if bad:
        raise LoadError(f"{what}: {len(bad)} bad answer(s), first: {bad[0]}")


async def range_during_fill(
    ctx: Context, blob: cold.ColdBlob, relay_url: str, relay_pid: int, kind: ProxyKind, sz: Sizes
) -> None:
    extra = cold.config_args(ctx.dir("config"), sz.settings) if kind == "ocicache" else ()
    case = f"{size_label(sz.length)} range at {size_label(sz.offset)}, fill running"
    async with cold.fresh_proxy(kind, ctx.work / NAME / f"{kind}-range", relay_url, extra) as proxy:
        since = cold.mark(blob)
        url = proxy.url + blob.path
        started = asyncio.Event()
        with cold.Load([proxy.pid, blob.registry.proc.pid, relay_pid]) as load:
            async with readers.session() as a, readers.session() as b:
                whole = asyncio.create_task(readers.read_whole(a, url, blob, started.set))
                cue = asyncio.create_task(started.wait())
                await asyncio.wait({whole, cue}, return_when=asyncio.FIRST_COMPLETED)
                cue.cancel()
                rng = await readers.read_range(b, url, blob, sz.offset, sz.offset + sz.length - 1)
                got = await whole
            cores = load.cores()
        check([got, rng], f"{kind}: range during the fill")
        async with aiohttp.ClientSession() as session:
            traffic = await cold.upstream_sent(blob, since, proxy, session)
        lines = await cold.wait_served(proxy, blob.path, 2)
    assert rng.ttfb is not None
    answered = {200: "the whole blob (200)", 206: "206"}.get(rng.status, str(rng.status))
    how = next((f["cache"] for f in lines if f.get("cache") in ("lazy", "join", "miss")), None)
    ctx.say(
        f"  {kind:12} range TTFB {rng.ttfb * 1000:7.0f} ms ({answered}{f', {how}' if how else ''}); "
        f"whole {readers.wall([got]):.2f} s; upstream {sum(traffic.get_bytes) / blob.size:.2f} blob"
    )
    extra_fields: dict[str, float | int | str] = {"status": rng.status, "served": how or "-"}
    ctx.sample(Sample(NAME, case, kind, "TTFB ms", rng.ttfb * 1000, 1, CLIENT, UNPINNED, cores, extra_fields))
    ctx.sample(
        Sample(NAME, case, kind, "x blob", sum(traffic.get_bytes) / blob.size, 1, CLIENT, UNPINNED, cores)
    )
    if kind == "ocicache":
        ctx.note(
            f"{NAME}: ocicache answered the range {answered}, served {how or '?'} (its request log: "
            "lazy = from a ranged upstream request of its own, join = from the fill)"
        )
    else:
        ctx.note(f"{NAME}: distribution answered the range with {answered}")


async def one_client_then_chunks(
    ctx: Context, blob: cold.ColdBlob, relay_url: str, relay_pid: int, sz: Sizes
) -> None:
    extra = cold.config_args(ctx.dir("config"), sz.settings)
    chunks = -(-blob.size // sz.chunk)
    case = f"{sz.workers} connections, {size_label(sz.chunk)} chunks"
    whole_case = "1 client, whole blob"
    for label in (whole_case, case):
        async with cold.fresh_proxy("ocicache", ctx.work / NAME / "chunks", relay_url, extra) as proxy:
            since = cold.mark(blob)
            url = proxy.url + blob.path
            with cold.Load([proxy.pid, blob.registry.proc.pid, relay_pid]) as load:
                if label == whole_case:
                    async with readers.session() as a:
                        reads = [await readers.read_whole(a, url, blob)]
                else:
                    reads = await readers.read_chunks(url, blob, sz.chunk, sz.workers)
                cores = load.cores()
            check(reads, f"ocicache: {label}")
            async with aiohttp.ClientSession() as session:
                traffic = await cold.upstream_sent(blob, since, proxy, session)
            lines = await cold.wait_served(proxy, blob.path, len(reads))
        total = sum(traffic.get_bytes)
        relayed = cold.relayed_bytes(lines)
        wall = readers.wall(reads)
        how = collections.Counter(str(f.get("cache")) for f in lines)
        ctx.say(
            f"  ocicache {label:32} {wall:6.2f} s; upstream {total / blob.size:.3f} blob, "
            f"{relayed} bytes relayed; served {dict(how)}"
        )
        fields: dict[str, float | int | str] = {
            "relayed": relayed,
            "requests": len(reads),
            "gets": len(traffic.get_bytes),
        }
        fields |= {f"served {k}": v for k, v in how.items()}
        for metric, value in (
            ("s", wall),
            ("x blob", total / blob.size),
            ("fill x blob", (total - relayed) / blob.size),
        ):
            ctx.sample(Sample(NAME, label, "ocicache", metric, value, 1, CLIENT, UNPINNED, cores, fields))
        if label == case:
            ctx.note(
                f"{NAME}: {chunks} chunk requests over {sz.workers} connections, answered "
                + ", ".join(f"{v} {k}" for k, v in sorted(how.items()))
                + f"; lazy relays cost {relayed / MiB:.1f} MiB ({relayed / blob.size:.1%} of the blob) "
                f"beyond the fill's {(total - relayed) / blob.size:.2f} blob"
            )


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    ctx.client(
        CLIENT, f"aiohttp {aiohttp.__version__} on uvloop, one connection per reader, every byte checked"
    )
    async with cold.cold_blob(ctx, sz.blob) as blob, cold.link(blob, sz.rate) as relay:
        assert relay.pid is not None
        ctx.report.servers[f"upstream link ({NAME})"] = cold.describe_link(sz.rate, per_connection=False)
        for kind in ("ocicache", "distribution"):
            await range_during_fill(ctx, blob, relay.url, relay.pid, kind, sz)
        await one_client_then_chunks(ctx, blob, relay.url, relay.pid, sz)
    case = f"{size_label(sz.length)} range at {size_label(sz.offset)}, fill running"
    chunked = f"{sz.workers} connections, {size_label(sz.chunk)} chunks"
    common: dict[str, Any] = {
        "scenario": NAME,
        "subject": "ocicache",
        "client": CLIENT,
        "placement": UNPINNED,
    }
    samples = ctx.report.samples
    ctx.row(
        compare(
            samples,
            case=case,
            metric="TTFB ms",
            better="lower",
            baseline="distribution",
            targets=[at_most(1000.0, on="value")],
            **common,
        )
    )
    ctx.row(compare(samples, case=case, metric="x blob", better="lower", baseline="distribution", **common))
    ctx.row(
        compare(
            samples,
            case=chunked,
            metric="s",
            better="lower",
            baseline="ocicache",
            baseline_case="1 client, whole blob",
            targets=[at_most(1.05)],
            **common,
        )
    )
    ctx.row(
        compare(
            samples,
            case=chunked,
            metric="fill x blob",
            better="lower",
            baseline="ocicache",
            baseline_case="1 client, whole blob",
            targets=[at_most(1.0, on="value")],
            **common,
        )
    )
    ctx.row(
        compare(
            samples,
            case=chunked,
            metric="x blob",
            better="lower",
            baseline="ocicache",
            baseline_case="1 client, whole blob",
            **common,
        )
    )


SCENARIO: Final = Scenario(
    NAME,
    "cold 200 MiB blob behind a shared 50 MB/s link: a 1 MiB range at 150 MiB during the fill "
    "(vs distribution), 16 parallel 8 MiB chunks (vs one whole pull)",
    run,
)
