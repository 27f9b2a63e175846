"""Memory: 100 concurrent pulls of one cold 1 GiB blob, 10 of them stalled: ocicache's peak RSS.

The upstream registry holds 1 GiB of random bytes. ocicache (its defaults), fresh, reaches it
directly over loopback, with no link to slow it: the fill then runs as fast as this machine
allows, which puts the most in flight at once. :mod:`loadtests.pulls` opens 100 connections
and sends every request at once: 90 read the whole blob (one checks its sha256, the others
count every byte, dropped in the kernel so that 90 GiB fit in the run), 10 read the response
head and a few bytes and then nothing, until the 90 are done.

Figure: the proxy process's peak RSS (``VmHWM``) over the run, against a fresh ocicache serving
one pull of the same cold blob; target 200 MiB or less (issue 12, target 5). Each run writes
the 1 GiB once, into its own fresh cache, removed after it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from loadtests import cold
from loadtests.fixtures import MiB, size_label
from loadtests.harness import Context, Scenario
from loadtests.loadgen import LoadError
from loadtests.placement import UNPINNED
from loadtests.report import Sample, at_most, compare
from loadtests.sampling import tree_peak_rss
from loadtests.servers import ROOT

NAME: Final = "memory"
RUN_BOUND: Final = 300.0


@dataclass(frozen=True)
class Sizes:
    blob: int
    whole: int
    stalled: int


FULL: Final = Sizes(1024 * MiB, 90, 10)
QUICK: Final = Sizes(8 * MiB, 8, 2)


def pull(port: int, blob: cold.ColdBlob, whole: int, stalled: int, timeout: float) -> list[dict[str, Any]]:
    argv = [
        sys.executable, "-m", "loadtests.pulls",
        "--port", str(port), "--path", blob.path, "--size", str(blob.size), "--digest", blob.digest,
        "--whole", str(whole), "--stalled", str(stalled), "--verify", "1", "--timeout", repr(timeout),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"the pullers did not finish: {exc}") from exc
    try:
        results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise LoadError(f"the pullers failed ({done.returncode}): {done.stderr[-1000:]}") from exc
    bad = [r for r in results if r["error"] is not None]
    if bad:
        raise LoadError(
            f"{len(bad)} of {len(results)} pulls failed, first: {bad[0]['kind']}: {bad[0]['error']}"
        )
    return results


async def run(ctx: Context) -> None:
    sz = QUICK if ctx.quick else FULL
    client = "loadtests/pulls.py"
    ctx.client(
        client,
        "one process, raw sockets and a selector; whole pulls count the body (one checks its "
        "sha256), stalled ones read the head and a few bytes and stop",
    )
    many = f"{sz.whole + sz.stalled} pulls, {sz.stalled} stalled"
    one = "1 pull"
    async with cold.cold_blob(ctx, sz.blob) as blob:
        ctx.report.servers[f"ocicache ({NAME})"] = (
            f"python -m proxy serve, defaults, fresh per run, upstream direct (loopback, unshaped); "
            f"a cold {size_label(sz.blob)} blob"
        )
        for case, whole, stalled in ((one, 1, 0), (many, sz.whole, sz.stalled)):
            async with cold.fresh_proxy("ocicache", ctx.work / NAME / "proxy", blob.registry.url) as proxy:
                with cold.Load([proxy.pid, blob.registry.proc.pid], child=True) as load:
                    timeout = max(10.0, min(ctx.left() - 30, RUN_BOUND))
                    results = await asyncio.to_thread(
                        pull, int(proxy.url.rpartition(":")[2]), blob, whole, stalled, timeout
                    )
                    cores = load.cores()
                async with aiohttp.ClientSession() as session:
                    await proxy.settle(session)
                peak = tree_peak_rss(proxy.pid)
                if peak is None:
                    raise LoadError("ocicache exited during the run")
            walls = [r["seconds"] for r in results if r["kind"] != "stalled"]
            ctx.say(f"  {case:24} peak RSS {peak / MiB:6.1f} MiB; slowest pull {max(walls):.2f} s; {cores}")
            extra: dict[str, float | int | str] = {
                "slowest pull s": max(walls),
                "pulls": len(walls),
                "stalled": stalled,
            }
            ctx.sample(
                Sample(NAME, case, "ocicache", "peak RSS MiB", peak / MiB, 1, client, UNPINNED, cores, extra)
            )
    ctx.row(
        compare(
            ctx.report.samples,
            scenario=NAME,
            case=many,
            metric="peak RSS MiB",
            better="lower",
            subject="ocicache",
            baseline="ocicache",
            baseline_case=one,
            client=client,
            placement=UNPINNED,
            targets=[at_most(200.0, on="value")],
        )
    )


SCENARIO: Final = Scenario(
    NAME, "100 concurrent pulls of a cold 1 GiB blob, 10 stalled: ocicache's peak RSS (vs one pull)", run
)
