"""Cold fan-out: 1 and 20 clients ask for one cold blob at once, behind a shared 25 MB/s uplink.

The engine is :mod:`loadtests.fanout` (issue 3's benchmark), at a size that fits the harness's
deadline: a 100 MiB blob, the proxies reaching the upstream registry through the shaping relay
at 25 MB/s shared by all their connections (a site's uplink). That is 4.2 s over the link, as
issue 3's 200 MiB at 50 MB/s: longer than this machine takes to deliver and hash 20 copies
(measured here: 1.2 to 3.3 s, with the machine's speed), so that the link, not the clients, is
what one fill waits on. ocicache and distribution's pull-through proxy, each fresh (empty
cache) for every run; one pass, since runs over a shaped link barely vary (4.19, 4.18, 4.19 s
in issue 3) and distribution's 20 clients alone take 21 link times. Clients (aiohttp, over one
worker process per CPU) check the sha256 of every byte.

ocicache runs as deployed (``--workers auto``: a process per CPU); its cold runs are repeated
with one process (``--workers 1``) for comparison.

Rows: wall time of 20 clients against distribution's, against the same proxy's 1 client
(issue 3: within 1.2x), and against the same 20 clients on the now warm proxy (what being cold
adds to this machine's cost of delivering and hashing 20 copies); upstream bytes over the blob
size (1.00: one fetch); the slowest client's time to first byte (under 250 ms); peak RSS with
20 stalled clients beside one reader (growth under 1 MiB per stalled client). The engine's
detailed report goes to ``cold-fanout.md``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Final

from loadtests import fanout
from loadtests.fixtures import MiB
from loadtests.harness import Context, Scenario
from loadtests.placement import UNPINNED
from loadtests.report import Check, Sample, Target, at_most, compare
from loadtests.shaper import MB

NAME: Final = "cold-fanout"
SINGLE: Final = "ocicache 1 process"
MANY: Final = 20


def config(ctx: Context) -> fanout.BenchConfig:
    if ctx.quick:
        return fanout.BenchConfig(
            size=2 * MiB,
            clients=(1, 2),
            stalled=2,
            repeat=1,
            client_procs=1,
            upstream_rate=20 * MB,
            deadline=ctx.left(),
            workdir=ctx.dir("runs"),
        )
    return fanout.BenchConfig(
        size=100 * MiB,
        clients=(1, MANY),
        stalled=MANY,
        repeat=1,
        client_procs=os.cpu_count() or 1,
        upstream_rate=25 * MB,
        deadline=min(ctx.left(), 300.0),
        workdir=ctx.dir("runs"),
    )


async def run(ctx: Context) -> None:
    cfg = config(ctx)
    result = await fanout.run_benchmark(cfg, ctx.say)
    (ctx.out / f"{NAME}.md").write_text(result.markdown())
    # The default runs a process per CPU (serve --workers auto); cold, one process as well.
    single_cfg = dataclasses.replace(
        cfg,
        proxies=("ocicache",),
        stalled=0,
        warm=False,
        ocicache_args=("--workers", "1"),
        deadline=min(ctx.left(), 120.0),
        workdir=ctx.dir("runs-1-process"),
    )
    single = await fanout.run_benchmark(single_cfg, ctx.say)
    m = result.machine
    client = f"aiohttp, {cfg.client_procs} process{'es' if cfg.client_procs > 1 else ''}"
    ctx.client(client, f"{m['clients']}; each client checks the sha256 of the whole blob")
    ctx.report.servers["ocicache (cold fan-out)"] = (
        f"fresh per run, event loop {cfg.proxy_loop}, logs info JSON"
    )
    ctx.report.servers["distribution (cold fan-out)"] = (
        f"{m['upstream']} as a pull-through proxy, fresh per run"
    )
    ctx.report.servers["upstream link (cold fan-out)"] = m["link"]
    many = max(cfg.clients)
    case = {1: "cold, 1 client", many: f"cold, {many} clients"}
    warm_many = f"warm, {many} clients"
    runs: list[tuple[fanout.RunResult, str]] = [(run, run.proxy) for run in result.runs]
    runs += [(run, SINGLE) for run in single.runs if run.scenario == "cold"]
    for run, proxy in runs:
        if run.clients not in case or (run.scenario == "warm" and run.clients != many):
            continue
        label = {"cold": case[run.clients], "warm": warm_many}.get(
            run.scenario, f"1 + {run.stalled} stalled clients"
        )
        load = {
            "server": run.proxy_cpu / run.wall,
            "client": run.client_cpu / run.wall,
            "others": run.others_cpu / run.wall,
        }
        values: list[tuple[str, float | None]] = [
            ("s", run.wall),
            ("TTFB ms", run.ttfb_max * 1000),
            ("peak RSS MiB", None if run.peak_rss is None else run.peak_rss / MiB),
            ("x blob", None if run.upstream_bytes is None else run.upstream_bytes / result.blob_size),
        ]
        for metric, value in values:
            if value is not None:
                ctx.sample(Sample(NAME, label, proxy, metric, value, run.rep, client, UNPINNED, load))

    def row(
        case_: str,
        metric: str,
        subject: str,
        baseline: str,
        baseline_case: str | None = None,
        targets: tuple[Target, ...] = (),
    ) -> None:
        ctx.row(
            compare(
                ctx.report.samples,
                scenario=NAME,
                case=case_,
                metric=metric,
                better="lower",
                subject=subject,
                baseline=baseline,
                baseline_case=baseline_case,
                client=client,
                placement=UNPINNED,
                targets=targets,
            )
        )

    row(case[many], "s", "ocicache", "distribution")
    row(case[many], "s", "ocicache", "ocicache", case[1], (at_most(1.2),))
    row(case[many], "s", "ocicache", SINGLE)
    row(case[many], "s", SINGLE, SINGLE, case[1], (at_most(1.2),))
    row(case[many], "s", "distribution", "distribution", case[1])
    # What being cold adds to merely delivering and hashing 20 copies on this machine.
    row(case[many], "s", "ocicache", "ocicache", warm_many)
    row(case[many], "x blob", "ocicache", "distribution", targets=(at_most(1.0, on="value"),))
    row(case[many], "TTFB ms", "ocicache", "distribution", targets=(at_most(250.0, on="value"),))
    stalled = f"1 + {cfg.stalled} stalled clients"
    rss = compare(
        ctx.report.samples,
        scenario=NAME,
        case=stalled,
        metric="peak RSS MiB",
        better="lower",
        subject="ocicache",
        baseline="ocicache",
        baseline_case=case[1],
        client=client,
        placement=UNPINNED,
    )
    if rss is not None and cfg.stalled:
        growth = (rss.value - rss.baseline_value) / cfg.stalled
        check = Check(f"growth {growth:.2f} MiB per stalled client < 1", growth < 1.0, "value", 1.0)
        ctx.row(dataclasses.replace(rss, checks=(check,)))


SCENARIO: Final = Scenario(
    NAME, "1 and 20 clients on one cold 100 MiB blob behind a shared 25 MB/s link, vs distribution", run
)
