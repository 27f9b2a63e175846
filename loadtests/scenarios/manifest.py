"""Cached manifest, 32 connections: requests/s and p99 latency, by tag and by digest.

The upstream registry holds a small image. ocicache (``--tag-ttl 3600``, so the tag stays fresh
for the whole run) and distribution's pull-through proxy have each answered it once by tag and
by digest; then ``wrk -t2 -c32`` asks for it again and again. distribution asks its upstream
about a tag on every request (that is how its proxy keeps tags fresh); by digest it answers from
its own storage. The bare server (:mod:`loadtests.bare`) returns ocicache's exact body and headers
from a single aiohttp handler: the floor under any aiohttp server here, measured once per round.

ocicache runs as deployed (``--workers auto``: a process per CPU) and, for comparison, as one
process (``--workers 1``).

Rows, per placement: by tag, ocicache / distribution (target 40x, and 10,000 requests/s or
more), ocicache / bare (target: within 1.5x, i.e. ratio 0.67 or more), p99 against bare's
(target 5 ms or less); by digest, ocicache / distribution (target 10x) and ocicache / bare
(issue 12, target 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
from dataclasses import dataclass
from typing import Final

import aiohttp

from loadtests.fixtures import UPSTREAM_NAME, make_image, manifest_path, push_image
from loadtests.harness import Context, Scenario, measure
from loadtests.loadgen import IO_TIMEOUT, LoadError, Request, check_once, run_wrk, wrk_version
from loadtests.report import Sample, Target, at_least, at_most, compare
from loadtests.servers import Server, start_bare, start_distribution, start_ocicache
from tests.support.images import MANIFEST_ACCEPT

NAME: Final = "manifest"
SINGLE: Final = "ocicache 1 process"
# Headers the bare server must not copy: aiohttp sets them itself, per response.
OWN_HEADERS: Final = frozenset({"content-length", "date", "server", "connection", "keep-alive"})


@dataclass(frozen=True)
class Sizes:
    connections: int
    seconds: float
    rounds: int


# 3 s per measurement (was 4) keeps the whole default run within its 10 minutes.
FULL: Final = Sizes(32, 3.0, 2)
QUICK: Final = Sizes(4, 1.0, 1)


def fetch(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        conn.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    image = await asyncio.to_thread(make_image, (4096,))
    by_tag, by_digest = manifest_path("latest"), manifest_path(image.manifest_digest)
    with contextlib.ExitStack() as stack:

        def started(server: Server) -> Server:
            stack.callback(server.stop)
            return ctx.server(server)

        upstream = started(
            await asyncio.to_thread(start_distribution, ctx.dir("upstream"), name="upstream registry")
        )
        async with aiohttp.ClientSession() as session:
            await push_image(session, upstream.url(), image)
        ocicache = started(
            await asyncio.to_thread(
                start_ocicache, ctx.dir("ocicache"), {UPSTREAM_NAME: upstream.url()}, "--tag-ttl", "3600"
            )
        )
        # The default is a process per CPU (serve --workers auto); one process, for comparison.
        single = started(
            await asyncio.to_thread(
                start_ocicache,
                ctx.dir("ocicache-1"),
                {UPSTREAM_NAME: upstream.url()},
                "--tag-ttl",
                "3600",
                "--workers",
                "1",
                name=SINGLE,
            )
        )
        distribution = started(
            await asyncio.to_thread(start_distribution, ctx.dir("distribution"), remote=upstream.url())
        )
        for server in (ocicache, single, distribution):
            for path in (by_tag, by_digest, by_tag, by_digest):  # twice: the second is a warm answer
                status, _, body = await asyncio.to_thread(fetch, server.port, path)
                if status != 200 or body != image.manifest:
                    raise LoadError(f"{server.name} {path}: status {status}, {len(body)} bytes")
        _, headers, body = await asyncio.to_thread(fetch, ocicache.port, by_tag)
        bare = started(
            await asyncio.to_thread(
                start_bare,
                ctx.dir("bare"),
                body,
                {k: v for k, v in headers.items() if k.lower() not in OWN_HEADERS},
            )
        )

        accept = (("Accept", MANIFEST_ACCEPT),)
        cases = [
            ("by tag", ocicache, by_tag),
            ("by digest", ocicache, by_digest),
            ("by tag", single, by_tag),
            ("by digest", single, by_digest),
            ("by tag", distribution, by_tag),
            ("by digest", distribution, by_digest),
            ("same bytes", bare, by_tag),
        ]
        for _, server, path in cases:
            await asyncio.to_thread(
                check_once, Request(server.port, path, accept, 200, len(image.manifest)), image.manifest
            )
        ctx.client("wrk", f"wrk {wrk_version()}, 2 threads; p99 from its latency histogram")
        script_dir = ctx.dir("wrk")
        per_round = len(cases) * len(ctx.placements) * (sz.seconds + 0.5)
        labels: dict[tuple[str, str], None] = {}
        for rnd in ctx.rounds(sz.rounds, per_round):
            for place in ctx.placements:
                for case, server, path in cases:
                    req = Request(server.port, path, accept, 200, len(image.manifest))
                    result, load = await measure(
                        ctx,
                        server=server,
                        place=place,
                        helpers=[upstream],
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
                        f"  round {rnd} {place.name:8} {case:10} {server.name:13} {result.rps:9,.0f} req/s "
                        f"p99 {result.p99_ms or 0:.2f} ms  {load}"
                    )
                    extra: dict[str, float | int | str] = {"bad": result.bad, "p50 ms": result.p50_ms or 0.0}
                    for metric, value in (("requests/s", result.rps), ("p99 ms", result.p99_ms or 0.0)):
                        ctx.sample(
                            Sample(
                                NAME,
                                case,
                                server.name,
                                metric,
                                value,
                                rnd,
                                result.client,
                                place.name,
                                load,
                                extra,
                            )
                        )
                    labels[result.client, place.name] = None
        within_bare = at_least(round(1 / 1.5, 2))
        for client_label, place_name in labels:
            rows: list[tuple[str, str, str, str | None, list[Target]]] = [
                ("by tag", "requests/s", "distribution", None, [at_least(40), at_least(10_000, on="value")]),
                ("by tag", "requests/s", "bare aiohttp", "same bytes", [within_bare]),
                ("by tag", "p99 ms", "bare aiohttp", "same bytes", [at_most(5.0, on="value")]),
                ("by tag", "requests/s", SINGLE, None, []),
                ("by tag", "p99 ms", SINGLE, None, []),
                ("by digest", "requests/s", "distribution", None, [at_least(10)]),
                ("by digest", "requests/s", SINGLE, None, []),
                ("by digest", "requests/s", "bare aiohttp", "same bytes", []),
                ("by digest", "p99 ms", "bare aiohttp", "same bytes", []),
            ]
            for case, metric, baseline, baseline_case, targets in rows:
                ctx.row(
                    compare(
                        ctx.report.samples,
                        scenario=NAME,
                        case=case,
                        metric=metric,
                        better="lower" if metric == "p99 ms" else "higher",
                        subject="ocicache",
                        baseline=baseline,
                        baseline_case=baseline_case,
                        client=client_label,
                        placement=place_name,
                        targets=targets,
                    )
                )


SCENARIO: Final = Scenario(
    NAME,
    "cached manifest by tag and by digest, 32 connections: requests/s, p99 vs distribution, bare aiohttp",
    run,
)
