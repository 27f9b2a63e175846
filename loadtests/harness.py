"""The harness: runs scenarios under one deadline and gathers what they measure into one report.

A :class:`Scenario` is a name, a line saying what it measures, and an async function that gets a
:class:`Context`. Through the context it finds its work directory, the CPU placements to measure
under, and whether this is a quick (smoke) run; it records :class:`~loadtests.report.Sample`\\ s
and the :class:`~loadtests.report.Row`\\ s that compare them, and names the servers and clients it
used. Scenarios run one after another, never side by side (they would share the cores), each
bounded by what is left of the run's deadline; one that fails is reported and the others still
run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from loadtests.loadgen import LoadResult
from loadtests.placement import Placement, placement
from loadtests.report import Outcome, Report, Row, Sample
from loadtests.sampling import Meter
from loadtests.servers import Server

DEFAULT_DEADLINE: Final = 600.0
QUICK_DEADLINE: Final = 300.0
# A scenario is not started with less than this left of the deadline.
MIN_LEFT: Final = 15.0


@dataclass(frozen=True)
class Options:
    quick: bool = False
    only: tuple[str, ...] = ()  # scenario names; empty: all
    placements: tuple[str, ...] = ("unpinned", "split")
    deadline: float = DEFAULT_DEADLINE
    workdir: Path | None = None  # None: a temp dir, removed after a successful run


@dataclass
class Context:
    """What a scenario sees of the run."""

    scenario: str
    quick: bool
    placements: list[Placement]
    work: Path
    out: Path
    deadline: float  # time.monotonic() by which the whole run ends
    report: Report
    say: Callable[[str], None] = lambda _msg: None
    cut_short: list[str] = field(default_factory=list)

    def dir(self, name: str) -> Path:
        path = self.work / self.scenario / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def rounds(self, count: int, estimate: float) -> Iterator[int]:
        """Round numbers 1..count, stopping early when a round of ``estimate`` seconds would not
        fit in what is left of the deadline (the first round always runs)."""
        for rnd in range(1, count + 1):
            if rnd > 1 and self.left() < estimate + MIN_LEFT:
                self.note(f"{self.scenario}: {rnd - 1} of {count} rounds, the deadline was near")
                return
            yield rnd

    def sample(self, sample: Sample) -> None:
        self.report.samples.append(sample)

    def row(self, row: Row | None) -> None:
        if row is not None:
            self.report.rows.append(row)

    def server(self, server: Server) -> Server:
        self.report.servers[server.name] = server.settings
        return server

    def client(self, name: str, text: str) -> None:
        self.report.clients[name] = text

    def note(self, text: str) -> None:
        self.report.notes.append(text)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str  # what it measures, in one line
    run: Callable[[Context], Awaitable[None]]
    default: bool = True  # False: run only when named (--only), a closer look at one question


async def measure(
    ctx: Context,
    *,
    server: Server,
    place: Placement,
    client: Callable[[], LoadResult],
    helpers: Sequence[Server] = (),
) -> tuple[LoadResult, dict[str, float]]:
    """Place ``server``, and the ``helpers`` it may call on (its upstream), on the placement's
    server CPUs; run ``client`` against it (in a thread: it waits on a child process), and return
    what it saw with the cores each side used meanwhile (helpers count as the server's)."""
    server.check_alive()
    pids = list(dict.fromkeys(pid for s in (server, *helpers) for pid in s.pids()))
    place.place_servers(pids)
    with Meter(pids) as meter:
        result = await asyncio.to_thread(client)
        usage = meter.usage(result.cpu)
    server.check_alive()
    return result, usage.as_cores()


# --- the run -----------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": str(os.cpu_count()),
        "usable cpus": ",".join(str(c) for c in sorted(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


async def run(
    options: Options, scenarios: Sequence[Scenario], out: Path, say: Callable[[str], None] = lambda _msg: None
) -> Report:
    """Run the scenarios named in ``options`` (by default, every default one) and return the report."""
    known = {s.name for s in scenarios}
    unknown = [n for n in options.only if n not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = [s for s in scenarios if s.name in options.only or (not options.only and s.default)]
    places = [placement(name) for name in options.placements]
    report = Report(
        started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        quick=options.quick,
        machine=machine_info(),
        placements={p.name: p.describe() for p in places},
    )
    started = time.monotonic()
    deadline = started + options.deadline
    work = options.workdir or Path(tempfile.mkdtemp(prefix="ocicache-loadtests-"))
    for path in (out, work):
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    try:
        for sc in chosen:
            t0 = time.monotonic()
            left = deadline - t0
            if left < MIN_LEFT:
                report.outcomes.append(Outcome(sc.name, sc.title, "skipped", 0.0, "the deadline had passed"))
                continue
            say(f"scenario {sc.name}: {sc.title}")
            ctx = Context(sc.name, options.quick, places, work, out, deadline, report, say)
            try:
                async with asyncio.timeout(left):
                    await sc.run(ctx)
                report.outcomes.append(Outcome(sc.name, sc.title, "ok", time.monotonic() - t0))
            except Exception as exc:  # one scenario's failure must not lose the others' figures
                traceback.print_exc(file=sys.stderr)
                error = "deadline" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                report.outcomes.append(Outcome(sc.name, sc.title, "failed", time.monotonic() - t0, error))
    finally:
        if options.workdir is None and report.ok:
            await asyncio.to_thread(shutil.rmtree, work, True)
        else:
            say(f"work files kept in {work}")
    report.seconds = time.monotonic() - started
    return report
