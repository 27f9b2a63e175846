"""A whole image: ``skopeo copy`` of a warm 3-layer, about 120 MiB image, through ocicache and direct.

The upstream registry holds an image of three layers (64, 40 and 16 MiB of random bytes in
uncompressed tars). ocicache pulls it once through skopeo and commits every blob (its log says
so); then, in each round, skopeo copies the image into a fresh ``dir:`` layout straight from the
upstream and through ocicache, in alternating order. skopeo fetches and digest-checks every blob
and writes it to disk, as a real pull does.

Figure: seconds from skopeo's start to its exit. Row: through ocicache / direct from the
upstream, per placement; target 1.1x or less (issue 12, target 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

from loadtests.fixtures import REPO, UPSTREAM_NAME, MiB, make_image, push_image, size_label
from loadtests.harness import Context, Scenario, measure
from loadtests.loadgen import LoadError, LoadResult
from loadtests.placement import Placement
from loadtests.report import Sample, at_most, compare
from loadtests.sampling import children_cpu
from loadtests.servers import FollowedServer, Server, start_distribution, start_ocicache

NAME: Final = "whole-image"
COPY_TIMEOUT: Final = 300.0
COMMIT_TIMEOUT: Final = 120.0


@dataclass(frozen=True)
class Sizes:
    layers: tuple[int, ...]
    rounds: int


FULL: Final = Sizes((64 * MiB, 40 * MiB, 16 * MiB), 3)
QUICK: Final = Sizes((256 * 1024, 128 * 1024, 64 * 1024), 1)


def skopeo_version() -> str:
    done = subprocess.run(["skopeo", "--version"], capture_output=True, text=True, check=False, timeout=30)
    return done.stdout.strip().rpartition(" ")[2] or "?"


def copy(server: Server, dest: Path, place: Placement) -> LoadResult:
    """One ``skopeo copy`` of the image from ``server`` into ``dest``, timed."""
    argv = [
        "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        f"docker://127.0.0.1:{server.port}/{REPO}:latest",
        f"dir:{dest}",
    ]
    cpu0, t0 = children_cpu(), time.monotonic()
    try:
        done = subprocess.run(
            place.client_argv(argv), capture_output=True, text=True, timeout=COPY_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"skopeo copy from {server.name} did not finish: {exc}") from exc
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        raise LoadError(f"skopeo copy from {server.name} failed: {done.stderr[-1000:]}")
    nbytes = sum(f.stat().st_size for f in dest.iterdir())
    return LoadResult("skopeo copy", seconds, nbytes, 1, 0, children_cpu() - cpu0)


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    image = await asyncio.to_thread(make_image, sz.layers)
    copies = ctx.dir("copies")
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
                start_ocicache, ctx.dir("ocicache"), {UPSTREAM_NAME: upstream.url()}, follow_log=True
            )
        )
        assert isinstance(ocicache, FollowedServer)
        ctx.client("skopeo copy", f"skopeo {skopeo_version()} copy --src-tls-verify=false docker://… dir:…")
        blobs = len(image.layers) + 1
        await asyncio.to_thread(copy, ocicache, copies / "warm", ctx.placements[0])
        if not await asyncio.to_thread(ocicache.wait_events, "fill_committed", blobs, COMMIT_TIMEOUT):
            raise LoadError(f"ocicache committed {ocicache.events('fill_committed')} of {blobs} blobs")
        await asyncio.to_thread(shutil.rmtree, copies / "warm")
        direct = upstream
        per_round = 2 * len(ctx.placements) * 10.0
        for rnd in ctx.rounds(sz.rounds, per_round):
            for place in ctx.placements:
                order = [direct, ocicache] if rnd % 2 else [ocicache, direct]
                for server in order:
                    dest = copies / uuid.uuid4().hex
                    result, load = await measure(
                        ctx,
                        server=server,
                        place=place,
                        helpers=[upstream],
                        client=functools.partial(copy, server, dest, place),
                    )
                    await asyncio.to_thread(shutil.rmtree, dest)
                    if result.bytes < image.size - len(image.manifest):
                        raise LoadError(
                            f"skopeo wrote {result.bytes} bytes from {server.name}, fewer than the image"
                        )
                    case = "direct" if server is direct else "through ocicache"
                    ctx.say(f"  round {rnd} {place.name:8} {case:16} {result.seconds:6.2f} s  {load}")
                    ctx.sample(
                        Sample(
                            NAME,
                            f"{size_label(image.size)} image",
                            "ocicache" if server is ocicache else "upstream direct",
                            "s",
                            result.seconds,
                            rnd,
                            result.client,
                            place.name,
                            load,
                        )
                    )
        for place in ctx.placements:
            ctx.row(
                compare(
                    ctx.report.samples,
                    scenario=NAME,
                    case=f"{size_label(image.size)} image",
                    metric="s",
                    better="lower",
                    subject="ocicache",
                    baseline="upstream direct",
                    client="skopeo copy",
                    placement=place.name,
                    targets=[at_most(1.1)],
                )
            )


SCENARIO: Final = Scenario(
    NAME, "skopeo copy of a warm 3-layer ~120 MiB image: through ocicache vs straight from upstream", run
)
