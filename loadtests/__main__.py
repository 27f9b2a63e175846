"""``python -m loadtests``: every scenario, one table of ratios, as markdown, JSON and a PNG chart.

Bounded in time (``--deadline``, 10 minutes by default; about 8 minutes here), on 127.0.0.1 only.
``--quick`` runs every scenario at tiny sizes for a smoke test: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from loadtests import chart
from loadtests.harness import DEFAULT_DEADLINE, QUICK_DEADLINE, Options, run
from loadtests.placement import ALL_NAMES, NAMES
from loadtests.report import Report
from loadtests.scenarios import ALL
from loadtests.servers import ROOT

RESULTS: Final = ROOT / "loadtests" / "results"
QUICK_RESULTS: Final = ROOT / "loadtests" / "results-quick"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and short runs: a smoke test")
    p.add_argument("--only", default="", help="comma-separated scenario names (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument(
        "--placements",
        default=",".join(NAMES),
        help=f"CPU placements, of {', '.join(ALL_NAMES)} (default {','.join(NAMES)})",
    )
    p.add_argument(
        "--deadline",
        type=float,
        help=f"seconds for the whole run (default {DEFAULT_DEADLINE:g}; {QUICK_DEADLINE:g} with --quick)",
    )
    p.add_argument(
        "--out", type=Path, help=f"where results go (default {RESULTS}, or {QUICK_RESULTS} with --quick)"
    )
    p.add_argument("--workdir", type=Path, help="keep servers' files and logs here (default: a temp dir)")
    return p


def write(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    (out / "results.md").write_text(report.markdown())
    title = f"ocicache load tests, {report.started}" + (" (quick: not a measurement)" if report.quick else "")
    chart.draw(report.rows, out / "results.png", title)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    ns = p.parse_args(argv)
    if ns.list:
        for sc in ALL:
            print(f"{sc.name:14} {sc.title}{'' if sc.default else ' (only with --only)'}")
        return 0
    placements = tuple(x for x in ns.placements.split(",") if x)
    if not placements or any(x not in ALL_NAMES for x in placements):
        p.error(f"--placements takes {', '.join(ALL_NAMES)}")
    deadline = ns.deadline if ns.deadline is not None else QUICK_DEADLINE if ns.quick else DEFAULT_DEADLINE
    if not 10 <= deadline <= 3600:
        p.error("--deadline must be between 10 and 3600 seconds")
    options = Options(
        quick=ns.quick,
        only=tuple(x for x in ns.only.split(",") if x),
        placements=placements,
        deadline=deadline,
        workdir=ns.workdir,
    )
    out = ns.out or (QUICK_RESULTS if ns.quick else RESULTS)

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    import uvloop

    # uvloop: in-process clients (the quick cold fan-out) cost this process less.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            report = runner.run(run(options, ALL, out, say))
        except ValueError as exc:
            p.error(str(exc))
    write(report, out)
    sys.stdout.write(report.markdown())
    say(f"wrote {out / 'results.md'}, results.json and results.png")
    bad = sum(int(s.extra.get("bad", 0)) for s in report.samples)
    if bad:
        say(f"{bad} bad responses: a server answered wrongly under load")
    return 0 if report.ok and not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
